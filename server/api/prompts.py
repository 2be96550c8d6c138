"""Prompt management endpoints: upload (PUT), list, get, versions, download, delete.

Authorisation rules: a principal reads its own tenant's prompts and the `public` namespace,
writes its own tenant, and writes `public` only if admin. Anything in another tenant answers
404 exactly like a missing prompt, so existence is never revealed.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from prompt_store.cache import PromptCache
from prompt_store.store import PUBLIC_TENANT, PromptStore
from prompt_store.types import PromptMeta, PromptStoreError

from ..auth import Principal, can_write, tenant_for_model
from .composition import is_composition, resolve_reference
from .errors import APIError, client_gone

__all__ = ["build_prompts_router", "PromptInfo", "PromptUploadResponse", "PromptList", "PromptVersionList", "PromptDeleted"]

_MAX_CONFIG_BYTES = 1024 * 1024
_MULTIPART_SLACK = 2 * 1024 * 1024  # config + description + multipart framing on top of the model file


class PromptInfo(BaseModel):
    object: Literal["prompt"] = "prompt"
    id: str  # what to pass as `model`: "name" or "public/name"
    name: str
    public: bool
    version: str
    ref: str  # "name@version" (prefixed with "public/" for public prompts): pins this version
    sha256: str
    num_virtual_tokens: int
    token_dim: int
    dtype: str
    peft_type: str
    kind: str  # "prompt_tuning" (PROMPT_TUNING, P_TUNING) or "prefix_tuning" (PREFIX_TUNING)
    created_at: int
    description: str | None = None
    parts: list[str] | None = None  # a composition ("a+b"): its parts' pinned refs, in order


class PromptUploadResponse(PromptInfo):
    warnings: list[str] = []


class PromptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PromptInfo]


class PromptVersionList(BaseModel):
    object: Literal["list"] = "list"
    id: str
    data: list[PromptInfo]  # latest first


class PromptDeleted(BaseModel):
    object: Literal["prompt.deleted"] = "prompt.deleted"
    id: str
    deleted: bool = True


def _info(meta: PromptMeta, principal: Principal) -> dict[str, Any]:
    public = meta.tenant == PUBLIC_TENANT and principal.tenant != PUBLIC_TENANT
    prefix = f"{PUBLIC_TENANT}/" if public else ""
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
    refs = [_info(p, principal)["ref"] for p in parts]
    return {**_info(meta, principal), "id": meta.name, "public": False, "ref": "+".join(refs), "parts": refs}


@contextlib.contextmanager
def _store_errors(param: str | None = None) -> Iterator[None]:
    """Store errors carry their HTTP status; turn them into the API's OpenAI-shaped error."""
    try:
        yield
    except PromptStoreError as e:
        raise APIError(e.status_code, e.message, param=param if e.status_code < 500 else None, code=e.code) from None


def _parse_ref(principal: Principal, raw: str) -> tuple[str, str, str | None]:
    with _store_errors("name"):
        return tenant_for_model(principal, raw)


def _require_write(principal: Principal, namespace: str) -> None:
    if not can_write(principal, namespace):
        # Only reachable for `public` (other tenants already 404 in _parse_ref).
        raise APIError(403, f"only admins may modify the '{namespace}' namespace", code="forbidden")


async def _read_body_limited(request: Request, limit: int) -> bytes:
    # Content-Length is only a fast path: chunked bodies or lying clients are cut off while reading.
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise APIError(413, f"request body is larger than the limit ({limit} bytes)", code="upload_too_large")
    buf = bytearray()
    try:
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise APIError(413, f"request body is larger than the limit ({limit} bytes)", code="upload_too_large")
    except ClientDisconnect:
        raise client_gone() from None
    return bytes(buf)


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^\s;]+))', re.IGNORECASE)


def _check_complete(body: bytes, content_type: str) -> None:
    """A body cut short (a dropped connection with a matching Content-Length, a broken client) must
    not be stored as if it were whole: the parser would silently drop the parts it never saw (e.g.
    adapter_config, turning a P_TUNING upload into PROMPT_TUNING). The last delimiter must close."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise APIError(400, "multipart/form-data needs a boundary parameter", code="invalid_multipart")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    last = body.rfind(delimiter)
    if last < 0 or body[last + len(delimiter): last + len(delimiter) + 2] != b"--":
        raise APIError(400, "multipart body is incomplete: it does not end with the closing boundary; "
                       "nothing was stored, send the whole upload again", code="invalid_multipart")


async def _parse_multipart(request: Request, body: bytes) -> Any:
    """Parse an already size-checked, complete body with Starlette's multipart parser."""
    _check_complete(body, request.headers.get("content-type", ""))
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        return await replay.form(max_files=4, max_fields=8)
    except Exception as e:  # malformed multipart
        raise APIError(400, f"malformed multipart body: {e}", code="invalid_multipart") from None


async def _part_bytes(form: Any, field: str, limit: int) -> bytes | None:
    value = form.get(field)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        data = await value.read()
    else:
        data = str(value).encode("utf-8")
    if len(data) > limit:
        raise APIError(413, f"{field} is {len(data)} bytes; the limit is {limit}", param=field, code="upload_too_large")
    return data


def build_prompts_router(
    get_store: Callable[[], PromptStore],
    get_principal: Callable[..., Principal],
    get_cache: Callable[[], PromptCache | None] = lambda: None,
) -> APIRouter:
    router = APIRouter(tags=["prompts"])

    @router.get("/v1/prompts", response_model=PromptList)
    def list_prompts(principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        store = get_store()
        with _store_errors():
            metas = list(store.list(principal.tenant))
            if principal.tenant != PUBLIC_TENANT:
                metas += store.list(PUBLIC_TENANT)
        return {"data": [_info(m, principal) for m in metas]}

    # Specific suffix routes first: `{name:path}` would otherwise swallow "/versions".
    @router.get("/v1/prompts/{name:path}/versions", response_model=PromptVersionList)
    def list_versions(name: str, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        ns, pname, version = _parse_ref(principal, name)
        if version is not None:
            raise APIError(400, "use the prompt name without @version to list versions", param="name")
        with _store_errors("name"):
            metas = get_store().versions(ns, pname)
        infos = [_info(m, principal) for m in metas]
        return {"id": infos[0]["id"], "data": infos}

    @router.get("/v1/prompts/{name:path}/download")
    def download(name: str, version: str | None = Query(default=None), principal: Principal = Depends(get_principal)) -> Response:
        ns, pname, ref_version = _parse_ref(principal, name)
        if version and ref_version and version != ref_version:
            raise APIError(400, "version given both as name@version and ?version= and they differ", param="version")
        store = get_store()
        with _store_errors("name"):
            meta = store.resolve(ns, pname, version or ref_version)
            data = store.export_zip(meta)
        filename = f"{meta.name}-{meta.version}.zip"
        return Response(
            content=data,
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    @router.get("/v1/prompts/{name:path}", response_model=PromptInfo)
    def get_prompt(name: str, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        if is_composition(name):  # "a+b": every part checked like a single reference (foreign = missing)
            with _store_errors("name"):
                meta, parts = resolve_reference(get_store(), principal, name)
            return _composition_info(meta, parts, principal)
        ns, pname, version = _parse_ref(principal, name)
        with _store_errors("name"):
            meta = get_store().resolve(ns, pname, version)
        return _info(meta, principal)

    @router.put("/v1/prompts/{name:path}", response_model=PromptUploadResponse, status_code=201)
    async def put_prompt(name: str, request: Request, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        ns, pname, version = _parse_ref(principal, name)
        if version is not None:
            raise APIError(400, "versions are assigned by the server; upload to the bare name", param="name")
        _require_write(principal, ns)
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise APIError(415, "upload must be multipart/form-data with an adapter_model file part", code="unsupported_media_type")
        store = get_store()
        body = await _read_body_limited(request, store.max_upload_bytes + _MULTIPART_SLACK)
        form = await _parse_multipart(request, body)
        try:
            model_bytes = await _part_bytes(form, "adapter_model", store.max_upload_bytes)
            if model_bytes is None:
                raise APIError(400, "missing required file part 'adapter_model'", param="adapter_model")
            config_bytes = await _part_bytes(form, "adapter_config", _MAX_CONFIG_BYTES)
            desc_bytes = await _part_bytes(form, "description", 4096)
        finally:
            await form.close()
        description = desc_bytes.decode("utf-8", errors="replace") if desc_bytes else None
        with _store_errors("adapter_model"):
            # Hashing + validation + disk writes are blocking: keep them off the event loop.
            meta, warnings = await run_in_threadpool(store.put, ns, pname, model_bytes, config_bytes, description)
        return {**_info(meta, principal), "warnings": warnings}

    @router.delete("/v1/prompts/{name:path}", response_model=PromptDeleted)
    def delete_prompt(name: str, principal: Principal = Depends(get_principal)) -> dict[str, Any]:
        ns, pname, version = _parse_ref(principal, name)
        if version is not None:
            raise APIError(400, "single versions cannot be deleted; delete the name", param="name")
        store = get_store()
        # Resolve before the permission check so a missing public prompt is 404, not 403.
        with _store_errors("name"):
            metas = store.versions(ns, pname)
        _require_write(principal, ns)
        with _store_errors("name"):
            store.delete(ns, pname)
        cache = get_cache()
        if cache is not None:
            # Unpinned entries go now; pinned ones (in-flight requests) go on their last release.
            for m in metas:
                cache.discard(m.sha256)
        return {"id": _info(metas[0], principal)["id"], "deleted": True}

    return router
