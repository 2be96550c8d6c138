"""One tuning job in this replica's memory, while it validates or runs (its state of record is in the store)."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from softserve.tuning.data import TokenizedExample
from softserve.tuning.records import make_event

__all__ = ["TuningJob", "QueueFull", "LeaseLost", "new_job_id"]


class QueueFull(Exception):
    pass


class LeaseLost(Exception):
    """This replica no longer holds the job's lease: another one runs it now."""


@dataclass
class TuningJob:
    """A job this replica is validating or running; `record` is its (persisted) state."""

    record: dict[str, Any]
    train: list[TokenizedExample] | None = None
    eval: list[TokenizedExample] | None = None
    texts: dict[str, str] = field(default_factory=dict)  # data as submitted (before it is read back)
    pending: list[dict[str, Any]] = field(default_factory=list)  # events not persisted yet
    seq: int = 0
    cancel_event: threading.Event = field(default_factory=threading.Event)
    lost_lease: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def tenant(self) -> str:
        return self.record["tenant"]

    @property
    def status(self) -> str:
        return self.record["status"]

    def event(self, message: str, **kw) -> None:
        with self.lock:
            self.pending.append(make_event(self.id, self.seq, message, **kw))
            self.seq += 1


def new_job_id() -> str:
    return "tunejob-" + uuid.uuid4().hex[:24]
