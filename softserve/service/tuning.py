"""Tuning on the resident model, without HTTP: the job manager's lifecycle, and creating, reading and
cancelling jobs and training files for a principal.

The manager is created once the model is loaded (at start-up, so unfinished jobs in the store are
resumed without waiting for a request), from the same objects the engine serves with: the model,
the tokenizer, the prompt store and the engine's `step_lock`.

Record shapes are checked when a job is created (InvalidRequest naming the line); tokenization runs
while the job is `validating_files`. A job or file of another tenant is NotFound, like a missing one.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from softserve.store.store import validate_name
from softserve.store.types import PromptStoreError
from softserve.service.auth import Principal
from softserve.service.errors import (
    Conflict, InvalidRequest, NotFound, NotReady, Overloaded, from_store_error, not_ready,
)
from softserve.service.tenancy import parse_reference, require_write
from softserve.tuning.data import DatasetError, parse_jsonl, parse_records
from softserve.tuning.job import QueueFull, new_job_id
from softserve.tuning.jobs import TuningManager
from softserve.tuning.records import new_record, resolve_auto
from softserve.tuning.runner import CHECKPOINT_SUFFIX
from softserve.tuning.config import (
    INIT_METHODS, LR_SCHEDULES, MAX_ENCODER_HIDDEN, METHODS, RESULT_PROMPTS, TuningConfig, default_init,
    default_result_prompt,
)

log = logging.getLogger("softserve.tuning")

__all__ = ["TuningService", "TuningJobRequest", "create_job", "get_job", "cancel_job", "create_file", "get_file",
           "delete_file"]


Auto = Literal["auto"]
_d = TuningConfig  # the defaults (a dataclass's class attributes)


class TuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="prompt name the result is stored under (a new version)")
    suffix: str | None = Field(None, max_length=40, description="appended to the prompt name: '<name>-<suffix>'")
    metadata: dict[str, str] | None = Field(None, description="up to 16 string pairs, echoed back")
    training_file: str | None = None
    training_data: list[Any] | None = Field(None, max_length=100_000)
    validation_file: str | None = None
    validation_data: list[Any] | None = Field(None, max_length=100_000)
    model: str | None = Field(None, description="must be the served base model if given")
    method: Literal[METHODS] = Field(_d.method, description="prompt (PEFT PROMPT_TUNING) or prefix (PEFT PREFIX_TUNING)")
    prefix_projection: bool = Field(_d.prefix_projection, description="prefix only: train through PEFT's MLP")
    encoder_hidden_size: int | None = Field(None, ge=1, le=MAX_ENCODER_HIDDEN,
                                            description="prefix_projection's MLP width (default kv_heads * head_dim)")
    num_virtual_tokens: int = Field(_d.num_virtual_tokens, ge=1)
    init: Literal[INIT_METHODS] | None = Field(None, description="default: random for prefix, else text if init_text, else vocab")
    init_text: str | None = Field(None, max_length=4096)
    steps: int | Auto = Field(_d.steps, description='training steps, or "auto" (3 epochs, clamped to [50, 1000])')
    learning_rate: float | Auto = Field(_d.learning_rate, description=f'AdamW learning rate, or "auto" ({_d.learning_rate:g})')
    batch_size: int | Auto = Field(_d.batch_size, description='examples per step, or "auto" (min(8, examples))')
    micro_batch_size: int | None = Field(None, ge=1, le=512, description="default min(batch_size, 4)")
    warmup_steps: int = Field(_d.warmup_steps, ge=0)
    lr_schedule: Literal[LR_SCHEDULES] = _d.lr_schedule
    weight_decay: float = Field(_d.weight_decay, ge=0, le=1.0)
    max_grad_norm: float | None = Field(_d.max_grad_norm, gt=0, le=1000.0)
    seed: int = Field(_d.seed, ge=0, le=2**63 - 1)
    eval_every: int = Field(_d.eval_every, ge=0)
    eval_max_new_tokens: int | None = Field(None, ge=1, le=1024)
    checkpoint_every: int | Auto = Field("auto", description='steps between checkpoints, or "auto" (eval_every, else steps/10)')
    early_stopping_patience: int = Field(_d.early_stopping_patience, ge=0, description="stop after this many evals without eval-loss improvement (0: off; needs eval_every)")
    early_stopping_min_delta: float = Field(_d.early_stopping_min_delta, ge=0)
    result_prompt: Literal[RESULT_PROMPTS] | None = Field(None, description="which prompt the job publishes (default: best with early stopping, else last)")
    description: str | None = Field(None, max_length=1024)

    @field_validator("init_text", "description")
    @classmethod
    def _valid_unicode(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text is not valid Unicode (a lone surrogate)") from None
        return value


def _check_range(name: str, value, lo, hi) -> None:
    if value != "auto" and not (lo <= value <= hi):
        raise InvalidRequest(f"{name} must be 'auto' or in [{lo}, {hi}]", param=name, code="invalid_parameter")


def _dataset_error(exc: DatasetError, param: str) -> InvalidRequest:
    return InvalidRequest(str(exc), param=param, code="invalid_training_data")


def _load(manager: TuningManager, principal: Principal, file_id: str | None, inline: list | None,
          file_param: str, data_param: str) -> tuple[str | None, int]:
    """The data as JSONL text (stored with the job) and its example count. Record shapes are
    checked here (400 naming the line); tokenization happens while the job is validating_files."""
    if file_id is not None and inline is not None:
        raise InvalidRequest(f"give either {file_param} or {data_param}, not both", param=file_param)
    if file_id is None and inline is None:
        return None, 0
    try:
        if file_id is not None:
            try:
                text = manager.files.read_text(principal.tenant, file_id)
            except KeyError:
                raise NotFound(f"file {file_id!r} not found", param=file_param, code="file_not_found") from None
            return text, len(parse_jsonl(text, source=file_id, max_examples=manager.max_examples))
        examples = parse_records(inline, source=data_param, max_examples=manager.max_examples)
        return "".join(json.dumps(r) + "\n" for r in inline), len(examples)
    except DatasetError as exc:
        raise _dataset_error(exc, file_param if file_id is not None else data_param) from None


def create_job(manager: TuningManager, principal: Principal, body: TuningJobRequest, *, max_model_len: int) -> dict[str, Any]:
    """Validate the request, store the job and queue it. `max_model_len` is the served context length
    (--max-model-len capped at the model's positions): training examples are cut to fit it, as requests are."""
    if body.model is not None and body.model != manager.model_name:
        raise InvalidRequest(f"tuning runs on the served model {manager.model_name!r}; got model {body.model!r}",
                       param="model", code="model_not_found")
    try:
        ref = parse_reference(principal, body.name)
        namespace, name, version = ref.namespace, ref.name, ref.version
        if body.suffix is not None:
            name = validate_name(f"{name}-{body.suffix}")
        validate_name(name + CHECKPOINT_SUFFIX)  # checkpoints are versions of '<name>-ckpt'
    except PromptStoreError as exc:
        raise from_store_error(exc, param="suffix" if body.suffix else "name") from None
    except ValueError as exc:
        raise InvalidRequest(f"{exc} (the name, with '-<suffix>' and '{CHECKPOINT_SUFFIX}', must stay a valid prompt name)",
                       param="suffix" if body.suffix else "name") from None
    if version is not None:
        raise InvalidRequest("versions are assigned by the server; use the bare prompt name", param="name")
    require_write(principal, namespace)
    if body.metadata is not None and (len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
        raise InvalidRequest("metadata: at most 16 pairs, keys up to 64 and values up to 512 characters", param="metadata")
    if body.num_virtual_tokens > manager.store.max_virtual_tokens:
        raise InvalidRequest(f"num_virtual_tokens must be <= {manager.store.max_virtual_tokens}",
                       param="num_virtual_tokens")
    _check_range("steps", body.steps, 1, 100_000)
    _check_range("batch_size", body.batch_size, 1, 512)
    _check_range("checkpoint_every", body.checkpoint_every, 1, 100_000)
    if body.learning_rate != "auto" and not (0 < body.learning_rate <= 10):
        raise InvalidRequest("learning_rate must be 'auto' or in (0, 10]", param="learning_rate", code="invalid_parameter")
    if body.method == "prefix":
        if body.init not in (None, "random") or body.init_text is not None:
            raise InvalidRequest("method 'prefix' starts from PEFT's random init: leave init unset (or 'random') "
                                 "and give no init_text", param="init" if body.init_text is None else "init_text")
    elif body.prefix_projection or body.encoder_hidden_size is not None:
        raise InvalidRequest("prefix_projection and encoder_hidden_size need method 'prefix'",
                             param="prefix_projection" if body.prefix_projection else "encoder_hidden_size")
    if body.encoder_hidden_size is not None and not body.prefix_projection:
        raise InvalidRequest("encoder_hidden_size needs prefix_projection: true", param="encoder_hidden_size")
    init = default_init(body.init, body.init_text, body.method)
    if init == "text" and not (body.init_text and body.init_text.strip()):
        raise InvalidRequest("init 'text' needs a non-empty init_text", param="init_text")
    if body.training_file is None and body.training_data is None:
        raise InvalidRequest("give training_file (an uploaded file id) or training_data (inline examples)",
                       param="training_file")
    if body.early_stopping_patience and not (body.eval_every and (body.validation_file or body.validation_data)):
        raise InvalidRequest("early stopping needs validation data and eval_every > 0", param="early_stopping_patience")
    max_length = max(1, max_model_len - body.num_virtual_tokens)
    train_text, n_train = _load(manager, principal, body.training_file, body.training_data, "training_file", "training_data")
    eval_text, n_eval = _load(manager, principal, body.validation_file, body.validation_data,
                              "validation_file", "validation_data")
    if n_train == 0:
        raise InvalidRequest("no training examples", param="training_data" if body.training_file is None else "training_file")
    values, auto = resolve_auto(n_train, batch_size=body.batch_size, steps=body.steps, learning_rate=body.learning_rate,
                                checkpoint_every=body.checkpoint_every, eval_every=body.eval_every)
    config = TuningConfig(
        method=body.method, prefix_projection=body.prefix_projection, encoder_hidden_size=body.encoder_hidden_size,
        num_virtual_tokens=body.num_virtual_tokens, init=init, init_text=body.init_text if init == "text" else None,
        steps=values["steps"], learning_rate=values["learning_rate"], batch_size=values["batch_size"],
        micro_batch_size=body.micro_batch_size or min(values["batch_size"], 4), warmup_steps=body.warmup_steps,
        lr_schedule=body.lr_schedule, weight_decay=body.weight_decay, max_grad_norm=body.max_grad_norm,
        seed=body.seed, eval_every=body.eval_every, eval_max_new_tokens=body.eval_max_new_tokens,
        max_length=max_length, early_stopping_patience=body.early_stopping_patience,
        early_stopping_min_delta=body.early_stopping_min_delta,
        result_prompt=default_result_prompt(body.result_prompt, body.early_stopping_patience),
    )
    try:
        config.validate()
    except ValueError as exc:
        raise InvalidRequest(str(exc), code="invalid_parameter") from None
    record = new_record(
        job_id=new_job_id(), tenant=principal.tenant, namespace=namespace, name=name, model=manager.model_name,
        config=config, checkpoint_every=values["checkpoint_every"], auto=auto,
        num_examples={"train": n_train, "validation": n_eval}, training_file=body.training_file,
        validation_file=body.validation_file, description=body.description, suffix=body.suffix,
        metadata=body.metadata)
    texts = {"train": train_text} | ({"validation": eval_text} if eval_text is not None else {})
    try:
        job = manager.submit(record, texts)
    except QueueFull as exc:
        raise Overloaded(str(exc), code="queue_full", retry_after=30) from None
    return manager.view(manager.get(principal.tenant, job.id))


def get_job(manager: TuningManager, principal: Principal, job_id: str) -> dict[str, Any]:
    try:
        return manager.get(principal.tenant, job_id)
    except KeyError:
        raise NotFound(f"tuning job {job_id!r} not found", param="job_id", code="job_not_found") from None


def cancel_job(manager: TuningManager, principal: Principal, job_id: str) -> dict[str, Any]:
    record = get_job(manager, principal, job_id)
    if record["status"] in ("succeeded", "failed"):
        raise Conflict(f"tuning job {job_id!r} already {record['status']}", param="job_id", code="job_finished")
    return manager.view(manager.cancel(principal.tenant, job_id))


def create_file(manager: TuningManager, principal: Principal, filename: str, purpose: str, data: bytes):
    try:
        return manager.files.create(principal.tenant, filename, purpose, data)
    except DatasetError as exc:
        raise InvalidRequest(str(exc), param="purpose" if exc.source == "purpose" else "file",
                             code="invalid_training_data") from None


def get_file(manager: TuningManager, principal: Principal, file_id: str):
    try:
        return manager.files.get(principal.tenant, file_id)
    except KeyError:
        raise NotFound(f"file {file_id!r} not found", param="file_id", code="file_not_found") from None


def delete_file(manager: TuningManager, principal: Principal, file_id: str) -> None:
    try:
        manager.files.delete(principal.tenant, file_id)
    except KeyError:
        raise NotFound(f"file {file_id!r} not found", param="file_id", code="file_not_found") from None


class TuningService:
    def __init__(self, state, *, max_concurrent: int = 1, train_share_when_busy: float = 0.5) -> None:
        self.state = state
        self.kwargs = dict(max_concurrent=max_concurrent, train_share_when_busy=train_share_when_busy)
        self._manager: TuningManager | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start_when_loaded(self) -> None:
        """Start the manager as soon as the model is ready (in a thread: loading may take a while)."""
        def start() -> None:
            self.state.loaded.wait()
            if self.state.is_ready and not self._closed:
                try:
                    self.get_manager()
                except Exception:
                    log.exception("tuning jobs could not start")

        threading.Thread(target=start, name="softserve-tuning-start", daemon=True).start()

    def get_manager(self) -> TuningManager:
        if self._manager is not None:
            return self._manager
        state = self.state
        if not state.is_ready or state.store is None:
            raise not_ready()
        with self._lock:
            if self._manager is None and not self._closed:
                async_engine = state.engine
                s = state.settings
                self._manager = TuningManager(
                    async_engine.model, state.tokenizer, state.store,
                    model_name=state.served_model_name,
                    step_lock=getattr(async_engine, "step_lock", None),
                    is_busy=lambda: async_engine.num_running + async_engine.num_waiting > 0,
                    max_queued=s.max_tuning_queue, max_active_per_tenant=s.max_tuning_jobs_per_tenant,
                    lease_seconds=s.tuning_lease_seconds, scan_seconds=s.tuning_scan_seconds,
                    replica_id=s.tuning_replica_id, retention_seconds=s.tuning_job_retention_seconds,
                    pack_jobs=s.tuning_pack_jobs, max_finished_per_tenant=s.max_finished_tuning_jobs_per_tenant,
                    max_examples=s.max_tuning_examples, validation_workers=s.tuning_validation_workers,
                    **self.kwargs,
                )
                if state.kv_warmer is not None:  # a job's result prompt: its KV computed ahead, as an upload's
                    self._manager.on_result_published = state.kv_warmer.enqueue
        if self._manager is None:
            raise NotReady("shutting down")
        return self._manager

    def job_counts(self) -> dict[str, int] | None:
        """Unfinished jobs on this replica by status, once the manager runs (None before)."""
        manager = self._manager
        return manager.job_counts() if manager is not None else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            manager, self._manager = self._manager, None
        if manager is not None:
            manager.close()
