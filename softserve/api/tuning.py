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

Routes only; the operations and the checks of a job request live in softserve/service/tuning.py.
A job or file of another tenant answers 404, like a missing one.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from softserve.service import tuning as service
from softserve.service.errors import InvalidRequest, UnsupportedMediaType
from softserve.service.tuning import TuningJobRequest
from softserve.tuning.records import checkpoint_view, event_seq, event_view

from .deps import PrincipalDep, RuntimeDep, TuningDep
from .uploads import parse_multipart, read_body_limited

__all__ = ["router"]

router = APIRouter(tags=["tuning"])


# ---- files ----------------------------------------------------------------------------------------
@router.post("/v1/files")
async def upload_file(request: Request, manager: TuningDep, principal: PrincipalDep) -> dict[str, Any]:
    limit = manager.files.max_bytes
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("upload must be multipart/form-data with a 'file' part and a 'purpose' field")
    body = await read_body_limited(request, limit + 64 * 1024)
    form = await parse_multipart(request, body)
    try:
        part = form.get("file")
        if part is None:
            raise InvalidRequest("missing required file part 'file'", param="file")
        if isinstance(part, UploadFile):
            data, filename = await part.read(), part.filename or "data.jsonl"
        else:
            data, filename = str(part).encode("utf-8"), "data.jsonl"
        purpose = str(form.get("purpose") or "tune")
    finally:
        await form.close()
    meta = await run_in_threadpool(service.create_file, manager, principal, filename, purpose, data)
    return meta.to_dict()


@router.get("/v1/files")
def list_files(manager: TuningDep, principal: PrincipalDep) -> dict[str, Any]:
    return {"object": "list", "data": [f.to_dict() for f in manager.files.list(principal.tenant)]}


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, manager: TuningDep, principal: PrincipalDep) -> dict[str, Any]:
    return service.get_file(manager, principal, file_id).to_dict()


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, manager: TuningDep, principal: PrincipalDep) -> dict[str, Any]:
    service.delete_file(manager, principal, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


# ---- jobs -----------------------------------------------------------------------------------------
@router.post("/v1/tuning/jobs")
async def create_job(body: TuningJobRequest, manager: TuningDep, runtime: RuntimeDep,
                     principal: PrincipalDep) -> dict[str, Any]:
    # Reading files and the store can take a moment: off the event loop.
    return await run_in_threadpool(lambda: service.create_job(manager, principal, body, max_model_len=runtime.max_model_len))


@router.get("/v1/tuning/jobs")
def list_jobs(manager: TuningDep, principal: PrincipalDep, limit: int = Query(20, ge=1, le=200),
              after: str | None = Query(None, description="a job id: list older jobs")) -> dict[str, Any]:
    jobs = manager.list(principal.tenant)
    if after is not None:
        ids = [j["id"] for j in jobs]
        jobs = jobs[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": [manager.view(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}


@router.get("/v1/tuning/jobs/{job_id}")
def get_job(job_id: str, manager: TuningDep, principal: PrincipalDep) -> dict[str, Any]:
    return manager.view(service.get_job(manager, principal, job_id))


@router.get("/v1/tuning/jobs/{job_id}/events")
def list_events(job_id: str, manager: TuningDep, principal: PrincipalDep,
                after: str | None = Query(None, description="an event id: continue after it"),
                limit: int = Query(20, ge=1, le=1000),
                order: Literal["desc", "asc"] = Query("desc", description="desc (OpenAI's: newest first, `after` pages "
                                                      "to older events) or asc (oldest first, `after` tails newer ones)")
                ) -> dict[str, Any]:
    service.get_job(manager, principal, job_id)
    events = manager.events(principal.tenant, job_id)
    if after is not None:
        seq = event_seq(after)
        if seq is None:
            raise InvalidRequest(f"after must be an event id of this job, got {after!r}", param="after")
        events = [e for e in events if (e["seq"] > seq if order == "asc" else e["seq"] < seq)]
    if order == "desc":
        events = events[::-1]
    page = events[:limit]
    return {"object": "list", "data": [event_view(e) for e in page], "has_more": len(events) > limit}


@router.get("/v1/tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, manager: TuningDep, principal: PrincipalDep,
                     after: str | None = Query(None, description="a checkpoint id: list older ones"),
                     limit: int = Query(10, ge=1, le=1000)) -> dict[str, Any]:
    record = service.get_job(manager, principal, job_id)
    ckpts = [checkpoint_view(record, c) for c in reversed(record["checkpoints"])]
    if after is not None:
        ids = [c["id"] for c in ckpts]
        ckpts = ckpts[ids.index(after) + 1:] if after in ids else []
    page = ckpts[:limit]
    return {"object": "list", "data": page, "has_more": len(ckpts) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


@router.post("/v1/tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, manager: TuningDep, principal: PrincipalDep) -> dict[str, Any]:
    return service.cancel_job(manager, principal, job_id)
