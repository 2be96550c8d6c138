"""Soft-prompt management without HTTP: read, upload, delete and roll back prompts for a principal.

Blocking (store reads and writes, hashing): call from a worker thread. Every store error leaves here
as a typed ServiceError naming the request field at fault; tenancy decides what a principal may see.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator

from softserve.store.cache import PromptCache
from softserve.store.store import PromptStore
from softserve.store.types import PromptMeta, PromptStoreError

from .auth import Principal
from .errors import InvalidRequest, from_store_error
from .tenancy import PromptRef, parse_reference, require_write, resolve_reference, visible_prompts

__all__ = ["store_errors", "parse", "list_prompts", "list_prompts_page", "DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE",
           "get_prompt", "list_versions", "export", "upload", "delete", "rollback", "check_upload_target"]


@contextlib.contextmanager
def store_errors(param: str | None = None) -> Iterator[None]:
    try:
        yield
    except PromptStoreError as exc:
        raise from_store_error(exc, param) from None


def parse(principal: Principal, reference: str, param: str = "name") -> PromptRef:
    """A single reference, for reading (see tenancy.parse_reference)."""
    with store_errors(param):
        return parse_reference(principal, reference)


def list_prompts(store: PromptStore, principal: Principal) -> list[PromptMeta]:
    with store_errors():
        return visible_prompts(store, principal)


DEFAULT_PAGE_SIZE = 1000  # GET /v1/prompts without ?limit=: every prompt of a tenant with fewer names
MAX_PAGE_SIZE = 10_000


def _listing_position(principal: Principal, meta: PromptMeta) -> tuple[int, str]:
    """Where a prompt sits in a listing: the principal's own names in order, then the public ones."""
    return (0 if meta.tenant == principal.tenant else 1, meta.name)


def _cursor_position(principal: Principal, after: str) -> tuple[int, str]:
    """The listing position of an id from an earlier page ("name" or "public/name"); the prompt itself
    may have been deleted since."""
    try:
        ref = parse_reference(principal, after)
    except PromptStoreError:  # malformed, or a namespace this principal cannot read
        ref = None
    if ref is None or ref.version is not None:
        raise InvalidRequest(f"after must be a prompt id from an earlier page, got {after!r}", param="after")
    return (0 if ref.namespace == principal.tenant else 1, ref.name)


def list_prompts_page(store: PromptStore, principal: Principal, *, after: str | None = None,
                      limit: int = DEFAULT_PAGE_SIZE) -> tuple[list[PromptMeta], bool]:
    """(page, has_more): up to `limit` prompts of visible_prompts' order (own names sorted, then the
    public ones sorted) that come after the id `after`."""
    start = _cursor_position(principal, after) if after is not None else None
    metas = list_prompts(store, principal)
    first = 0 if start is None else bisect.bisect_right([_listing_position(principal, m) for m in metas], start)
    return metas[first:first + limit], first + limit < len(metas)


def get_prompt(store: PromptStore, principal: Principal, reference: str) -> tuple[PromptMeta, tuple[PromptMeta, ...]]:
    """(meta, parts): a single prompt (parts == ()) or a composition "a+b" (every part checked alike)."""
    with store_errors("name"):
        return resolve_reference(store, principal, reference)


def list_versions(store: PromptStore, principal: Principal, reference: str) -> list[PromptMeta]:
    ref = parse(principal, reference)
    if ref.version is not None:
        raise InvalidRequest("use the prompt name without @version to list versions", param="name")
    with store_errors("name"):
        return store.versions(ref.namespace, ref.name)


def export(store: PromptStore, principal: Principal, reference: str, version: str | None) -> tuple[PromptMeta, bytes]:
    """A version as a PEFT adapter zip; `version` (a query parameter) must agree with a "name@version"."""
    ref = parse(principal, reference)
    if version and ref.version and version != ref.version:
        raise InvalidRequest("version given both as name@version and ?version= and they differ", param="version")
    with store_errors("name"):
        meta = store.resolve(ref.namespace, ref.name, version or ref.version)
        return meta, store.export_zip(meta)


def check_upload_target(principal: Principal, reference: str) -> PromptRef:
    """Before any body byte is read: the name is valid and the principal may write there."""
    ref = parse(principal, reference)
    if ref.version is not None:
        raise InvalidRequest("versions are assigned by the server; upload to the bare name", param="name")
    require_write(principal, ref.namespace)
    return ref


def upload(store: PromptStore, ref: PromptRef, model_bytes: bytes, config_bytes: bytes | None,
           description: str | None) -> tuple[PromptMeta, list[str]]:
    with store_errors("adapter_model"):
        return store.put(ref.namespace, ref.name, model_bytes, config_bytes, description)


def delete(store: PromptStore, cache: PromptCache | None, principal: Principal, reference: str) -> list[PromptMeta]:
    """Delete a name (every version); returns what was deleted. A missing public prompt is NotFound, not
    PermissionDenied: the name is resolved before the write check."""
    ref = parse(principal, reference)
    if ref.version is not None:
        raise InvalidRequest("single versions cannot be deleted; delete the name", param="name")
    with store_errors("name"):
        metas = store.versions(ref.namespace, ref.name)
    require_write(principal, ref.namespace)
    with store_errors("name"):
        store.delete(ref.namespace, ref.name)
    if cache is not None:
        # Unpinned entries go now; pinned ones (in-flight requests) go on their last release.
        for meta in metas:
            cache.discard(meta.sha256)
    return metas


def rollback(store: PromptStore, principal: Principal, reference: str, version: str) -> PromptMeta:
    """Make an older version the latest again: re-storing a version's own bytes is the store's rollback."""
    ref = parse(principal, reference)
    if ref.version is not None:
        raise InvalidRequest("give the bare prompt name in the path and the version in the body", param="name")
    with store_errors("version"):
        meta = store.resolve(ref.namespace, ref.name, version)  # NotFound before PermissionDenied, as in delete
    require_write(principal, ref.namespace)
    with store_errors("version"):
        files = store.export_files(meta)
        new_meta, _ = store.put(ref.namespace, ref.name, files["adapter_model.safetensors"],
                                files["adapter_config.json"], meta.description)
    return new_meta
