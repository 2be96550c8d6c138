"""Prompt-tuning API (tenant-scoped): training files and tuning jobs, shaped after OpenAI's
files + fine-tuning jobs endpoints.

    POST /v1/files                      multipart: file (JSONL), purpose "tune" (or "fine-tune")
    GET  /v1/files, GET/DELETE /v1/files/{id}
    POST /v1/tuning/jobs                {"training_file" | "training_data": [...], "validation_file"?,
                                         "validation_data"?, "name", "num_virtual_tokens", "init",
                                         "init_text", "steps", "learning_rate", "batch_size", "seed", ...}
    GET  /v1/tuning/jobs, GET /v1/tuning/jobs/{id}, POST /v1/tuning/jobs/{id}/cancel

Data is parsed and tokenized when the job is created, so bad data is a 400 naming the line.
A job or file of another tenant answers 404, like a missing one.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from prompt_store.types import PromptStoreError
from server.api.errors import APIError
from server.api.prompts import _parse_multipart, _read_body_limited
from server.auth import Principal, can_write, tenant_for_model
from server.tuning.data import DatasetError, parse_jsonl, parse_records, tokenize_examples
from server.tuning.jobs import QueueFull, TuningJob, TuningManager, new_job_id
from server.tuning.trainer import TuningConfig

__all__ = ["build_tuning_router", "TuningJobRequest"]


class TuningJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="prompt name the result is stored under (a new version)")
    training_file: str | None = None
    training_data: list[Any] | None = Field(None, max_length=100_000)
    validation_file: str | None = None
    validation_data: list[Any] | None = Field(None, max_length=100_000)
    model: str | None = Field(None, description="must be the served base model if given")
    num_virtual_tokens: int = Field(8, ge=1)
    init: Literal["text", "random", "vocab"] | None = Field(None, description="default: text if init_text, else vocab")
    init_text: str | None = Field(None, max_length=4096)
    steps: int = Field(100, ge=1, le=100_000)
    learning_rate: float = Field(3e-2, gt=0, le=10)
    batch_size: int = Field(8, ge=1, le=512)
    micro_batch_size: int | None = Field(None, ge=1, le=512, description="default min(batch_size, 4)")
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["linear", "constant"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = Field(0, ge=0, le=2**63 - 1)
    eval_every: int = Field(0, ge=0)
    eval_max_new_tokens: int | None = Field(None, ge=1, le=1024)
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
              file_param: str, data_param: str, max_length: int) -> tuple[list, str | None]:
        if file_id is not None and inline is not None:
            raise APIError(400, f"give either {file_param} or {data_param}, not both", param=file_param)
        if file_id is None and inline is None:
            return [], None
        param = file_param if file_id is not None else data_param
        if file_id is not None:
            try:
                text = manager.files.read_text(principal.tenant, file_id)
            except KeyError:
                raise APIError(404, f"file {file_id!r} not found", param=file_param, code="file_not_found") from None
        try:
            examples = parse_jsonl(text, source=file_id) if file_id is not None else parse_records(inline, source=data_param)
            return tokenize_examples(manager.tokenizer, examples, max_length=max_length,
                                     source=file_id or data_param), file_id
        except DatasetError as exc:
            raise _dataset_error(exc, param) from None

    def _create(body: TuningJobRequest, principal: Principal) -> TuningJob:
        manager = get_manager()
        if body.model is not None and body.model != manager.model_name:
            raise APIError(400, f"tuning runs on the served model {manager.model_name!r}; got model {body.model!r}",
                           param="model", code="model_not_found")
        try:
            namespace, name, version = tenant_for_model(principal, body.name)
        except PromptStoreError as exc:
            raise APIError(400 if exc.status_code == 400 else exc.status_code, exc.message, param="name") from None
        if version is not None:
            raise APIError(400, "versions are assigned by the server; use the bare prompt name", param="name")
        if not can_write(principal, namespace):
            raise APIError(403, f"only admins may write the '{namespace}' namespace", code="forbidden")
        if body.num_virtual_tokens > manager.store.max_virtual_tokens:
            raise APIError(400, f"num_virtual_tokens must be <= {manager.store.max_virtual_tokens}",
                           param="num_virtual_tokens")
        init = body.init or ("text" if body.init_text else "vocab")
        if init == "text" and not (body.init_text and body.init_text.strip()):
            raise APIError(400, "init 'text' needs a non-empty init_text", param="init_text")
        if body.training_file is None and body.training_data is None:
            raise APIError(400, "give training_file (an uploaded file id) or training_data (inline examples)",
                           param="training_file")
        settings = get_settings()
        max_model_len = getattr(settings, "max_model_len", 2048)
        max_length = max(1, max_model_len - body.num_virtual_tokens)
        train, train_file = _load(manager, principal, body.training_file, body.training_data,
                                  "training_file", "training_data", max_length)
        evals, eval_file = _load(manager, principal, body.validation_file, body.validation_data,
                                 "validation_file", "validation_data", max_length)
        config = TuningConfig(
            num_virtual_tokens=body.num_virtual_tokens, init=init, init_text=body.init_text if init == "text" else None,
            steps=body.steps, learning_rate=body.learning_rate, batch_size=body.batch_size,
            micro_batch_size=body.micro_batch_size or min(body.batch_size, 4), warmup_steps=body.warmup_steps,
            lr_schedule=body.lr_schedule, weight_decay=body.weight_decay, max_grad_norm=body.max_grad_norm,
            seed=body.seed, eval_every=body.eval_every, eval_max_new_tokens=body.eval_max_new_tokens,
            max_length=max_length,
        )
        try:
            config.validate()
        except ValueError as exc:
            raise APIError(400, str(exc), code="invalid_parameter") from None
        job = TuningJob(id=new_job_id(), tenant=principal.tenant, namespace=namespace, name=name,
                        model=manager.model_name, config=config, train=train, eval=evals,
                        training_file=train_file, validation_file=eval_file, description=body.description)
        try:
            return manager.submit(job)
        except QueueFull as exc:
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": "30"}) from None

    def _job(manager: TuningManager, principal: Principal, job_id: str) -> TuningJob:
        try:
            return manager.get(principal.tenant, job_id)
        except KeyError:
            raise APIError(404, f"tuning job {job_id!r} not found", param="job_id", code="job_not_found") from None

    @router.post("/v1/tuning/jobs")
    async def create_job(body: TuningJobRequest, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        job = await run_in_threadpool(_create, body, principal)  # tokenizing can take a moment
        manager = get_manager()
        return job.to_dict(manager.queue_position(job))

    @router.get("/v1/tuning/jobs")
    def list_jobs(limit: int = Query(20, ge=1, le=200), principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        manager = get_manager()
        jobs = manager.list(principal.tenant)
        return {"object": "list", "data": [j.to_dict(manager.queue_position(j)) for j in jobs[:limit]],
                "has_more": len(jobs) > limit}

    @router.get("/v1/tuning/jobs/{job_id}")
    def get_job(job_id: str, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        manager = get_manager()
        job = _job(manager, principal, job_id)
        return job.to_dict(manager.queue_position(job))

    @router.post("/v1/tuning/jobs/{job_id}/cancel")
    def cancel_job(job_id: str, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        manager = get_manager()
        job = _job(manager, principal, job_id)
        if job.status in ("succeeded", "failed"):
            raise APIError(409, f"tuning job {job_id!r} already {job.status}", param="job_id", code="job_finished")
        manager.cancel(principal.tenant, job_id)
        return job.to_dict(manager.queue_position(job))

    return router
