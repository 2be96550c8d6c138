"""One run of a tuning job on this replica (while it holds the lease): resume from the last
checkpoint if there is one, train, write checkpoints and events, publish the result.

A checkpoint is written every `checkpoint_every` steps, at each new best eval loss, and when early
stopping ends the run. It is two things: the trainer state to resume from (safetensors in the job's
keys) and a servable prompt version `<name>-ckpt@<version>` (a pinned, immutable store version).
Order: state object, prompt version, events chunk, then the record that lists all three.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from softserve.store.types import PromptMeta, QuotaExceeded
from softserve.tuning.data import DatasetError, TokenizedExample
from softserve.tuning.job import LeaseLost, TuningJob
from softserve.tuning.records import config_from_record
from softserve.tuning.trainer import PromptTuner, StepInfo, TuningCancelled

log = logging.getLogger("softserve.tuning")

__all__ = ["JobRun", "JobHost", "CheckpointStore", "CHECKPOINT_SUFFIX"]


class CheckpointStore(Protocol):
    """Where a run keeps its resume state (softserve.tuning.persist.JobStore)."""

    def write_checkpoint(self, tenant: str, job_id: str, step: int, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> str: ...

    def read_checkpoint(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...


@runtime_checkable
class JobHost(Protocol):
    """All a run needs from whoever owns its job (the TuningManager): the run never reaches into the
    owner's queues, threads or records beyond these."""

    replica_id: str
    jobs: CheckpointStore

    def interrupted(self, job: TuningJob) -> bool:
        """This replica stops (shutdown) or lost the job's lease: leave the job for its next run."""
        ...

    def examples(self, job: TuningJob, which: str) -> list[TokenizedExample]:
        """The job's "train" or "validation" examples, tokenized."""
        ...

    def make_tuner(self, job: TuningJob, on_progress: Callable[[StepInfo], None]) -> PromptTuner: ...

    def push_prompt(self, job: TuningJob, name: str, embeddings: torch.Tensor,
                    description: str) -> tuple[PromptMeta, list[str]]: ...

    def flush(self, job: TuningJob, *, change: Callable[[dict], None] | None = None, fenced: bool = False) -> None:
        """Persist the job's pending events and its record (with `change` applied)."""
        ...

    def finish(self, job: TuningJob, status: str, message: str, *, level: str = "info", **fields: Any) -> None:
        """Record the job's final status and clean up after it."""
        ...

CHECKPOINT_SUFFIX = "-ckpt"  # checkpoints are versions of "<name>-ckpt"


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


class JobRun:
    def __init__(self, host: JobHost, job: TuningJob) -> None:
        self.host, self.job = host, job
        self.config = config_from_record(job.record)
        self.tuner = None

    def run(self) -> None:
        host, job = self.host, self.job
        try:
            self._run()
        except LeaseLost:
            log.error("tuning job %s: lease lost; the replica that took it over continues", job.id)
        except TuningCancelled:
            if host.interrupted(job):
                with job.lock:
                    job.pending.clear()  # re-emitted by the run that resumes from the last checkpoint
                log.info("tuning job %s interrupted at step %s; it resumes from its last checkpoint", job.id,
                         self.tuner.steps_done if self.tuner else 0)
                return
            host.finish(job, "cancelled", f"Job cancelled at step {self.tuner.steps_done if self.tuner else 0}")
        except DatasetError as exc:
            host.finish(job, "failed", f"Data validation failed: {exc}", level="error",
                         error={"code": "invalid_training_data", "message": str(exc), "param": "training_file"})
        except QuotaExceeded as exc:  # the tenant's prompt or byte quota: no result (or checkpoint) prompt stored
            host.finish(job, "failed", f"Job failed: {exc.message}", level="error",
                         error={"code": exc.code, "message": exc.message, "param": None})
        except Exception as exc:
            if host.interrupted(job):
                return
            log.exception("tuning job %s failed", job.id)
            host.finish(job, "failed", f"Job failed: {type(exc).__name__}: {exc}", level="error",
                         error={"code": "tuning_failed", "message": f"{type(exc).__name__}: {exc}", "param": None})

    def _run(self) -> None:
        host, job, rec = self.host, self.job, self.job.record
        if job.train is None:
            job.train, job.eval = host.examples(job, "train"), host.examples(job, "validation")
        tuner = self.tuner = host.make_tuner(job, self._on_progress)
        resumed_from = None
        if rec["checkpoints"]:
            last = rec["checkpoints"][-1]
            tensors, meta = host.jobs.read_checkpoint(last["state_key"])
            tuner.load_state(tensors, meta)
            resumed_from = last["step"]
        step0 = resumed_from or 0
        with job.lock:  # progress past the checkpoint was not kept: the run redoes it
            rec["loss_curve"] = [p for p in rec["loss_curve"] if p["step"] <= step0]
            rec["eval_curve"] = [p for p in rec["eval_curve"] if p["step"] <= step0]
            rec["step"], rec["trained_tokens"] = step0, tuner.tokens
        if resumed_from is not None:
            message = f"Resumed from the checkpoint at step {resumed_from} on {host.replica_id}"
        elif rec["runs"]:
            message = f"Restarted from step 0 on {host.replica_id} (the previous run stopped before its first checkpoint)"
        else:
            message = f"Started on {host.replica_id}: {self.config.steps} steps, {len(job.train)} training examples"
        job.event(message, data={"step": step0, "replica": host.replica_id})
        now = int(time.time())
        host.flush(job, fenced=True, change=lambda r: r.update(status="running", started_at=r["started_at"] or now,
                                                               runs=r["runs"] + 1, replica=host.replica_id))
        result = tuner.run()

        use_best = self.config.result_prompt == "best" and result.best_step is not None
        result_step = result.best_step if use_best else result.steps_done
        meta, warnings = host.push_prompt(job, rec["name"], result.embeddings,
                                          rec["description"] or f"prompt tuning job {job.id}")
        outcome = {"name": meta.name, "version": meta.version, "ref": meta.ref, "sha256": meta.sha256, "step": result_step}
        host.finish(job, "succeeded", f"Job succeeded: {meta.ref} (the prompt of step {result_step})",
                     result=outcome, warnings=warnings, step=result.steps_done, trained_tokens=result.trained_tokens,
                     stopped_early=result.stopped_early)

    # ---- progress / checkpoints -------------------------------------------------------------------
    def _on_progress(self, info: StepInfo) -> None:
        job, rec = self.job, self.job.record
        with job.lock:
            rec["step"], rec["trained_tokens"] = info.step, info.tokens
            if info.loss is not None:
                rec["loss_curve"].append({"step": info.step, "loss": _round(info.loss)})
            if info.eval_loss is not None:
                rec["eval_curve"].append({"step": info.step, "eval_loss": _round(info.eval_loss),
                                          "eval_accuracy": info.eval_accuracy})
            rec["estimated_finish"] = int(time.time() + info.eta_s) if info.eta_s is not None else None
        data = {"step": info.step, "total_steps": info.total_steps, "train_loss": _round(info.loss),
                "learning_rate": info.learning_rate, "trained_tokens": info.tokens}
        if info.eval_loss is not None:
            data.update(eval_loss=_round(info.eval_loss), eval_accuracy=info.eval_accuracy)
        job.event(info.line(), type="metrics", data=data)
        if info.stopping:
            job.event(f"Early stopping at step {info.step}: eval loss did not improve in "
                      f"{self.config.early_stopping_patience} evaluations (best {self.tuner.best_eval_loss:.4f} "
                      f"at step {self.tuner.best_step})", data={"step": info.step, "best_step": self.tuner.best_step})
        every = rec["checkpoint_every"]
        if info.step and (info.step % every == 0 or info.is_best or info.stopping):
            self._checkpoint(info)

    def _checkpoint(self, info: StepInfo) -> None:
        host, job, tuner = self.host, self.job, self.tuner
        if host.interrupted(job):
            return
        tensors, meta = tuner.state()
        key = host.jobs.write_checkpoint(job.tenant, job.id, info.step, tensors, meta)
        name = job.record["name"] + CHECKPOINT_SUFFIX
        pmeta, _ = host.push_prompt(job, name, tensors["prompt"],
                                    f"checkpoint of tuning job {job.id} at step {info.step}")
        metrics = {"step": info.step, "train_loss": _round(info.loss), "eval_loss": _round(tuner.last_eval[0]),
                   "eval_accuracy": tuner.last_eval[1]}
        ckpt = {"id": f"tuneckpt-{job.id.removeprefix('tunejob-')}-{info.step:08d}", "created_at": int(time.time()),
                "step": info.step, "state_key": key, "metrics": metrics,
                "prompt": {"name": pmeta.name, "version": pmeta.version, "ref": pmeta.ref}}
        best = None
        if tuner.best_step is not None:
            best = {"step": tuner.best_step, "eval_loss": _round(tuner.best_eval_loss)}
        job.event(f"Checkpoint at step {info.step}: {pmeta.ref}", data={"step": info.step, "checkpoint": ckpt["id"],
                                                                        "fine_tuned_model_checkpoint": pmeta.ref})

        def change(r):
            r["checkpoints"] = [c for c in r["checkpoints"] if c["step"] < info.step] + [ckpt]
            r["best"] = best

        host.flush(job, fenced=True, change=change)
