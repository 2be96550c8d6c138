"""`StorageBackend` on an S3-compatible object store (AWS S3, SeaweedFS, MinIO, ...) via boto3.

- Every key lives under `s3://<bucket>/<prefix>/<key>`; a PutObject is atomic (readers see the old
  object or the new one, never a mix), which is all the store's write ordering needs.
- `put(..., if_absent=True)` is a conditional create (`If-None-Match: *`).
- Compare-and-swap for head manifests: `get_with_etag` + `put_if_match` (`If-Match: <etag>`, or
  `If-None-Match: *` to create) + `delete_if_match`. AWS S3 has these since 2024 (conditional
  deletes since 2025); SeaweedFS (checked with 4.48) enforces all three. `check_conditional_writes()`
  probes the server once: where a server ignores the headers, `conditional_writes` is False and the
  store falls back to last-writer-wins for concurrent updates of one name from several replicas.
- Objects under `immutable_prefixes` (content-addressed blobs) are kept in a small in-memory LRU:
  their bytes never change under a key, so they are never revalidated.

Credentials, region and endpoint come from boto3's usual chain (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL_S3,
~/.aws/..., instance roles); `endpoint_url` overrides the endpoint (path-style addressing then).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from .. import keys
from ..types import PromptStoreError
from .base import ObjectInfo, validate_key

__all__ = ["S3Backend", "StorageUnavailable"]

log = logging.getLogger("softserve.s3")

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_PRECONDITION = {"PreconditionFailed", "412"}
# AWS answers 409 ConditionalRequestConflict when two conditional writes to one key overlap.
_CONFLICT = {"ConditionalRequestConflict", "409"}


class StorageUnavailable(PromptStoreError):
    """The object store did not answer (network, credentials, 5xx): the API answers 503."""

    status_code = 503
    code = "store_unavailable"


def _code(exc: Exception) -> str:
    resp = getattr(exc, "response", None) or {}
    code = str((resp.get("Error") or {}).get("Code") or "")
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return code or (str(status) if status else "")


def _status(exc: Exception) -> int | None:
    resp = getattr(exc, "response", None) or {}
    return (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")


def _missing(exc: Exception) -> bool:
    """The key does not exist (a missing bucket is an error, not a missing key)."""
    code = _code(exc)
    return code in _NOT_FOUND or (_status(exc) == 404 and code != "NoSuchBucket")


class S3Backend:
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        immutable_prefixes: tuple[str, ...] = ("blobs/",),
        immutable_cache_bytes: int = 64 * 1024 * 1024,
        create_bucket: bool = False,
    ) -> None:
        if not bucket:
            raise ValueError("S3 store URL needs a bucket: s3://bucket[/prefix]")
        self.bucket = bucket
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        self.prefix = f"{prefix}/" if prefix else ""
        self.endpoint_url = endpoint_url or None  # the server's settings pass SOFTSERVE_S3_ENDPOINT_URL here
        self._client = client if client is not None else self._make_client(self.endpoint_url, region_name)
        self.immutable_prefixes = tuple(immutable_prefixes)
        self.immutable_cache_bytes = int(immutable_cache_bytes)
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cache_bytes = 0
        self._cache_lock = threading.Lock()
        # True until check_conditional_writes() shows the server ignores conditional headers.
        self.conditional_writes = True
        if create_bucket:
            self.ensure_bucket()

    @staticmethod
    def _make_client(endpoint_url: str | None, region_name: str | None):
        import boto3
        from botocore.config import Config

        region = region_name or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region is None and endpoint_url:
            region = "us-east-1"  # S3-compatible servers accept any region; boto3 needs one to sign
        config = Config(
            retries={"max_attempts": 4, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=32,
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)

    def __repr__(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"S3Backend(s3://{self.bucket}/{self.prefix}{where})"

    # ---- helpers --------------------------------------------------------------------------------
    def _key(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _call(self, op: str, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, op)(Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            status = _status(exc)
            if _code(exc) in _NOT_FOUND | _PRECONDITION | _CONFLICT or status in (304, 404, 409, 412):
                raise  # the callers give these their meaning
            if status is not None and status < 500 and status not in (429,):
                raise StorageUnavailable(f"object store refused {op}: {exc}") from exc
            raise StorageUnavailable(f"object store error on {op}: {exc}") from exc
        except BotoCoreError as exc:  # connection refused, timeouts, missing credentials
            raise StorageUnavailable(f"object store unreachable ({op}): {exc}") from exc

    def _immutable(self, key: str) -> bool:
        return any(key.startswith(p) for p in self.immutable_prefixes)

    def _cache_get(self, key: str) -> bytes | None:
        with self._cache_lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
            return data

    def _cache_put(self, key: str, data: bytes) -> None:
        if not self._immutable(key) or len(data) > self.immutable_cache_bytes:
            return
        with self._cache_lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._cache_bytes -= len(old)
            self._cache[key] = data
            self._cache_bytes += len(data)
            while self._cache_bytes > self.immutable_cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._cache_bytes -= len(dropped)

    def _cache_drop(self, key: str) -> None:
        with self._cache_lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self._cache_bytes -= len(old)

    # ---- StorageBackend -------------------------------------------------------------------------
    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        from botocore.exceptions import ClientError

        full = self._key(key)
        data = bytes(data)
        for attempt in range(5):
            try:
                if if_absent:
                    self._call("put_object", Key=full, Body=data, IfNoneMatch="*")
                else:
                    self._call("put_object", Key=full, Body=data)
                break
            except ClientError as exc:
                code, status = _code(exc), _status(exc)
                if if_absent and (code in _PRECONDITION or status == 412):
                    return False
                if code in _CONFLICT or status == 409:
                    time.sleep(0.05 * (attempt + 1))  # an overlapping conditional write: retry
                    continue
                raise StorageUnavailable(f"object store error on put: {exc}") from exc
        else:
            raise StorageUnavailable(f"object store kept answering 409 Conflict for {key!r}")
        if self._immutable(key):
            self._cache_drop(key)  # (re)written through this backend: never serve older bytes
        return True

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        from botocore.exceptions import ClientError

        try:
            resp = self._call("get_object", Key=self._key(key))
        except ClientError as exc:
            if _missing(exc):
                raise KeyError(key) from None
            raise StorageUnavailable(f"object store error on get: {exc}") from exc
        body = resp["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        return data, str(resp.get("ETag", ""))

    def get(self, key: str) -> bytes:
        cached = self._cache_get(key) if self._immutable(key) else None
        if cached is not None:
            return cached
        data, _ = self.get_with_etag(key)
        self._cache_put(key, data)
        return data

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        if self._immutable(key) and self._cache_get(key) is not None:
            return True
        try:
            self._call("head_object", Key=self._key(key))
            return True
        except ClientError as exc:
            if _missing(exc):
                return False
            raise StorageUnavailable(f"object store error on head: {exc}") from exc

    def list(self, prefix: str) -> list[str]:
        return [item.key for item in self.list_with_mtime(prefix)]

    def list_with_mtime(self, prefix: str) -> list[ObjectInfo]:
        if prefix and (prefix.startswith("/") or ".." in prefix.split("/")):
            raise ValueError(f"invalid prefix {prefix!r}")
        out: list[ObjectInfo] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": self.prefix + prefix, "MaxKeys": 1000}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call("list_objects_v2", **kwargs)
            for item in resp.get("Contents", []) or []:
                key = item["Key"][len(self.prefix):]
                try:
                    validate_key(key)
                except ValueError:
                    continue  # foreign objects (e.g. dot-names) are never exposed
                out.append(ObjectInfo(key, item["LastModified"].timestamp(), int(item.get("Size", 0))))
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
            if not token:
                break
        return sorted(out)

    def info(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            resp = self._call("head_object", Key=self._key(key))
        except ClientError as exc:
            if _missing(exc):
                return None
            raise StorageUnavailable(f"object store error on head: {exc}") from exc
        return ObjectInfo(key, resp["LastModified"].timestamp(), int(resp.get("ContentLength", 0)))

    def delete(self, key: str) -> None:
        from botocore.exceptions import ClientError

        self._cache_drop(key)
        try:
            self._call("delete_object", Key=self._key(key))
        except ClientError as exc:
            if _missing(exc):
                return
            raise StorageUnavailable(f"object store error on delete: {exc}") from exc

    # ---- ConditionalBackend ---------------------------------------------------------------------
    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        from botocore.exceptions import ClientError

        if etag is None:
            return self.put(key, data, if_absent=True)
        try:
            self._call("put_object", Key=self._key(key), Body=bytes(data), IfMatch=etag)
        except ClientError as exc:
            code, status = _code(exc), _status(exc)
            # 412: changed meanwhile; 404: deleted meanwhile; 409: a concurrent conditional write
            if code in _PRECONDITION | _CONFLICT or status in (409, 412) or _missing(exc):
                return False
            raise StorageUnavailable(f"object store error on conditional put: {exc}") from exc
        self._cache_drop(key)
        return True

    def delete_if_match(self, key: str, etag: str) -> bool:
        from botocore.exceptions import ClientError

        self._cache_drop(key)
        try:
            self._call("delete_object", Key=self._key(key), IfMatch=etag)
        except ClientError as exc:
            code, status = _code(exc), _status(exc)
            if code in _PRECONDITION | _CONFLICT or status in (409, 412) or _missing(exc):
                return False
            if status == 501 or code == "NotImplemented":
                # Conditional deletes unsupported: a plain delete (the head is read just before).
                self.delete(key)
                return True
            raise StorageUnavailable(f"object store error on conditional delete: {exc}") from exc
        return True

    # ---- setup --------------------------------------------------------------------------------
    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError:
            pass
        except Exception as exc:
            raise StorageUnavailable(f"object store unreachable: {exc}") from exc
        try:
            self._client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StorageUnavailable(f"cannot create bucket {self.bucket!r}: {exc}") from exc

    def check_conditional_writes(self) -> bool:
        """Probe once whether the server enforces `If-None-Match: *` and `If-Match` on PutObject.

        Writes and deletes one small object under `<prefix>/_softserve/`. Sets and returns
        `self.conditional_writes`; logs a warning when unsupported."""
        probe = f"{keys.PROBE_PREFIX}probe-{uuid.uuid4().hex}"
        supported = False
        try:
            self.put(probe, b"1")
            created_again = self.put(probe, b"2", if_absent=True)
            _, etag = self.get_with_etag(probe)
            stale_ok = self.put_if_match(probe, b"3", '"0123456789abcdef0123456789abcdef"')
            unchanged = self.get(probe) == b"1"
            fresh_ok = self.put_if_match(probe, b"4", etag)
            supported = (not created_again) and (not stale_ok) and unchanged and fresh_ok
        finally:
            try:
                self.delete(probe)
            except Exception:  # pragma: no cover - best effort
                pass
        self.conditional_writes = supported
        if not supported:
            log.warning(
                "%r ignores conditional writes (If-None-Match / If-Match): concurrent updates of one "
                "prompt name from several replicas fall back to last-writer-wins", self,
            )
        return supported
