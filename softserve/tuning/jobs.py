"""Tuning jobs inside the server, persisted in the store so they survive restarts and replicas.

Jobs train on the resident model object the engine serves from (no copy): each training unit takes
the engine's `step_lock`, and while requests are being served the worker throttles itself so that
training gets at most `train_share_when_busy` of wall time (serving keeps most of the machine).

Life of a job: `validating_files` (tokenize the data copy) -> `queued` -> `running` -> succeeded |
failed | cancelled. Record, events and resume checkpoints live in the backend (softserve/tuning/persist.py).
A replica runs a job only while it holds the job's lease (compare-and-swap, renewed every third
of its lifetime); a replica that dies stops renewing, the lease expires, and any replica's scan
(every `scan_seconds`, and once at start-up) picks the job up again and resumes it from its last
checkpoint. Events after that checkpoint were never persisted, so the resumed run re-emits them:
the stored event list stays complete, ordered and free of duplicates.

A finished job's resume state (checkpoints/, the optimizer moments) is deleted by whoever wrote the
finished record, right after it; one that crashed in between leaves the job in tuning/active/, and a
scan finishes the clean-up. `retention_seconds` after it finished, a sweep (in the scanner, on any
replica, idempotent) deletes the job entirely; the prompts it published stay.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable

from softserve.store import keys
from softserve.store.store import PromptStore
from softserve.store.types import PromptMeta, PromptNotFound
from softserve.config import setting_default
from softserve.tuning.data import TokenizedExample, parse_jsonl, tokenize_examples
from softserve.tuning.export import adapter_files, model_info, push_to_store
from softserve.tuning.files import FileRegistry
from softserve.tuning.job import LeaseLost, QueueFull, TuningJob
from softserve.engine.compute_threads import run_in_compute_thread
from softserve.tuning.pack import TrainingPack
from softserve.tuning.persist import JobStore, Lease, new_replica_id
from softserve.tuning.records import FINISHED, JOB_STATUSES, config_from_record, job_view
from softserve.tuning.runner import CHECKPOINT_SUFFIX, JobRun
from softserve.tuning.trainer import PromptTuner, StepInfo
from softserve.tuning.validation import Validator

log = logging.getLogger("softserve.tuning")

__all__ = ["TuningManager"]


SWEEP_SECONDS = 60.0  # retention sweeps at most this often (each lists tuning/finished/)


class TuningManager:
    """Owns the job queue, the worker thread(s), the validators (validation.py) and a scanner. `step_lock` must be the
    engine's lock."""

    def __init__(
        self,
        model,
        tokenizer,
        store: PromptStore,
        *,
        model_name: str,
        step_lock=None,
        is_busy: Callable[[], bool] = lambda: False,
        max_concurrent: int = 1,
        pack_jobs: int = setting_default("tuning_pack_jobs"),
        max_queued: int = setting_default("max_tuning_queue"),
        max_active_per_tenant: int = setting_default("max_tuning_jobs_per_tenant"),
        train_share_when_busy: float = 0.5,
        lease_seconds: float = setting_default("tuning_lease_seconds"),
        scan_seconds: float = setting_default("tuning_scan_seconds"),
        replica_id: str | None = None,
        retention_seconds: float = setting_default("tuning_job_retention_seconds"),
        max_finished_per_tenant: int = setting_default("max_finished_tuning_jobs_per_tenant"),
        max_examples: int = setting_default("max_tuning_examples"),
        validation_workers: int = setting_default("tuning_validation_workers"),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.model_name = model_name
        self.info = model_info(model, model_name)
        self.step_lock = step_lock if step_lock is not None else threading.Lock()
        self.is_busy = is_busy
        self.max_queued = max_queued
        self.max_active_per_tenant = max_active_per_tenant  # queued + running, so one tenant cannot fill the queue
        self.train_share_when_busy = min(1.0, max(0.01, train_share_when_busy))
        self.replica_id = replica_id or new_replica_id()
        self.jobs = JobStore(store.backend, owner=self.replica_id, lease_seconds=lease_seconds)
        self.jobs.usage = store.usage  # removing a finished job gives its counted data bytes back
        self.scan_seconds = scan_seconds
        self.retention_seconds = float(retention_seconds)  # 0: finished jobs are kept forever
        self.clock = clock  # finished_at and the retention sweep (tests move it; leases use the wall clock)
        self._index_ready = False  # this process saw the finished index complete (FINISHED_INDEX_READY)
        self._next_sweep = 0.0
        self.max_finished_per_tenant = max_finished_per_tenant  # 0: no cap (retention by age only)
        self.max_examples = max_examples  # per file or inline list (parse_jsonl stops at the one past it)
        self.files = FileRegistry(store.backend, store.max_upload_bytes, usage=store.usage, max_examples=max_examples)
        # (meta, tenant) of each job's published result prompt (not its checkpoints): the service warms its KV
        self.on_result_published: Callable[[PromptMeta, str], None] | None = None
        self._local: dict[str, TuningJob] = {}
        self._claimed: set[str] = set()  # ids queued here, being validated or run here
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Up to `pack_jobs` jobs run at once, one worker thread each, and share every forward/backward.
        self.pack = TrainingPack.for_model(model, tokenizer, step_lock=self.step_lock, is_busy=is_busy) \
            if pack_jobs > 1 else None
        self._threads = [threading.Thread(target=self._worker, name=f"softserve-tuning-{i}", daemon=True)
                         for i in range(max(1, max_concurrent, pack_jobs))]
        self._threads.append(threading.Thread(target=self._scanner, name="softserve-tuning-scan", daemon=True))
        for t in self._threads:
            t.start()
        self.validator = Validator(self, validation_workers)  # fair between tenants, stops on cancel

    # ---- public -------------------------------------------------------------------------------
    def submit(self, record: dict[str, Any], texts: dict[str, str]) -> TuningJob:
        """Persist a new job (status validating_files) and validate it in the background. A job whose
        result would be a new prompt name past the tenant's quota is refused now (PromptQuotaExceeded),
        not after its training; its checkpoint name is checked when the first checkpoint is stored."""
        try:
            self.store.resolve(record["namespace"], record["name"])
        except PromptNotFound:
            self.store.usage.check(record["namespace"], new_prompts=1)
        # The job's copy of its data is the tenant's storage until retention removes it (issue #26 F3: it
        # was never counted, and create+cancel rounds filled the disk past the quota). Counted before
        # anything is written: 413 storage_quota_exceeded when over; given back if the job is refused.
        record["data_bytes"] = sum(len(text.encode("utf-8")) for text in texts.values())
        self.store.usage.reserve_file_bytes(record["namespace"], record["data_bytes"])
        try:
            return self._admit(record, texts)
        except BaseException:
            self.store.usage.add(record["namespace"], file_bytes=-record["data_bytes"])
            raise

    def _admit(self, record: dict[str, Any], texts: dict[str, str]) -> TuningJob:
        tenant = record["tenant"]
        # Every replica's unfinished jobs of this tenant, from the store (issue #26 F7: counting only this
        # replica's let each of N replicas accept the limit). Two replicas admitting at the same instant
        # can still both pass: the limit is exact per replica, and across replicas up to that race.
        elsewhere = {job_id for owner, job_id in self.jobs.active() if owner == tenant}
        with self._lock:
            mine = {j.id for j in self._local.values()
                    if j.tenant == tenant and j.status in ("validating_files", "queued", "running")}
            finished_here = {j.id for j in self._local.values() if j.tenant == tenant} - mine
            active = len(mine | (elsewhere - finished_here))
            if active >= self.max_active_per_tenant:
                raise QueueFull(f"this tenant has {active} tuning jobs queued or running, the limit "
                                f"(--max-tuning-jobs-per-tenant); wait for one to finish or cancel one")
            waiting = sum(1 for j in self._local.values() if j.status in ("validating_files", "queued"))
            if waiting >= self.max_queued:
                raise QueueFull(f"too many queued tuning jobs ({waiting}, --max-tuning-queue); try again later")
            job = TuningJob(record=record, texts=texts)
            self._local[job.id] = job
            self._claimed.add(job.id)
        job.event(f"Created tuning job {job.id} for prompt {record['name']!r}")
        with job.lock:
            events, job.pending = job.pending, []
        record["event_chunks"] = [self.jobs.write_events(job.tenant, job.id, events)]
        record["next_event_seq"] = job.seq
        self.jobs.create(record, texts)
        self.validator.put(job.tenant, job.id)
        return job

    def get(self, tenant: str, job_id: str) -> dict[str, Any]:
        """The job's current record (this replica's live copy if it runs it, else the store's)."""
        with self._lock:
            job = self._local.get(job_id)
        if job is not None:
            if job.tenant != tenant:
                raise KeyError(job_id)
            with job.lock:
                return dict(job.record)
        if not keys.is_generated_id(job_id, "tunejob-"):
            raise KeyError(job_id)
        return self.jobs.read(tenant, job_id)

    def list(self, tenant: str) -> list[dict[str, Any]]:
        records = {r["id"]: r for r in self.jobs.list(tenant)}
        with self._lock:
            local = [j for j in self._local.values() if j.tenant == tenant]
        for job in local:
            with job.lock:
                records[job.id] = dict(job.record)
        return sorted(records.values(), key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def view(self, record: dict[str, Any]) -> dict[str, Any]:
        return job_view(record, self.queue_position(record))

    def queue_position(self, record: dict[str, Any]) -> int | None:
        if record["status"] != "queued":
            return None
        with self._lock:
            queued = sorted((j.record["created_at"], j.id) for j in self._local.values() if j.status == "queued")
        ids = [i for _, i in queued]
        return ids.index(record["id"]) if record["id"] in ids else None

    def events(self, tenant: str, job_id: str) -> list[dict[str, Any]]:
        """All events, oldest first: the stored ones plus this replica's not yet persisted ones."""
        with self._lock:
            job = self._local.get(job_id)
        pending: list[dict[str, Any]] = []
        if job is not None and job.tenant == tenant:
            # The record and the pending events in one snapshot: read apart, a flush that lands in between
            # (its chunk not in the record read, its events no longer pending) would drop events from the
            # answer, as it dropped a finished job's "Job succeeded".
            with job.lock:
                record = dict(job.record)
                pending = [e for e in job.pending if e["seq"] >= record["next_event_seq"]]
        else:
            record = self.get(tenant, job_id)  # KeyError for another tenant's job
        return self.jobs.read_events(tenant, job_id, record["event_chunks"], record["next_event_seq"]) + pending

    def cancel(self, tenant: str, job_id: str, wait_s: float = 10.0) -> dict[str, Any]:
        record = self.get(tenant, job_id)  # KeyError for another tenant's job

        def request(rec):
            if rec["status"] in FINISHED:
                return None
            rec["cancel_requested"] = True
            if rec["status"] in ("validating_files", "queued"):
                rec.update(status="cancelled", finished_at=int(self.clock()))
            return rec

        record = self.jobs.update(tenant, job_id, request)
        with self._lock:
            job = self._local.get(job_id)
        if job is not None:
            job.cancel_event.set()
            with job.lock:
                job.record.update(cancel_requested=True)
                if record["status"] == "cancelled" and job.status != "running":
                    job.record.update(status="cancelled", finished_at=record["finished_at"])
            if job.status == "running":
                job.done_event.wait(wait_s)
        if record["status"] == "cancelled" and self.jobs.lease_holder(tenant, job_id) is None:
            self._finalize(tenant, job_id, record["finished_at"])  # else the lease holder (or a scan) does
        return self.get(tenant, job_id)

    def close(self) -> None:
        """Stop: a running job is interrupted (not cancelled) and its lease released, so this replica
        after a restart, or another one, resumes it from its last checkpoint."""
        self._stop.set()
        self.validator.close()
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads + self.validator.threads:
            t.join(10)

    def job_counts(self) -> dict[str, int]:
        """Unfinished jobs this replica holds, by status (a finished job is forgotten here at once, so
        finished counts would always read 0; the store keeps the records)."""
        with self._lock:
            jobs = list(self._local.values())
        counts = {status: 0 for status in JOB_STATUSES if status not in FINISHED}
        for job in jobs:
            if job.status in counts:
                counts[job.status] += 1
        return counts

    # ---- persistence helpers ------------------------------------------------------------------
    def flush(self, job: TuningJob, *, change: Callable[[dict], None] | None = None, fenced: bool = False) -> None:
        """Write pending events as one chunk, then (CAS) the record listing it, with `change` applied
        to both the local and the stored record. `fenced`: only while this replica holds the lease
        (a replica that lost it must not overwrite the new runner's record)."""
        with job.lock:
            # Pending events stay readable (events()) until the record lists their chunk: a reader that
            # already sees the new status (e.g. succeeded) must also see the event that announces it.
            events = list(job.pending)
            if change is not None:
                change(job.record)
            local = dict(job.record)
        chunk = self.jobs.write_events(job.tenant, job.id, events) if events else None

        def merge(stored):
            if fenced and self.jobs.lease_holder(job.tenant, job.id) != self.replica_id:
                job.lost_lease.set()
                raise LeaseLost(job.id)
            cancel = stored["cancel_requested"]
            new = {**local, "cancel_requested": cancel or local["cancel_requested"]}
            if stored["status"] == "cancelled":  # cancelled while queued (maybe on another replica)
                # The cancel wins whole: never "cancelled" with the error of a failure found after it (#26).
                new.update(status="cancelled", finished_at=stored["finished_at"], error=stored.get("error"))
            listed = list(stored["event_chunks"])
            new["event_chunks"] = listed + ([chunk] if chunk is not None and chunk not in listed else [])
            new["next_event_seq"] = events[-1]["seq"] + 1 if events else stored["next_event_seq"]
            return new

        stored = self.jobs.update(job.tenant, job.id, merge)
        with job.lock:
            job.record.update(event_chunks=stored["event_chunks"], next_event_seq=stored["next_event_seq"],
                              cancel_requested=stored["cancel_requested"], status=stored["status"],
                              finished_at=stored["finished_at"], error=stored.get("error"))
            job.pending = [e for e in job.pending if e["seq"] >= stored["next_event_seq"]]
        if stored["cancel_requested"]:
            job.cancel_event.set()

    def finish(self, job: TuningJob, status: str, message: str, *, level: str = "info", **fields) -> None:
        """Final status (the caller holds the lease)."""
        job.event(message, level=level)
        self.flush(job, fenced=True, change=lambda r: r.update(status=status, finished_at=int(self.clock()),
                                                                estimated_finish=None, **fields))
        self._finalize(job.tenant, job.id, job.record["finished_at"])

    def _finalize(self, tenant: str, job_id: str, finished_at: float | None) -> bool:
        """After the finished record is written: delete the resume state, index the job as finished,
        and only then drop it from tuning/active/, so a crash (or a store error) in between leaves
        it there for a scan to finish. Never raises: the job's outcome is already recorded."""
        try:
            freed = self.jobs.delete_resume_state(tenant, job_id)
            self.jobs.mark_finished(tenant, job_id, finished_at if finished_at is not None else self.clock())
            self.jobs.deactivate(job_id)
        except Exception:
            log.exception("tuning job %s: deleting its resume state failed; a later scan retries", job_id)
            return False
        if freed:
            log.info("tuning job %s finished: deleted %d bytes of resume state", job_id, freed)
        self._cap_finished(tenant)
        return True

    def _cap_finished(self, tenant: str | None = None) -> int:
        """Delete the oldest finished jobs of a tenant (or of every tenant) beyond
        `max_finished_per_tenant` (issue #26 F3: create+cancel rounds kept every job for the whole
        retention period). Never raises: the next finish or sweep retries."""
        if self.max_finished_per_tenant <= 0:
            return 0
        try:
            removed, freed = self.jobs.remove_beyond(self.max_finished_per_tenant, tenant)
        except Exception:
            log.exception("tuning jobs: deleting finished jobs beyond --max-finished-tuning-jobs-per-tenant failed")
            return 0
        if removed:
            log.info("tuning jobs: removed %d finished jobs beyond %d per tenant (%d bytes)", removed,
                     self.max_finished_per_tenant, freed)
        return removed

    def _load_job(self, tenant: str, job_id: str) -> TuningJob:
        with self._lock:
            job = self._local.get(job_id)
        if job is None:
            record = self.jobs.read(tenant, job_id)
            job = TuningJob(record=record, seq=record["next_event_seq"])
            with self._lock:
                self._local[job_id] = job
        return job

    def _forget(self, job: TuningJob) -> None:
        job.done_event.set()
        self._release_claim(job.id)

    def _release_claim(self, job_id: str) -> None:
        """This replica no longer handles the job (done, or another replica has it): drop the local
        copy so reads go to the store."""
        with self._lock:
            self._claimed.discard(job_id)
            job = self._local.pop(job_id, None)
        if job is not None:
            job.done_event.set()

    # ---- validation (softserve/tuning/validation.py runs it) -----------------------------------
    def examples(self, job: TuningJob, which: str, should_stop: Callable[[], bool] | None = None) -> list[TokenizedExample]:
        text = job.texts.get(which)
        if text is None:
            text = self.jobs.read_data(job.tenant, job.id, which)
        if text is None:
            return []
        source = job.record["training_file" if which == "train" else "validation_file"] or \
            ("training_data" if which == "train" else "validation_data")
        return tokenize_examples(self.tokenizer, parse_jsonl(text, source=source, max_examples=self.max_examples,
                                                             should_stop=should_stop),
                                 max_length=job.record["config"]["max_length"], source=source, should_stop=should_stop)

    def enqueue_run(self, tenant: str, job_id: str) -> None:
        """A validated (queued) job goes to the training workers."""
        self._queue.put((tenant, job_id))

    # ---- scanner ------------------------------------------------------------------------------
    def _scanner(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                log.exception("tuning job scan failed")
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + max(self.scan_seconds, SWEEP_SECONDS)
                try:
                    self.sweep()
                except Exception:
                    log.exception("tuning job retention sweep failed")
            self._stop.wait(self.scan_seconds)

    def scan(self) -> None:
        """Take up unfinished jobs nobody runs: after a restart, or when a replica died."""
        for tenant, job_id in sorted(self.jobs.active(), key=lambda t: t[1]):
            with self._lock:
                if job_id in self._claimed:
                    continue
            try:
                record = self.jobs.read(tenant, job_id)
            except KeyError:
                continue
            holder = self.jobs.lease_holder(tenant, job_id)
            if holder is not None and holder != self.replica_id:
                continue  # its runner finishes it, or cleans up after finishing it
            # A live lease in our own name on a job we do not claim: this replica (same
            # --tuning-replica-id) was restarted and its last run died; take the job back now.
            if record["status"] in FINISHED:  # its finisher died before the clean-up
                self._finalize(tenant, job_id, record["finished_at"])
                continue
            with self._lock:
                if job_id in self._claimed:
                    continue
                self._claimed.add(job_id)
            log.info("tuning job %s (%s) found without a live lease: taking it up", job_id, record["status"])
            if record["status"] == "validating_files":
                self.validator.put(tenant, job_id)
            else:
                self._queue.put((tenant, job_id))

    def sweep(self, now: float | None = None) -> int:
        """Delete every finished job that finished more than `retention_seconds` before `now` (default:
        the clock): record, data copy, events, lease; and each tenant's oldest finished jobs beyond
        `max_finished_per_tenant` (each finish also trims its tenant's). Any number of replicas may
        sweep at once. Returns the number of jobs removed. The first sweep on a store also indexes (and drops the
        resume state of) jobs that finished before the finished index existed."""
        if not self._index_ready:
            self._index_ready = self.jobs.index_legacy_finished()
        capped = self._cap_finished()
        if self.retention_seconds <= 0:
            return capped
        cutoff = (self.clock() if now is None else now) - self.retention_seconds
        removed, freed = self.jobs.remove_finished_before(cutoff)
        if removed:
            log.info("tuning job retention: removed %d jobs finished over %.0f s ago (%d bytes)", removed,
                     self.retention_seconds, freed)
        return removed + capped

    # ---- worker -------------------------------------------------------------------------------
    def _yield(self, busy_s: float) -> None:
        """After each training unit: let the engine in; while it has work, keep training's share of
        wall time at most `train_share_when_busy`."""
        if self.is_busy():
            share = self.train_share_when_busy
            time.sleep(busy_s * (1.0 - share) / share)
        else:
            time.sleep(0)

    def _worker(self) -> None:
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                return
            tenant, job_id = item
            lease = self.jobs.acquire(tenant, job_id)
            if lease is None:  # another replica runs it
                self._release_claim(job_id)
                continue
            job = None
            try:
                job = self._load_job(tenant, job_id)
                # a fresh compute thread per job: its OpenMP pool goes when the job ends (compute_threads.py)
                run_in_compute_thread(self._run, job, lease, name=f"softserve-tuning-job-{job_id}")
            except Exception:  # never let a job kill the worker
                log.exception("tuning job %s crashed", job_id)
            finally:
                self.jobs.release(lease)
                self._release_claim(job_id)

    def _heartbeat(self, job: TuningJob, lease: Lease, stop: threading.Event) -> None:
        while not stop.wait(self.jobs.lease_seconds / 3):
            try:
                if not self.jobs.renew(lease):
                    log.error("tuning job %s: lease lost (another replica took it); stopping here", job.id)
                    job.lost_lease.set()
                    return
                if self.jobs.read(job.tenant, job.id)["cancel_requested"]:
                    job.cancel_event.set()
            except Exception:
                log.exception("tuning job %s: lease renewal failed", job.id)

    def _run(self, job: TuningJob, lease: Lease) -> None:
        fresh = self.jobs.read(job.tenant, job.id)
        with job.lock:
            job.record.update(status=fresh["status"], cancel_requested=fresh["cancel_requested"])
        if job.status in FINISHED:
            self._finalize(job.tenant, job.id, fresh["finished_at"])
            return
        if job.record["cancel_requested"]:
            self.finish(job, "cancelled", "Job cancelled before it started")
            return
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job, lease, stop), daemon=True,
                                name=f"softserve-tuning-lease-{job.id[-6:]}")
        beat.start()
        try:
            JobRun(self, job).run()
        finally:
            stop.set()
            beat.join(5)

    def interrupted(self, job: TuningJob) -> bool:
        return self._stop.is_set() or job.lost_lease.is_set()

    def make_tuner(self, job: TuningJob, on_progress: Callable[[StepInfo], None]) -> PromptTuner:
        return PromptTuner(self.model, self.tokenizer, job.train, job.eval, config_from_record(job.record),
                           step_lock=self.step_lock, on_progress=on_progress,
                           should_stop=lambda: job.cancel_event.is_set() or self.interrupted(job),
                           yield_fn=self._yield, pack=self.pack)

    def push_prompt(self, job: TuningJob, name: str, embeddings, description: str):
        files = adapter_files(embeddings, config_from_record(job.record), self.info)  # tokenizer: the public model name, not its install path
        meta, warnings = push_to_store(self.store, job.record["namespace"], name, files, description=description)
        if self.on_result_published is not None and not name.endswith(CHECKPOINT_SUFFIX):
            self.on_result_published(meta, job.tenant)
        return meta, warnings
