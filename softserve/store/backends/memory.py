"""`StorageBackend` in process memory, for tests and ephemeral dev servers (`memory://`)."""

from __future__ import annotations

import threading
import time

from .base import ObjectInfo, content_etag, validate_key

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """In-process backend for tests and ephemeral dev servers."""

    def __init__(self, clock=time.time) -> None:
        self._data: dict[str, bytes] = {}
        self._mtimes: dict[str, float] = {}
        self._lock = threading.Lock()
        self.clock = clock  # tests move it to age objects past the GC's grace period

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        validate_key(key)
        with self._lock:
            if if_absent and key in self._data:
                return False
            self._data[key] = bytes(data)
            self._mtimes[key] = self.clock()
            return True

    def set_mtime(self, key: str, mtime: float) -> None:
        """Test hook: pretend `key` was last written at `mtime`."""
        with self._lock:
            if key in self._data:
                self._mtimes[key] = mtime

    def list_with_mtime(self, prefix: str) -> list[ObjectInfo]:
        with self._lock:
            return [ObjectInfo(k, self._mtimes[k], len(self._data[k])) for k in sorted(self._data) if k.startswith(prefix)]

    def info(self, key: str) -> ObjectInfo | None:
        validate_key(key)
        with self._lock:
            if key not in self._data:
                return None
            return ObjectInfo(key, self._mtimes[key], len(self._data[key]))

    def get(self, key: str) -> bytes:
        validate_key(key)
        with self._lock:
            return self._data[key]

    def exists(self, key: str) -> bool:
        validate_key(key)
        with self._lock:
            return key in self._data

    def list(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self._data if k.startswith(prefix))

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._lock:
            self._data.pop(key, None)
            self._mtimes.pop(key, None)

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, content_etag(data)

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        validate_key(key)
        with self._lock:
            cur = self._data.get(key)
            if (None if cur is None else content_etag(cur)) != etag:
                return False
            self._data[key] = bytes(data)
            self._mtimes[key] = self.clock()
            return True

    def delete_if_match(self, key: str, etag: str) -> bool:
        validate_key(key)
        with self._lock:
            cur = self._data.get(key)
            if cur is None or content_etag(cur) != etag:
                return False
            del self._data[key]
            self._mtimes.pop(key, None)
            return True

