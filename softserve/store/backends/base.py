"""Bytes-in, bytes-out key/value storage that maps onto an object store (S3, GCS) later.

Only operations an object store has natively are exposed: put (optionally create-if-absent),
get, exists, prefix list, delete, and (for the garbage collector) a key's modification time and size. No rename, no directories, and the store never needs `list`
to look something up (listing is eventually consistent or slow on some object stores).
"""

from __future__ import annotations

import builtins
import hashlib
import re
from typing import NamedTuple, Protocol, runtime_checkable

__all__ = ["StorageBackend", "ConditionalBackend", "ObjectInfo", "validate_key", "content_etag"]

_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@=-]*$")


def validate_key(key: str) -> str:
    """Keys are '/'-separated relative paths. Components may not start with '.', which (a) rules
    out '.' and '..' traversal and (b) reserves dot-names for temp files, so those can never be
    read or listed through the interface."""
    if not isinstance(key, str) or not key or len(key) > 1024:
        raise ValueError(f"invalid storage key {key!r}")
    if key.startswith("/") or "\\" in key or "\0" in key:
        raise ValueError(f"invalid storage key {key!r}")
    for part in key.split("/"):
        if not _COMPONENT.fullmatch(part):
            raise ValueError(f"invalid storage key {key!r}")
    return key


class ObjectInfo(NamedTuple):
    key: str
    mtime: float  # unix seconds of the last write, by the backend's clock (S3: LastModified)
    size: int  # bytes


@runtime_checkable
class StorageBackend(Protocol):
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write atomically. With if_absent, return False (and write nothing) if key exists."""
        ...

    def get(self, key: str) -> bytes:
        """Raise KeyError if missing."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """All keys starting with prefix, sorted. For enumerating prompts only, never lookups."""
        ...

    def delete(self, key: str) -> None:
        """Missing key is not an error."""
        ...

    def list_with_mtime(self, prefix: str) -> builtins.list[ObjectInfo]:  # (the class's own list() shadows it)
        """Like `list`, with each key's modification time and size (S3 ListObjectsV2 has both).
        For the garbage collector, which never deletes anything younger than its grace period."""
        ...

    def info(self, key: str) -> ObjectInfo | None:
        """Modification time and size of one key (S3 HeadObject); None if missing. Never cached."""
        ...


@runtime_checkable
class ConditionalBackend(StorageBackend, Protocol):
    """Optional compare-and-swap on single keys (S3 conditional writes: `If-Match` / `If-None-Match`).

    The store updates head manifests through these when the backend has them, so several writer
    processes (replicas) on one backend cannot lose each other's updates. An etag is an opaque
    string that changes whenever the key's bytes change."""

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        """(bytes, etag). Raise KeyError if missing."""
        ...

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        """Write iff the key's current etag is `etag` (etag None: iff the key is absent).
        Return False, writing nothing, when the condition fails."""
        ...

    def delete_if_match(self, key: str, etag: str) -> bool:
        """Delete iff the key's current etag is `etag`. False if it changed or is missing."""
        ...



def content_etag(data: bytes) -> str:
    """The etag of the local and memory backends: a hash of the bytes (S3 has its own)."""
    return hashlib.sha256(data).hexdigest()
