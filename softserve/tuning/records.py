"""The tuning job record (what the store keeps, JSON) and its API shapes (after OpenAI's
fine-tuning jobs, events and checkpoints), plus what `"auto"` hyperparameters resolve to."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from softserve.tuning.config import TuningConfig

__all__ = ["JOB_STATUSES", "FINISHED", "new_record", "job_view", "event_view", "checkpoint_view", "make_event",
           "config_from_record", "resolve_auto", "AUTO_RULES"]

JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")

# What "auto" picks (documented in README "Tuning soft prompts"); n = number of training examples.
AUTO_RULES = {
    "batch_size": "min(8, n)",
    "steps": "3 epochs: ceil(3 * n / batch_size), clamped to [50, 1000]",
    "learning_rate": "3e-2 (AdamW; the PEFT prompt-tuning recipe this trainer matches)",
    "checkpoint_every": "eval_every when set, else ceil(steps / 10)",
}


def resolve_auto(n_train: int, *, batch_size, steps, learning_rate, checkpoint_every, eval_every: int) -> tuple[dict[str, Any], list[str]]:
    """Replace each "auto" by what AUTO_RULES says; returns (values, names that were auto)."""
    auto = [name for name, value in (("batch_size", batch_size), ("steps", steps), ("learning_rate", learning_rate),
                                     ("checkpoint_every", checkpoint_every)) if value == "auto"]
    if batch_size == "auto":
        batch_size = max(1, min(8, n_train))
    if steps == "auto":
        steps = min(1000, max(50, math.ceil(3 * n_train / batch_size)))
    if learning_rate == "auto":
        learning_rate = TuningConfig.learning_rate
    if checkpoint_every == "auto":
        checkpoint_every = eval_every or max(1, math.ceil(steps / 10))
    values = {"batch_size": int(batch_size), "steps": int(steps), "learning_rate": float(learning_rate),
              "checkpoint_every": int(checkpoint_every)}
    return values, auto


def new_record(*, job_id: str, tenant: str, namespace: str, name: str, model: str, config: TuningConfig,
               checkpoint_every: int, auto: list[str], num_examples: dict[str, int], training_file: str | None,
               validation_file: str | None, description: str | None, suffix: str | None,
               metadata: dict[str, str] | None) -> dict[str, Any]:
    return {
        "id": job_id, "tenant": tenant, "namespace": namespace, "name": name, "suffix": suffix,
        "metadata": metadata, "model": model, "config": dataclasses.asdict(config),
        "checkpoint_every": checkpoint_every, "auto": auto, "num_examples": num_examples,
        "training_file": training_file, "validation_file": validation_file, "description": description,
        "created_at": int(time.time()), "status": "validating_files", "started_at": None, "finished_at": None,
        "step": 0, "loss_curve": [], "eval_curve": [], "trained_tokens": 0, "estimated_finish": None,
        "result": None, "warnings": [], "error": None, "cancel_requested": False, "checkpoints": [],
        "event_chunks": [], "next_event_seq": 0, "runs": 0, "replica": None,
        "best": None, "stopped_early": False,
    }


def config_from_record(record: dict[str, Any]) -> TuningConfig:
    return TuningConfig(**record["config"])


def _public_name(record: dict[str, Any], name: str) -> str:
    return ("public/" if record["namespace"] != record["tenant"] else "") + name


def job_view(record: dict[str, Any], queue_position: int | None = None) -> dict[str, Any]:
    c = record["config"]
    last_eval = record["eval_curve"][-1] if record["eval_curve"] else None
    result = None
    if record["result"] is not None:
        r = record["result"]
        result = {"name": _public_name(record, r["name"]), "version": r["version"],
                  "ref": _public_name(record, r["ref"]), "sha256": r["sha256"], "step": r.get("step")}
    running = record["status"] == "running"
    finish = record["estimated_finish"] if running else None
    hyper = {k: c[k] for k in ("num_virtual_tokens", "init", "init_text", "steps", "learning_rate", "batch_size",
                               "micro_batch_size", "warmup_steps", "lr_schedule", "weight_decay", "eval_every",
                               "early_stopping_patience", "early_stopping_min_delta", "result_prompt")}
    hyper["checkpoint_every"] = record["checkpoint_every"]
    # Records written before prefix tuning have no method: they were prompt tuning.
    hyper.update(method=c.get("method", "prompt"), prefix_projection=c.get("prefix_projection", False),
                 encoder_hidden_size=c.get("encoder_hidden_size"))
    return {
        "id": record["id"], "object": "tuning.job", "model": record["model"],
        "name": _public_name(record, record["name"]), "suffix": record["suffix"], "metadata": record["metadata"],
        "status": record["status"], "created_at": record["created_at"], "started_at": record["started_at"],
        "finished_at": record["finished_at"], "training_file": record["training_file"],
        "validation_file": record["validation_file"], "hyperparameters": hyper,
        "auto_hyperparameters": list(record["auto"]), "seed": c["seed"], "num_examples": record["num_examples"],
        "step": record["step"], "total_steps": c["steps"],
        "loss": record["loss_curve"][-1]["loss"] if record["loss_curve"] else None,
        "loss_curve": list(record["loss_curve"]), "eval_curve": list(record["eval_curve"]),
        "metrics": {"eval_loss": last_eval["eval_loss"], "eval_accuracy": last_eval["eval_accuracy"]} if last_eval else None,
        "best_checkpoint": record["best"], "stopped_early": record["stopped_early"],
        "eta_seconds": max(0.0, round(finish - time.time(), 1)) if finish is not None else None,
        "estimated_finish": finish, "trained_tokens": record["trained_tokens"],
        "fine_tuned_model": result["ref"] if result else None, "result_prompt": result,
        "warnings": list(record["warnings"]), "error": record["error"], "queue_position": queue_position,
        "cancel_requested": record["cancel_requested"], "resumed": max(0, record["runs"] - 1),
        "replica": record["replica"],
    }


def make_event(job_id: str, seq: int, message: str, *, level: str = "info", type: str = "message",
               data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"seq": seq, "created_at": int(time.time()), "level": level, "message": message, "type": type,
            "data": data or {}, "job_id": job_id}


def event_id(job_id: str, seq: int) -> str:
    return f"tuneevt-{job_id.removeprefix('tunejob-')}-{seq:08d}"


def event_seq(event_id_: str) -> int | None:
    """The seq inside an event id (for `after`), or None if it is not one of ours."""
    head, _, tail = event_id_.rpartition("-")
    return int(tail) if head.startswith("tuneevt-") and tail.isdigit() else None


def event_view(event: dict[str, Any]) -> dict[str, Any]:
    return {"id": event_id(event["job_id"], event["seq"]), "object": "tuning.job.event",
            "created_at": event["created_at"], "level": event["level"], "message": event["message"],
            "type": event["type"], "data": event["data"]}


def checkpoint_view(record: dict[str, Any], ckpt: dict[str, Any]) -> dict[str, Any]:
    return {"id": ckpt["id"], "object": "tuning.job.checkpoint", "created_at": ckpt["created_at"],
            "tuning_job_id": record["id"], "step_number": ckpt["step"], "metrics": ckpt["metrics"],
            "fine_tuned_model_checkpoint": _public_name(record, ckpt["prompt"]["ref"]),
            "prompt": {"name": _public_name(record, ckpt["prompt"]["name"]), "version": ckpt["prompt"]["version"]},
            "is_best": bool(record["best"] and record["best"]["step"] == ckpt["step"])}
