"""Prompt-tuning API (tenant-scoped): training files and tuning jobs, shaped after OpenAI's
files + fine-tuning jobs endpoints.

    POST /v1/files                      multipart: file (JSONL), purpose "tune" (or "fine-tune")
    GET  /v1/files, GET/DELETE /v1/files/{id}
    POST /v1/tuning/jobs                {"training_file" | "training_data": [...], "validation_file"?,
                                         "validation_data"?, "name", "num_virtual_tokens", "init",
                                         "init_text", "steps", "learning_rate", "batch_size", "seed", ...}
    GET  /v1/tuning/jobs, GET /v1/tuning/jobs/{id}, POST /v1/tuning/jobs/{id}/cancel
    GET  /v1/tuning/jobs/{id}/events        after, limit, order: message and metrics events
    GET  /v1/tuning/jobs/{id}/checkpoints   after, limit: each a servable pinned prompt version

Record shapes are checked when the job is created (a 400 naming the line); tokenization runs while
the job is `validating_files` (a too-long example fails the job with error.param naming the data).
A job or file of another tenant answers 404, like a missing one.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from prompt_store.store import validate_name
from prompt_store.types import PromptStoreError
from server.api.errors import APIError
from server.api.prompts import _parse_multipart, _read_body_limited
from server.auth import Principal, can_write, tenant_for_model
from server.tuning.data import DatasetError, parse_jsonl, parse_records
from server.tuning.jobs import QueueFull, TuningManager, new_job_id
from server.tuning.records import checkpoint_view, event_seq, event_view, new_record, resolve_auto
from server.tuning.runner import CHECKPOINT_SUFFIX
from server.tuning.trainer import TuningConfig

__all__ = ["build_tuning_router", "TuningJobRequest"]


Auto = Literal["auto"]


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
    num_virtual_tokens: int = Field(8, ge=1)
    init: Literal["text", "random", "vocab"] | None = Field(None, description="default: text if init_text, else vocab")
    init_text: str | None = Field(None, max_length=4096)
    steps: int | Auto = Field(100, description='training steps, or "auto" (3 epochs, clamped to [50, 1000])')
    learning_rate: float | Auto = Field(3e-2, description='AdamW learning rate, or "auto" (3e-2)')
    batch_size: int | Auto = Field(8, description='examples per step, or "auto" (min(8, examples))')
    micro_batch_size: int | None = Field(None, ge=1, le=512, description="default min(batch_size, 4)")
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["linear", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    eval_every: int = Field(0, ge=0)
    eval_max_new_tokens: int | None = Field(None, ge=1, le=1024)
    checkpoint_every: int | Auto = Field("auto", description='steps between checkpoints, or "auto" (eval_every, else steps/10)')
    early_stopping_patience: int = Field(0, ge=0, description="stop after this many evals without eval-loss improvement (0: off; needs eval_every)")
    early_stopping_min_delta: float = Field(0.0, ge=0)
    result_prompt: Literal["last", "best"] | None = Field(None, description="which prompt the job publishes (default: best with early stopping, else last)")
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
        raise APIError(400, f"{name} must be 'auto' or in [{lo}, {hi}]", param=name, code="invalid_parameter")


def _dataset_error(exc: DatasetError, param: str) -> APIError:
    return APIError(400, str(exc), param=param, code="invalid_training_data")


def build_tuning_router(get_manager: Callable[[], TuningManager], get_principal: Callable[..., Principal],
                        get_settings: Callable[[], Any] = lambda: None) -> APIRouter:
    router = APIRouter(tags=["tuning"])

    # ---- files ------------------------------------------------------------------------------------
    @router.post("/v1/files")
    async def upload_file(request: Request, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        manager = get_manager()
        limit = manager.files.max_bytes
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            raise APIError(415, "upload must be multipart/form-data with a 'file' part and a 'purpose' field",
                           code="unsupported_media_type")
        body = await _read_body_limited(request, limit + 64 * 1024)
        form = await _parse_multipart(request, body)
        try:
            part = form.get("file")
            if part is None:
                raise APIError(400, "missing required file part 'file'", param="file")
            if isinstance(part, UploadFile):
                data, filename = await part.read(), part.filename or "data.jsonl"
            else:
                data, filename = str(part).encode("utf-8"), "data.jsonl"
            purpose = str(form.get("purpose") or "tune")
        finally:
            await form.close()
        try:
            meta = await run_in_threadpool(manager.files.create, principal.tenant, filename, purpose, data)
        except DatasetError as exc:
            raise APIError(400, str(exc), param="purpose" if exc.source == "purpose" else "file",
                           code="invalid_training_data") from None
        except PromptStoreError as exc:  # StorageQuotaExceeded: 413
            raise APIError(exc.status_code, exc.message, param="file" if exc.status_code < 500 else None,
                           code=exc.code) from None
        return meta.to_dict()

    @router.get("/v1/files")
    def list_files(principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        return {"object": "list", "data": [f.to_dict() for f in get_manager().files.list(principal.tenant)]}

    @router.get("/v1/files/{file_id}")
    def get_file(file_id: str, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        try:
            return get_manager().files.get(principal.tenant, file_id).to_dict()
        except KeyError:
            raise APIError(404, f"file {file_id!r} not found", param="file_id", code="file_not_found") from None

    @router.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        try:
            get_manager().files.delete(principal.tenant, file_id)
        except KeyError:
            raise APIError(404, f"file {file_id!r} not found", param="file_id", code="file_not_found") from None
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- jobs -------------------------------------------------------------------------------------
    def _load(manager: TuningManager, principal: Principal, file_id: str | None, inline: list | None,
              file_param: str, data_param: str) -> tuple[str | None, int]:
        """The data as JSONL text (stored with the job) and its example count. Record shapes are
        checked here (400 naming the line); tokenization happens while the job is validating_files."""
        if file_id is not None and inline is not None:
            raise APIError(400, f"give either {file_param} or {data_param}, not both", param=file_param)
        if file_id is None and inline is None:
            return None, 0
        try:
            if file_id is not None:
                try:
                    text = manager.files.read_text(principal.tenant, file_id)
                except KeyError:
                    raise APIError(404, f"file {file_id!r} not found", param=file_param, code="file_not_found") from None
                return text, len(parse_jsonl(text, source=file_id))
            examples = parse_records(inline, source=data_param)
            return "".join(json.dumps(r) + "\n" for r in inline), len(examples)
        except DatasetError as exc:
            raise _dataset_error(exc, file_param if file_id is not None else data_param) from None

    def _create(body: TuningJobRequest, principal: Principal) -> dict[str, Any]:
        manager = get_manager()
        if body.model is not None and body.model != manager.model_name:
            raise APIError(400, f"tuning runs on the served model {manager.model_name!r}; got model {body.model!r}",
                           param="model", code="model_not_found")
        try:
            namespace, name, version = tenant_for_model(principal, body.name)
            if body.suffix is not None:
                name = validate_name(f"{name}-{body.suffix}")
            validate_name(name + CHECKPOINT_SUFFIX)  # checkpoints are versions of '<name>-ckpt'
        except PromptStoreError as exc:
            raise APIError(400 if exc.status_code == 400 else exc.status_code, exc.message,
                           param="suffix" if body.suffix else "name") from None
        except ValueError as exc:
            raise APIError(400, f"{exc} (the name, with '-<suffix>' and '{CHECKPOINT_SUFFIX}', must stay a valid prompt name)",
                           param="suffix" if body.suffix else "name") from None
        if version is not None:
            raise APIError(400, "versions are assigned by the server; use the bare prompt name", param="name")
        if not can_write(principal, namespace):
            raise APIError(403, f"only admins may write the '{namespace}' namespace", code="forbidden")
        if body.metadata is not None and (len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
            raise APIError(400, "metadata: at most 16 pairs, keys up to 64 and values up to 512 characters", param="metadata")
        if body.num_virtual_tokens > manager.store.max_virtual_tokens:
            raise APIError(400, f"num_virtual_tokens must be <= {manager.store.max_virtual_tokens}",
                           param="num_virtual_tokens")
        _check_range("steps", body.steps, 1, 100_000)
        _check_range("batch_size", body.batch_size, 1, 512)
        _check_range("checkpoint_every", body.checkpoint_every, 1, 100_000)
        if body.learning_rate != "auto" and not (0 < body.learning_rate <= 10):
            raise APIError(400, "learning_rate must be 'auto' or in (0, 10]", param="learning_rate", code="invalid_parameter")
        init = body.init or ("text" if body.init_text else "vocab")
        if init == "text" and not (body.init_text and body.init_text.strip()):
            raise APIError(400, "init 'text' needs a non-empty init_text", param="init_text")
        if body.training_file is None and body.training_data is None:
            raise APIError(400, "give training_file (an uploaded file id) or training_data (inline examples)",
                           param="training_file")
        if body.early_stopping_patience and not (body.eval_every and (body.validation_file or body.validation_data)):
            raise APIError(400, "early stopping needs validation data and eval_every > 0", param="early_stopping_patience")
        settings = get_settings()
        max_model_len = getattr(settings, "max_model_len", 2048)
        max_length = max(1, max_model_len - body.num_virtual_tokens)
        train_text, n_train = _load(manager, principal, body.training_file, body.training_data, "training_file", "training_data")
        eval_text, n_eval = _load(manager, principal, body.validation_file, body.validation_data,
                                  "validation_file", "validation_data")
        if n_train == 0:
            raise APIError(400, "no training examples", param="training_data" if body.training_file is None else "training_file")
        values, auto = resolve_auto(n_train, batch_size=body.batch_size, steps=body.steps, learning_rate=body.learning_rate,
                                    checkpoint_every=body.checkpoint_every, eval_every=body.eval_every)
        config = TuningConfig(
            num_virtual_tokens=body.num_virtual_tokens, init=init, init_text=body.init_text if init == "text" else None,
            steps=values["steps"], learning_rate=values["learning_rate"], batch_size=values["batch_size"],
            micro_batch_size=body.micro_batch_size or min(values["batch_size"], 4), warmup_steps=body.warmup_steps,
            lr_schedule=body.lr_schedule, weight_decay=body.weight_decay, max_grad_norm=body.max_grad_norm,
            seed=body.seed, eval_every=body.eval_every, eval_max_new_tokens=body.eval_max_new_tokens,
            max_length=max_length, early_stopping_patience=body.early_stopping_patience,
            early_stopping_min_delta=body.early_stopping_min_delta,
            result_prompt=body.result_prompt or ("best" if body.early_stopping_patience else "last"),
        )
        try:
            config.validate()
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_parameter") from None
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
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": "30"}) from None
        except PromptStoreError as exc:  # PromptQuotaExceeded: 429
            raise APIError(exc.status_code, exc.message, param="name", code=exc.code) from None
        return manager.view(manager.get(principal.tenant, job.id))

    def _job(manager: TuningManager, principal: Principal, job_id: str) -> dict[str, Any]:
        try:
            return manager.get(principal.tenant, job_id)
        except KeyError:
            raise APIError(404, f"tuning job {job_id!r} not found", param="job_id", code="job_not_found") from None

    @router.post("/v1/tuning/jobs")
    async def create_job(body: TuningJobRequest, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        return await run_in_threadpool(_create, body, principal)  # reading files and the store can take a moment

    @router.get("/v1/tuning/jobs")
    def list_jobs(limit: int = Query(20, ge=1, le=200), after: str | None = Query(None, description="a job id: list older jobs"),
                  principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        manager = get_manager()
        jobs = manager.list(principal.tenant)
        if after is not None:
            ids = [j["id"] for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": [manager.view(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}

    @router.get("/v1/tuning/jobs/{job_id}")
    def get_job(job_id: str, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        manager = get_manager()
        return manager.view(_job(manager, principal, job_id))

    @router.get("/v1/tuning/jobs/{job_id}/events")
    def list_events(job_id: str, after: str | None = Query(None, description="an event id: continue after it"),
                    limit: int = Query(20, ge=1, le=1000),
                    order: Literal["desc", "asc"] = Query("desc", description="desc (OpenAI's: newest first, `after` pages "
                                                          "to older events) or asc (oldest first, `after` tails newer ones)"),
                    principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        manager = get_manager()
        _job(manager, principal, job_id)
        events = manager.events(principal.tenant, job_id)
        if after is not None:
            seq = event_seq(after)
            if seq is None:
                raise APIError(400, f"after must be an event id of this job, got {after!r}", param="after")
            events = [e for e in events if (e["seq"] > seq if order == "asc" else e["seq"] < seq)]
        if order == "desc":
            events = events[::-1]
        page = events[:limit]
        return {"object": "list", "data": [event_view(e) for e in page], "has_more": len(events) > limit}

    @router.get("/v1/tuning/jobs/{job_id}/checkpoints")
    def list_checkpoints(job_id: str, after: str | None = Query(None, description="a checkpoint id: list older ones"),
                         limit: int = Query(10, ge=1, le=1000), principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        manager = get_manager()
        record = _job(manager, principal, job_id)
        ckpts = [checkpoint_view(record, c) for c in reversed(record["checkpoints"])]
        if after is not None:
            ids = [c["id"] for c in ckpts]
            ckpts = ckpts[ids.index(after) + 1:] if after in ids else []
        page = ckpts[:limit]
        return {"object": "list", "data": page, "has_more": len(ckpts) > limit,
                "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}

    @router.post("/v1/tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        manager = get_manager()
        record = _job(manager, principal, job_id)
        if record["status"] in ("succeeded", "failed"):
            raise APIError(409, f"tuning job {job_id!r} already {record['status']}", param="job_id", code="job_finished")
        return manager.view(manager.cancel(principal.tenant, job_id))

    return router
