"""Prompt management endpoints: upload (PUT), list, get, versions, download, delete.

Routes only: who may read or write what is decided in softserve/service/tenancy.py and the operations
live in softserve/service/prompts.py. Anything in another tenant answers 404 exactly like a missing
prompt, so existence is never revealed.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from softserve.store.types import PromptMeta
from softserve.service import prompts as service
from softserve.service.auth import Principal
from softserve.service.errors import InvalidRequest, UnsupportedMediaType
from softserve.service.tenancy import PUBLIC_TENANT, display_prefix

from .deps import CacheDep, KVWarmerDep, OptionalRuntimeDep, PrincipalDep, StoreDep
from .schemas import PromptDeleted, PromptInfo, PromptList, PromptUploadResponse, PromptVersionList
from .uploads import parse_multipart, part_bytes, read_body_limited

__all__ = ["router", "prompt_info", "PromptInfo", "PromptUploadResponse", "PromptList", "PromptVersionList",
           "PromptDeleted"]

_MAX_CONFIG_BYTES = 1024 * 1024
_MULTIPART_SLACK = 2 * 1024 * 1024  # config + description + multipart framing on top of the model file


def prompt_info(meta: PromptMeta, principal: Principal) -> dict[str, Any]:
    """A prompt as `principal` names it ("public/x" for someone else's public prompt)."""
    prefix = display_prefix(meta, principal)
    return dict(
        id=prefix + meta.name,
        name=meta.name,
        public=meta.tenant == PUBLIC_TENANT,
        version=meta.version,
        ref=prefix + meta.ref,
        sha256=meta.sha256,
        num_virtual_tokens=meta.num_virtual_tokens,
        token_dim=meta.token_dim,
        dtype=meta.dtype,
        peft_type=meta.peft_type,
        kind=meta.kind,
        created_at=meta.created_at,
        description=meta.description,
    )


def _composition_info(meta: PromptMeta, parts: tuple[PromptMeta, ...], principal: Principal) -> dict[str, Any]:
    refs = [prompt_info(p, principal)["ref"] for p in parts]
    return {**prompt_info(meta, principal), "id": meta.name, "public": False, "ref": "+".join(refs), "parts": refs}


router = APIRouter(tags=["prompts"])


@router.get("/v1/prompts", response_model=PromptList)
def list_prompts(store: StoreDep, principal: PrincipalDep,
                 limit: int = Query(service.DEFAULT_PAGE_SIZE, ge=1, le=service.MAX_PAGE_SIZE),
                 after: str | None = Query(None, description="an id from an earlier page: list what follows it")
                 ) -> dict[str, Any]:
    page, has_more = service.list_prompts_page(store, principal, after=after, limit=limit)
    data = [prompt_info(m, principal) for m in page]
    return {"data": data, "has_more": has_more, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


# Specific suffix routes first: `{name:path}` would otherwise swallow "/versions".
@router.get("/v1/prompts/{name:path}/versions", response_model=PromptVersionList)
def list_versions(name: str, store: StoreDep, principal: PrincipalDep) -> dict[str, Any]:
    infos = [prompt_info(m, principal) for m in service.list_versions(store, principal, name)]
    return {"id": infos[0]["id"], "data": infos}


@router.get("/v1/prompts/{name:path}/download")
def download(name: str, store: StoreDep, principal: PrincipalDep, version: str | None = Query(default=None)) -> Response:
    meta, data = service.export(store, principal, name, version)
    return Response(content=data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{meta.name}-{meta.version}.zip"'})


@router.get("/v1/prompts/{name:path}", response_model=PromptInfo)
def get_prompt(name: str, store: StoreDep, principal: PrincipalDep) -> dict[str, Any]:
    meta, parts = service.get_prompt(store, principal, name)
    return _composition_info(meta, parts, principal) if parts else prompt_info(meta, principal)


@router.put("/v1/prompts/{name:path}", response_model=PromptUploadResponse, status_code=201)
async def put_prompt(name: str, request: Request, store: StoreDep, principal: PrincipalDep, kv_warmer: KVWarmerDep) -> dict[str, Any]:
    ref = service.check_upload_target(principal, name)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise UnsupportedMediaType("upload must be multipart/form-data with an adapter_model file part")
    body = await read_body_limited(request, store.max_upload_bytes + _MULTIPART_SLACK)
    form = await parse_multipart(request, body)
    try:
        model_bytes = await part_bytes(form, "adapter_model", store.max_upload_bytes)
        if model_bytes is None:
            raise InvalidRequest("missing required file part 'adapter_model'", param="adapter_model")
        config_bytes = await part_bytes(form, "adapter_config", _MAX_CONFIG_BYTES)
        desc_bytes = await part_bytes(form, "description", 4096)
    finally:
        await form.close()
    description = desc_bytes.decode("utf-8", errors="replace") if desc_bytes else None
    # Hashing + validation + disk writes are blocking: keep them off the event loop.
    meta, warnings = await run_in_threadpool(service.upload, store, ref, model_bytes, config_bytes, description)
    if kv_warmer is not None:  # its KV computed in spare capacity, for its first request to read
        kv_warmer.enqueue(meta, principal.tenant)
    return {**prompt_info(meta, principal), "warnings": warnings}


@router.delete("/v1/prompts/{name:path}", response_model=PromptDeleted)
def delete_prompt(name: str, store: StoreDep, cache: CacheDep, principal: PrincipalDep,
                  runtime: OptionalRuntimeDep) -> dict[str, Any]:
    metas = service.delete(store, cache, principal, name)
    if runtime is not None:  # its KV, derived from the tensor, leaves the caches and the disk tier too
        runtime.forget_prompt_kv(metas)
    return {"id": prompt_info(metas[0], principal)["id"], "deleted": True}
