"""`StorageBackend` on a local directory: atomic writes by temp file + rename, compare-and-swap under
a per-key file lock."""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .base import ObjectInfo, content_etag, validate_key

__all__ = ["LocalBackend", "STALE_TEMP_SECONDS"]


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
        return data, content_etag(data)

    def _current_etag(self, path: Path) -> str | None:
        try:
            return content_etag(path.read_bytes())
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

