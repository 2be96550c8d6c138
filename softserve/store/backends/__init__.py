"""Storage backends of the prompt store: the `StorageBackend` protocol (base.py) and its three
implementations, a local directory, process memory and S3, plus `open_backend` that picks one from a URL."""

from __future__ import annotations

import os

from .base import ConditionalBackend, ObjectInfo, StorageBackend, content_etag, validate_key
from .local import LocalBackend
from .memory import MemoryBackend

__all__ = ["StorageBackend", "ConditionalBackend", "LocalBackend", "MemoryBackend", "ObjectInfo", "validate_key",
           "content_etag", "open_backend"]


def open_backend(
    url: str | os.PathLike[str],
    *,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    check_conditional_writes: bool = True,
) -> StorageBackend:
    """Backend for a store location:

    - `s3://bucket[/prefix]`: `S3Backend` (boto3; credentials and region from the usual AWS_*
      environment variables / config files; `s3_endpoint_url` for SeaweedFS, MinIO, ...);
    - `memory://`: `MemoryBackend` (ephemeral);
    - `file:///path` or a plain path: `LocalBackend` (created if missing).
    """
    text = os.fspath(url)
    if text.startswith("s3://"):
        from .s3 import S3Backend  # boto3 is imported only for s3:// stores

        rest = text[len("s3://"):]
        bucket, _, prefix = rest.partition("/")
        backend = S3Backend(bucket, prefix, endpoint_url=s3_endpoint_url, region_name=s3_region)
        if check_conditional_writes:
            backend.check_conditional_writes()
        return backend
    if text.startswith("memory://"):
        return MemoryBackend()
    if text.startswith("file://"):
        text = text[len("file://"):]
    elif "://" in text:
        raise ValueError(f"unsupported store URL {text!r}: use a directory, file:///dir, s3://bucket/prefix or memory://")
    return LocalBackend(text)
