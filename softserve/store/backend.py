"""Bytes-in, bytes-out key/value storage that maps onto an object store (S3, GCS) later.

Only operations an object store has natively are exposed: put (optionally create-if-absent),
get, exists, prefix list, delete, and (for the garbage collector) a key's modification time and size. No rename, no directories, and the store never needs `list`
to look something up (listing is eventually consistent or slow on some object stores).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
import time
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Protocol, runtime_checkable

__all__ = ["StorageBackend", "ConditionalBackend", "LocalBackend", "MemoryBackend", "ObjectInfo", "validate_key",
           "open_backend"]

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

    def list_with_mtime(self, prefix: str) -> list[ObjectInfo]:
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


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    # Makes the rename/unlink itself durable; not supported on every platform/filesystem.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


STALE_TEMP_SECONDS = 3600.0


class LocalBackend:
    """Files under `root`. Each put: temp file in the target dir, fsync, os.replace (or os.link for
    if_absent, which fails atomically when the target exists), fsync the dir. A crash leaves either
    the old file or the new one, plus at most a hidden temp file."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*validate_key(key).split("/"))

    def remove_stale_temp_files(self, older_than_s: float = STALE_TEMP_SECONDS, *, now: float | None = None) -> int:
        """Delete `.tmp-*` files that a writer killed between writing and renaming (kill -9) left behind.
        Only files older than the grace period: a live writer's temp file, also one of another process
        sharing the directory, is seconds old. Returns how many were removed."""
        return self.stale_temp_files(older_than_s, now=now)[0]

    def stale_temp_files(self, older_than_s: float = STALE_TEMP_SECONDS, *, now: float | None = None,
                         dry_run: bool = False) -> tuple[int, int]:
        """`remove_stale_temp_files` that also reports the bytes freed (and can only count): (files, bytes)."""
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = freed = 0
        for path in self._hidden_files(".tmp-"):
            try:
                st = path.stat()
                if st.st_mtime < cutoff:
                    if not dry_run:
                        path.unlink()
                    removed += 1
                    freed += st.st_size
            except FileNotFoundError:  # its writer finished (or another cleaner got it) meanwhile
                continue
        return removed, freed

    def _hidden_files(self, marker: str) -> Iterator[Path]:
        """Our hidden files (`.tmp-*`, `.lock-*`) anywhere under the root; never part of a key."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if name.startswith(marker):
                    yield Path(dirpath) / name

    def put(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if if_absent and path.exists():
            return False
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if if_absent:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    return False
                except OSError:
                    # Filesystem without hard links: a narrow race is acceptable here because
                    # if_absent is only used for content-addressed blobs (same key = same bytes).
                    if path.exists():
                        return False
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)
            _fsync_dir(path.parent)
            return True
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str) -> list[str]:
        if prefix:
            if prefix.startswith("/") or ".." in prefix.split("/"):
                raise ValueError(f"invalid prefix {prefix!r}")
        # Walk only the deepest directory the prefix fully names.
        base_parts = prefix.split("/")[:-1]
        base = self.root.joinpath(*base_parts) if base_parts else self.root
        if not base.is_dir():
            return []
        out: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for fn in filenames:
                if fn.startswith("."):
                    continue  # temp files are never visible
                key = fn if rel == "." else f"{rel}/{fn}"
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def list_with_mtime(self, prefix: str) -> list[ObjectInfo]:
        out = []
        for key in self.list(prefix):
            found = self.info(key)
            if found is not None:  # deleted between the walk and the stat
                out.append(found)
        return out

    def info(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, st.st_mtime, st.st_size)

    def remove_stale_lock_files(self, older_than_s: float = STALE_TEMP_SECONDS, *, now: float | None = None,
                                dry_run: bool = False) -> tuple[int, int]:
        """Delete `.lock-<name>` files whose key `<name>` no longer exists (a deleted prompt, a finished
        lease) and that are older than the grace period. Each is deleted while holding its flock, and
        `_locked` re-checks after locking that its file is still the one at the path, so a writer that
        opened a lock file just before it was unlinked retries on a fresh one instead of locking a
        ghost. Returns (files, bytes)."""
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = freed = 0
        for lock in self._hidden_files(".lock-"):
            target = lock.with_name(lock.name[len(".lock-"):])
            if target.exists():
                continue  # its key is live: the lock file is reused by the next update
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # someone is updating that key right now
                st = os.fstat(fd)
                if st.st_mtime >= cutoff or target.exists():
                    continue
                if not dry_run:
                    os.unlink(lock)
                removed += 1
                freed += st.st_size
            except FileNotFoundError:
                continue
            finally:
                os.close(fd)
        return removed, freed

    # ---- compare-and-swap (ConditionalBackend) ---------------------------------------------------
    # etag = sha256 of the file's bytes. The compare and the swap happen under an exclusive flock on
    # a hidden per-key lock file, so processes sharing this directory (one host, or a filesystem with
    # working POSIX locks) serialise their updates of one key. Plain put/delete do not take the lock.
    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        lock = path.parent / f".lock-{path.name}"
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    same = os.stat(lock).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)  # the garbage collector unlinked this lock file meanwhile: lock the new one
        try:
            yield
        finally:
            os.close(fd)  # releases the lock

    def get_with_etag(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, _etag(data)

    def _current_etag(self, path: Path) -> str | None:
        try:
            return _etag(path.read_bytes())
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        path = self._path(key)
        with self._locked(path):
            if self._current_etag(path) != etag:
                return False
            return self.put(key, data)

    def delete_if_match(self, key: str, etag: str) -> bool:
        path = self._path(key)
        with self._locked(path):
            if self._current_etag(path) != etag:
                return False
            self.delete(key)
            return True


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
        return data, _etag(data)

    def put_if_match(self, key: str, data: bytes, etag: str | None) -> bool:
        validate_key(key)
        with self._lock:
            cur = self._data.get(key)
            if (None if cur is None else _etag(cur)) != etag:
                return False
            self._data[key] = bytes(data)
            self._mtimes[key] = self.clock()
            return True

    def delete_if_match(self, key: str, etag: str) -> bool:
        validate_key(key)
        with self._lock:
            cur = self._data.get(key)
            if cur is None or _etag(cur) != etag:
                return False
            del self._data[key]
            self._mtimes.pop(key, None)
            return True


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
        from .s3_backend import S3Backend

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
