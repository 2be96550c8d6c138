"""Validating tuning jobs' data (`validating_files`): a small pool of threads, fair between tenants,
that stops a job's tokenization when it is cancelled (issue #26 F6).

One shared thread in FIFO order let one tenant's 10^6-line file hold every other tenant's 1-example
job for minutes, and kept tokenizing after the API said "cancelled". Now:
- `FairQueue`: each tenant's jobs wait in their own FIFO, tenants are served round robin, and a
  tenant has at most one job validating at a time, so with `workers` >= 2 a tenant with a huge file
  leaves the other threads to the others;
- tokenizing checks the job's cancel flag before each example (and re-reads the stored record about
  once a second, for a cancel made on another replica): a cancelled job stops within about one
  example's time;
- example counts are capped (--max-tuning-examples) before parsing the rest of a file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

from softserve.tuning.data import DatasetError, Stopped, TokenizedExample
from softserve.tuning.job import TuningJob
from softserve.tuning.persist import JobStore
from softserve.tuning.records import FINISHED

log = logging.getLogger("softserve.tuning")

__all__ = ["FairQueue", "Validator"]

STORE_CANCEL_CHECK_S = 1.0  # how often a validating job re-reads its record for a cancel from another replica


class FairQueue:
    """Items per tenant, FIFO within a tenant, tenants round robin; a tenant whose item is being
    worked on (get() until done()) is skipped, so one tenant never holds two workers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: dict[str, deque] = {}
        self._turn: deque[str] = deque()  # tenants with waiting items, next first
        self._busy: set[str] = set()
        self._closed = False

    def put(self, tenant: str, item) -> None:
        with self._cond:
            self._waiting.setdefault(tenant, deque()).append(item)
            if tenant not in self._turn:
                self._turn.append(tenant)
            self._cond.notify_all()

    def get(self, timeout: float | None = None):
        """(tenant, item), or None once closed (or after `timeout` with nothing to hand out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                for tenant in self._turn:
                    if tenant not in self._busy:
                        self._turn.remove(tenant)
                        queue = self._waiting[tenant]
                        item = queue.popleft()
                        if queue:
                            self._turn.append(tenant)  # its next item waits for every other tenant's turn
                        else:
                            del self._waiting[tenant]
                        self._busy.add(tenant)
                        return tenant, item
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self._cond.wait(left)
            return None

    def done(self, tenant: str) -> None:
        with self._cond:
            self._busy.discard(tenant)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class ValidationHost(Protocol):
    """What validating needs from the job manager (softserve/tuning/jobs.py's TuningManager)."""

    jobs: JobStore
    clock: Callable[[], float]
    _stop: threading.Event  # the manager stops (shutdown)

    def examples(self, job: TuningJob, which: str,
                 should_stop: Callable[[], bool] | None = None) -> list[TokenizedExample]: ...
    def flush(self, job: TuningJob, *, change: Callable[[dict], None] | None = None, fenced: bool = False) -> None: ...
    def finish(self, job: TuningJob, status: str, message: str, *, level: str = "info", **fields: Any) -> None: ...
    def enqueue_run(self, tenant: str, job_id: str) -> None: ...
    def _load_job(self, tenant: str, job_id: str) -> TuningJob: ...
    def _finalize(self, tenant: str, job_id: str, finished_at: float | None) -> bool: ...
    def _forget(self, job: TuningJob) -> None: ...
    def _release_claim(self, job_id: str) -> None: ...


class Validator:
    """`workers` threads validating the manager's `validating_files` jobs."""

    def __init__(self, manager: ValidationHost, workers: int) -> None:
        self.m = manager
        self.queue = FairQueue()
        self.threads = [threading.Thread(target=self._loop, name=f"softserve-tuning-validate-{i}", daemon=True)
                        for i in range(max(1, workers))]
        for t in self.threads:
            t.start()

    def put(self, tenant: str, job_id: str) -> None:
        self.queue.put(tenant, job_id)

    def close(self) -> None:
        self.queue.close()

    def _loop(self) -> None:
        while True:
            got = self.queue.get()
            if got is None:
                return
            tenant, job_id = got
            try:
                self.validate(tenant, job_id)
            except Exception:
                log.exception("validating tuning job %s crashed", job_id)
                self.m._release_claim(job_id)
            finally:
                self.queue.done(tenant)

    def should_stop(self, job: TuningJob) -> Callable[[], bool]:
        """True once the job is cancelled (here, or in the store by another replica) or the server stops."""
        next_read = [time.monotonic() + STORE_CANCEL_CHECK_S]

        def check() -> bool:
            if job.cancel_event.is_set() or self.m._stop.is_set():
                return True
            if time.monotonic() >= next_read[0]:
                next_read[0] = time.monotonic() + STORE_CANCEL_CHECK_S
                try:
                    if self.m.jobs.read(job.tenant, job.id)["cancel_requested"]:
                        job.cancel_event.set()
                except Exception:  # the store is briefly away: keep going, the next read decides
                    log.warning("tuning job %s: reading its record for a cancel failed", job.id)
            return job.cancel_event.is_set()

        return check

    def validate(self, tenant: str, job_id: str) -> None:
        m = self.m
        lease = m.jobs.acquire(tenant, job_id)
        if lease is None:  # another replica validates it
            m._release_claim(job_id)
            return
        try:
            job = m._load_job(tenant, job_id)
            if job.status != "validating_files":
                if job.status in FINISHED:  # cancelled before we took it: cancel() left the clean-up to us
                    m._finalize(tenant, job_id, job.record["finished_at"])
                m._forget(job)
                return
            stop = self.should_stop(job)
            try:
                job.train = m.examples(job, "train", should_stop=stop)
                job.eval = m.examples(job, "validation", should_stop=stop)
                if not job.train:
                    raise DatasetError("no training examples", source="training_data")
            except Stopped:
                self._stopped(job)
                return
            except DatasetError as exc:
                if stop():  # cancelled meanwhile: the job is cancelled, not failed (never both, issue #26)
                    self._stopped(job)
                    return
                param = exc.source if exc.source in ("training_data", "validation_data") else \
                    ("validation_file" if exc.source == job.record["validation_file"] else "training_file")
                m.finish(job, "failed", f"Data validation failed: {exc}", level="error",
                         error={"code": "invalid_training_data", "message": str(exc), "param": param})
                m._forget(job)
                return
            job.event(f"Validated {len(job.train)} training and {len(job.eval)} validation examples")
            m.flush(job, fenced=True, change=lambda r: r.update(status="queued"))
            if job.status == "cancelled" or job.record["cancel_requested"]:
                if job.status in FINISHED:
                    m._finalize(job.tenant, job.id, job.record["finished_at"])
                m._forget(job)
                return
        finally:
            m.jobs.release(lease)
        # Only after the lease is released: a worker that picked the job up while we still held it
        # would find it leased, drop it as "another replica's", and it would wait for the next scan.
        m.enqueue_run(job.tenant, job.id)

    def _stopped(self, job: TuningJob) -> None:
        """Tokenizing stopped: the job was cancelled (its record says so: finish the clean-up), or this
        replica stops (leave it validating_files for the next start or another replica's scan)."""
        m = self.m
        job.train = job.eval = None
        if m._stop.is_set():
            m._release_claim(job.id)
            return
        fresh = m.jobs.read(job.tenant, job.id)
        if fresh["status"] not in FINISHED:  # a cancel asked for, but not recorded as cancelled yet
            fresh = m.jobs.update(job.tenant, job.id, lambda r: None if r["status"] in FINISHED else
                                  {**r, "cancel_requested": True, "status": "cancelled", "finished_at": int(m.clock())})
        with job.lock:
            job.record.update(status=fresh["status"], finished_at=fresh["finished_at"], cancel_requested=True)
        log.info("tuning job %s: cancelled while validating its data; stopped tokenizing", job.id)
        job.event("Job cancelled while its data was being validated")
        m.flush(job, fenced=True)
        m._finalize(job.tenant, job.id, job.record["finished_at"])
        m._forget(job)
