"""A batch's record (what the store holds) and its OpenAI view (what `GET /v1/batches/{id}` answers)."""

from __future__ import annotations

import time
import uuid
from typing import Any

__all__ = ["STATUSES", "FINISHED", "COMPLETION_WINDOWS", "new_batch_id", "new_record", "batch_view",
           "output_file_id", "error_file_id"]

STATUSES = ("validating", "in_progress", "finalizing", "completed", "failed", "cancelling", "cancelled", "expired")
FINISHED = ("completed", "failed", "cancelled", "expired")
COMPLETION_WINDOWS = {"24h": 24 * 3600}


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex[:24]


def output_file_id(batch_id: str) -> str:
    """Derived from the batch: a finalization redone after a crash writes the same file, not a second one."""
    return "file-" + batch_id.removeprefix("batch_") + "out"


def error_file_id(batch_id: str) -> str:
    return "file-" + batch_id.removeprefix("batch_") + "err"


def new_record(*, tenant: str, role: str, endpoint: str, input_file_id: str, completion_window: str,
               metadata: dict[str, str] | None, total: int, now: float | None = None) -> dict[str, Any]:
    created = int(time.time() if now is None else now)
    return {
        "id": new_batch_id(), "tenant": tenant, "role": role, "endpoint": endpoint, "input_file_id": input_file_id,
        "completion_window": completion_window, "status": "validating", "created_at": created,
        "expires_at": created + COMPLETION_WINDOWS[completion_window], "in_progress_at": None,
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
        "cancelled_at": None, "metadata": metadata, "errors": None, "output_file_id": None, "error_file_id": None,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "next_line": 0,  # requests (non-blank input lines, in order) whose results are committed
        "chunks": [],  # [first, end, run]: committed results of requests first..end-1, written by run `run`
        "run": 0,  # bumped by every replica (or restart) that takes the batch up: fences older runs' writes
        "runs": [],  # {"run", "replica", "from_line", "started_at"}: who ran it, resuming where
        "cancel_requested": False,
    }


_VIEW_FIELDS = ("id", "endpoint", "errors", "input_file_id", "completion_window", "status", "output_file_id",
                "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
                "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts", "metadata")


def batch_view(record: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's Batch object, plus `runs` (how often it was taken up, by which replica) as an extension."""
    view = {"object": "batch"} | {k: record.get(k) for k in _VIEW_FIELDS}
    view["request_counts"] = dict(record["request_counts"])
    view["runs"] = [dict(r) for r in record.get("runs", [])]
    return view
