"""Tuning jobs inside the server: uploaded training files, a job queue, worker thread(s).

Jobs train on the resident model object the engine serves from (no copy): each training unit takes
the engine's `step_lock`, and while requests are being served the worker throttles itself so that
training gets at most `train_share_when_busy` of wall time (serving keeps most of the machine).

Files live in the prompt store's backend (`tenants/<tenant>/files/<id>.jsonl` + `.json`), so they
persist like prompts. Jobs live in memory: a restart forgets them (their results are store versions).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from prompt_store.store import PromptStore, validate_name
from prompt_store.types import PromptMeta
from server.tuning.data import DatasetError, TokenizedExample, parse_jsonl
from server.tuning.export import adapter_files, model_info, push_to_store
from server.tuning.trainer import PromptTuner, StepInfo, TuningCancelled, TuningConfig

log = logging.getLogger("softserve.tuning")

__all__ = ["TuningFile", "FileRegistry", "TuningJob", "TuningManager", "QueueFull", "JOB_STATUSES"]

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FILE_PURPOSES = ("tune", "fine-tune")


class QueueFull(Exception):
    pass


# ---- files ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuningFile:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    num_examples: int
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "num_examples": self.num_examples}


class FileRegistry:
    """Uploaded JSONL files, validated (JSON + record shape, with line numbers) at upload."""

    def __init__(self, backend, max_bytes: int = 64 * 1024 * 1024) -> None:
        self.backend = backend
        self.max_bytes = max_bytes

    @staticmethod
    def _key(tenant: str, file_id: str, ext: str) -> str:
        return f"tenants/{tenant}/files/{file_id}.{ext}"

    def create(self, tenant: str, filename: str, purpose: str, data: bytes) -> TuningFile:
        validate_name(tenant, "tenant")
        if purpose not in FILE_PURPOSES:
            raise DatasetError(f"purpose must be one of {list(FILE_PURPOSES)}, got {purpose!r}", source="purpose")
        if len(data) > self.max_bytes:
            raise DatasetError(f"file is {len(data)} bytes; the limit is {self.max_bytes}", source=filename or "file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetError("file is not UTF-8 text", source=filename or "file") from None
        examples = parse_jsonl(text, source=filename or "file")
        file_id = "file-" + uuid.uuid4().hex[:24]
        meta = TuningFile(id=file_id, tenant=tenant, filename=(filename or "data.jsonl")[:255], purpose=purpose,
                          bytes=len(data), num_examples=len(examples), created_at=int(time.time()))
        self.backend.put(self._key(tenant, file_id, "jsonl"), data)
        self.backend.put(self._key(tenant, file_id, "json"), json.dumps(meta.__dict__).encode())
        return meta

    def get(self, tenant: str, file_id: str) -> TuningFile:
        if not isinstance(file_id, str) or not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise KeyError(file_id)
        try:
            raw = self.backend.get(self._key(tenant, file_id, "json"))
        except (KeyError, ValueError):
            raise KeyError(file_id) from None
        return TuningFile(**json.loads(raw))

    def read_text(self, tenant: str, file_id: str) -> str:
        self.get(tenant, file_id)
        return self.backend.get(self._key(tenant, file_id, "jsonl")).decode("utf-8")

    def list(self, tenant: str) -> list[TuningFile]:
        validate_name(tenant, "tenant")
        out = []
        for key in self.backend.list(f"tenants/{tenant}/files/"):
            if key.endswith(".json"):
                try:
                    out.append(TuningFile(**json.loads(self.backend.get(key))))
                except KeyError:
                    continue
        return sorted(out, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, tenant: str, file_id: str) -> None:
        self.get(tenant, file_id)
        self.backend.delete(self._key(tenant, file_id, "jsonl"))
        self.backend.delete(self._key(tenant, file_id, "json"))


# ---- jobs ----------------------------------------------------------------------------------------
@dataclass
class TuningJob:
    id: str
    tenant: str
    namespace: str  # where the prompt is written (the tenant, or `public` for admins)
    name: str
    model: str
    config: TuningConfig
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    training_file: str | None = None
    validation_file: str | None = None
    description: str | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    started_at: int | None = None
    finished_at: int | None = None
    step: int = 0
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    eta_s: float | None = None
    trained_tokens: int = 0
    result: PromptMeta | None = None
    warnings: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    done_event: threading.Event = field(default_factory=threading.Event)

    @property
    def is_finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    def on_progress(self, info: StepInfo) -> None:
        self.step = info.step
        if info.loss is not None:
            self.loss_curve.append({"step": info.step, "loss": round(info.loss, 6)})
        if info.eval_loss is not None:
            self.eval_curve.append({"step": info.step, "eval_loss": round(info.eval_loss, 6),
                                    "eval_accuracy": info.eval_accuracy})
        self.eta_s = info.eta_s
        self.trained_tokens = info.tokens

    def to_dict(self, queue_position: int | None = None) -> dict[str, Any]:
        c = self.config
        prefix = "public/" if self.namespace != self.tenant else ""
        last_eval = self.eval_curve[-1] if self.eval_curve else None
        result = None
        if self.result is not None:
            result = {"name": prefix + self.result.name, "version": self.result.version,
                      "ref": prefix + self.result.ref, "sha256": self.result.sha256}
        eta = self.eta_s if self.status == "running" else None
        return {
            "id": self.id,
            "object": "tuning.job",
            "model": self.model,
            "name": prefix + self.name,
            "status": self.status,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "hyperparameters": {
                "num_virtual_tokens": c.num_virtual_tokens, "init": c.init, "init_text": c.init_text,
                "steps": c.steps, "learning_rate": c.learning_rate, "batch_size": c.batch_size,
                "micro_batch_size": c.micro_batch_size, "warmup_steps": c.warmup_steps,
                "lr_schedule": c.lr_schedule, "weight_decay": c.weight_decay, "eval_every": c.eval_every,
            },
            "seed": c.seed,
            "num_examples": {"train": len(self.train), "validation": len(self.eval)},
            "step": self.step,
            "total_steps": c.steps,
            "loss": self.loss_curve[-1]["loss"] if self.loss_curve else None,
            "loss_curve": list(self.loss_curve),
            "eval_curve": list(self.eval_curve),
            "metrics": {"eval_loss": last_eval["eval_loss"], "eval_accuracy": last_eval["eval_accuracy"]} if last_eval else None,
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "estimated_finish": int(time.time() + eta) if eta is not None else None,
            "trained_tokens": self.trained_tokens,
            "fine_tuned_model": result["ref"] if result else None,
            "result_prompt": result,
            "warnings": list(self.warnings),
            "error": self.error,
            "queue_position": queue_position,
        }


class TuningManager:
    """Owns the job queue and worker thread(s). `step_lock` must be the engine's lock."""

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
        max_queued: int = 16,
        max_active_per_tenant: int = 2,
        train_share_when_busy: float = 0.5,
        keep_finished: int = 200,
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
        self.keep_finished = keep_finished
        self.files = FileRegistry(store.backend, store.max_upload_bytes)
        self._jobs: dict[str, TuningJob] = {}
        self._order: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._worker, name=f"softserve-tuning-{i}", daemon=True)
                         for i in range(max(1, max_concurrent))]
        for w in self._workers:
            w.start()

    # ---- public -------------------------------------------------------------------------------
    def submit(self, job: TuningJob) -> TuningJob:
        with self._lock:
            active = sum(1 for j in self._jobs.values() if j.tenant == job.tenant and j.status in ("queued", "running"))
            if active >= self.max_active_per_tenant:
                raise QueueFull(f"this tenant has {active} tuning jobs queued or running, the limit "
                                f"(--max-tuning-jobs-per-tenant); wait for one to finish or cancel one")
            queued = sum(1 for j in self._jobs.values() if j.status == "queued")
            if queued >= self.max_queued:
                raise QueueFull(f"too many queued tuning jobs ({queued}, --max-tuning-queue); try again later")
            self._jobs[job.id] = job
            self._order.append(job.id)
            self._trim()
        self._queue.put(job.id)
        return job

    def get(self, tenant: str, job_id: str) -> TuningJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None or job.tenant != tenant:
            raise KeyError(job_id)
        return job

    def list(self, tenant: str) -> list[TuningJob]:
        with self._lock:
            return [self._jobs[i] for i in reversed(self._order) if self._jobs[i].tenant == tenant]

    def queue_position(self, job: TuningJob) -> int | None:
        if job.status != "queued":
            return None
        with self._lock:
            queued = [i for i in self._order if self._jobs[i].status == "queued"]
        return queued.index(job.id) if job.id in queued else None

    def cancel(self, tenant: str, job_id: str, wait_s: float = 10.0) -> TuningJob:
        job = self.get(tenant, job_id)
        with self._lock:
            if job.status == "queued":
                job.status = "cancelled"
                job.finished_at = int(time.time())
                job.done_event.set()
        job.cancel_event.set()
        job.done_event.wait(wait_s)
        return job

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel_event.set()
        for _ in self._workers:
            self._queue.put(None)
        for w in self._workers:
            w.join(5)

    # ---- worker -------------------------------------------------------------------------------
    def _trim(self) -> None:
        finished = [i for i in self._order if self._jobs[i].is_finished]
        for job_id in finished[: max(0, len(finished) - self.keep_finished)]:
            self._order.remove(job_id)
            del self._jobs[job_id]

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
            job_id = self._queue.get()
            if job_id is None:
                return
            with self._lock:
                job = self._jobs.get(job_id)
                if job is None or job.status != "queued":
                    continue
                job.status = "running"
                job.started_at = int(time.time())
            try:
                self._run(job)
            except Exception:  # never let a job kill the worker
                log.exception("tuning job %s crashed", job.id)

    def _run(self, job: TuningJob) -> None:
        log.info("tuning job %s: %s/%s, %d steps on %d examples", job.id, job.namespace, job.name, job.config.steps, len(job.train))
        try:
            tuner = PromptTuner(self.model, self.tokenizer, job.train, job.eval, job.config,
                                step_lock=self.step_lock, on_progress=job.on_progress,
                                should_stop=job.cancel_event.is_set, yield_fn=self._yield)
            result = tuner.run()
            files = adapter_files(result.embeddings, job.config, self.info)  # tokenizer: the public model name, not its install path
            meta, warnings = push_to_store(self.store, job.namespace, job.name, files,
                                           description=job.description or f"prompt tuning job {job.id}")
            job.result, job.warnings = meta, warnings
            job.status = "succeeded"
            log.info("tuning job %s succeeded: %s", job.id, meta.ref)
        except TuningCancelled:
            job.status = "cancelled"
            log.info("tuning job %s cancelled at step %d", job.id, job.step)
        except Exception as exc:
            job.status = "failed"
            job.error = {"code": "tuning_failed", "message": f"{type(exc).__name__}: {exc}", "param": None}
            log.exception("tuning job %s failed", job.id)
        finally:
            job.eta_s = None
            job.finished_at = int(time.time())
            job.done_event.set()


def new_job_id() -> str:
    return "tunejob-" + uuid.uuid4().hex[:24]
