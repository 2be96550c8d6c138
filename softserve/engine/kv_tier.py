"""The disk tier under the prompt-KV cache: every soft prompt's KV prefix, computed once, kept on local disk.

A prompt whose KV is in neither the device cache (kv_cache.PrefixKVCache) nor here costs its k virtual
tokens as k more rows of prefill; on a CPU that is ~9% of a request's engine time at k=16 (docs/
performance.md, "10,000 prompts"). Read back from here it costs one file read of ~0.4 MB (bf16 SmolLM2,
k=16). Files are written by a background thread, never by the engine step, and survive restarts.

Layout: `<dir>/<fingerprint>/<prompt sha256>.safetensors`, one tensor `kv` [layers, 2, kv_heads, k,
head_dim] in the pool's layout (kv_cache.py) plus metadata naming the fingerprint and the prompt hash,
checked on every read. The fingerprint (`engine_fingerprint`) covers the model's config and a sample of
its weights, the dtype, the device type, the versions of torch, transformers and softserve, and the
kernels chosen (compiled or not, packed linears, our C++ kernels' build): KV is only ever read back by
an engine that would compute the same numbers, and only under its content hash, never a name, so no
tenant can be served another's state. Only this
engine's fingerprint directory counts toward `budget_bytes`; least recently used files go first. Servers
may share a directory (a volume on one host): each reads the files the others wrote, and each keeps
the budget by its own count, so together they may hold up to one budget each.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger("softserve.kv_tier")

FORMAT = "softserve-prompt-kv/1"
_SUFFIX = ".safetensors"
_WEIGHT_SAMPLES = 256  # elements hashed per parameter: enough to tell two checkpoints apart, cheap at any size
_STALE_TEMP_SECONDS = 3600  # a temp file this old is a killed writer's, not a live one's (another server's)
_MAX_QUEUED_BYTES = 256 * 1024 * 1024  # KV waiting for the writer, on the device: bounded, beyond it writes drop


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def model_fingerprint(model) -> str:
    """sha256 of the model's config (not where it was loaded from) and, per parameter, its name, shape,
    dtype and evenly spaced elements."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _WEIGHT_SAMPLES)][:_WEIGHT_SAMPLES]
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
            digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def engine_fingerprint(model_digest: str, *, dtype, device_type: str, compiled: bool, native_kernels: bool,
                       pack_linears: bool, kernels_digest: str = "") -> str:
    """What makes two engines compute the same KV for the same prompt (see the module docstring);
    `kernels_digest`: our C++ kernels' sources, flags and CPU where they run (native_kernels.build_digest)."""
    parts = (FORMAT, model_digest, str(dtype), device_type, f"torch {torch.__version__}",
             f"transformers {_version('transformers')}", f"softserve {_version('softserve')}", f"compiled={compiled}",
             f"native={native_kernels} {kernels_digest if native_kernels else ''}", f"packed={pack_linears}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class TierStats:
    hits: int
    misses: int
    writes: int
    evictions: int
    errors: int  # unreadable or mismatched files (removed) and failed writes
    dropped: int  # writes skipped because the writer's queue was full
    bytes: int
    files: int


class PrefixKVTier:
    def __init__(self, directory: str | os.PathLike, fingerprint: str, budget_bytes: int, *, max_queued_writes: int = 256) -> None:
        self.fingerprint = fingerprint
        self.budget_bytes = budget_bytes
        self.directory = Path(directory) / fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # prompt sha256 -> file bytes, least recent first
        self.bytes = 0
        self.hits = self.misses = self.writes = self.evictions = self.errors = self.dropped = 0
        self._queued_bytes = 0
        self._scan()
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued_writes)
        self._writer = threading.Thread(target=self._write_loop, name="softserve-kv-tier", daemon=True)
        self._writer.start()

    def _path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}{_SUFFIX}"

    def _scan(self) -> None:
        """The files a previous run left, oldest use first (mtime: a read hit touches its file)."""
        found = []
        now = time.time()
        for path in self.directory.iterdir():
            try:
                stat = path.stat()
                if path.name.startswith("."):  # a temp file: a killed writer's once it is old
                    if now - stat.st_mtime > _STALE_TEMP_SECONDS:
                        path.unlink(missing_ok=True)
                    continue
            except OSError:  # removed meanwhile by another server sharing the directory
                continue
            if path.suffix == _SUFFIX and _is_sha256(path.stem):
                found.append((stat.st_mtime_ns, path.stem, stat.st_size))
        for _, sha, size in sorted(found):
            self._index[sha] = size
            self.bytes += size
        self._evict_to(self.budget_bytes)

    # ---- reads: the engine thread, at admission ---------------------------------------------------
    def get(self, sha256: str, shape: tuple[int, ...], dtype, device) -> torch.Tensor | None:
        """The prompt's KV [layers, 2, kv_heads, k, head_dim] on `device`, or None. A file that does not
        match (another shape, dtype, fingerprint or prompt; truncated) is removed and counted an error.
        Never raises: it runs at admission, where an exception would stop the engine, and whatever the
        disk does (EIO, a read-only volume, a peer's eviction) the prompt can still be computed."""
        try:
            return self._get(sha256, shape, dtype, device)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            log.warning("prompt-KV tier: reading %s failed (%s: %s)", sha256, type(exc).__name__, exc)
            with self._lock:
                self.errors += 1
                self.misses += 1
            return None

    def _get(self, sha256: str, shape: tuple[int, ...], dtype, device) -> torch.Tensor | None:
        path = self._path(sha256)
        with self._lock:
            known = sha256 in self._index
        if not known and not path.exists():  # a file another server wrote into a shared directory counts too
            with self._lock:
                self.misses += 1
            return None
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                kv = f.get_tensor("kv")
            if (meta.get("format") != FORMAT or meta.get("fingerprint") != self.fingerprint
                    or meta.get("prompt_sha256") != sha256 or tuple(kv.shape) != tuple(shape) or kv.dtype != dtype):
                raise ValueError(f"{path.name} holds {tuple(kv.shape)} {kv.dtype}, metadata {meta}")
        except FileNotFoundError:  # evicted (or removed by hand) since the check: a plain miss
            with self._lock:
                self.misses += 1
                self._forget(sha256)
            return None
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a miss, never a failed request
            log.warning("prompt-KV tier: dropping %s (%s: %s)", path.name, type(exc).__name__, exc)
            with self._lock:
                self.errors += 1
                self.misses += 1
                self._forget(sha256)
            self._enqueue(("remove", sha256, None))  # by the writer: an unlink can fail too (read-only volume)
            return None
        with self._lock:
            if sha256 in self._index:
                self._index.move_to_end(sha256)
            else:  # a file another server wrote: counted from now on
                self._index[sha256] = _size(path, kv.nbytes)
                self.bytes += self._index[sha256]
            self.hits += 1
        self._enqueue(("touch", sha256, None))
        return kv.to(device)

    def __contains__(self, sha256: object) -> bool:
        with self._lock:
            return sha256 in self._index

    # ---- writes: queued, done by the writer thread -----------------------------------------------
    def put(self, sha256: str, kv: torch.Tensor) -> None:
        """Keep `kv` (not modified afterwards by the caller) under the prompt's hash; returns at once. The
        queued tensors stay on their device until written: beyond `_MAX_QUEUED_BYTES` the write is dropped."""
        if sha256 in self:
            return
        nbytes = kv.nbytes
        with self._lock:
            if self._queued_bytes + nbytes > _MAX_QUEUED_BYTES:
                self.dropped += 1
                return
            self._queued_bytes += nbytes
        if not self._enqueue(("write", sha256, kv)):
            with self._lock:
                self._queued_bytes -= nbytes

    def discard(self, sha256: str) -> None:
        self._enqueue(("remove", sha256, None))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write is on disk; False on timeout (a stuck disk never hangs the caller)."""
        done = threading.Event()
        try:
            self._queue.put(("flush", "", done), timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)

    def _enqueue(self, item) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            if item[0] == "write":
                with self._lock:
                    self.dropped += 1
            return False

    def _write_loop(self) -> None:
        while True:
            kind, sha256, payload = self._queue.get()
            try:
                if kind == "write":
                    try:
                        self._write(sha256, payload)
                    finally:
                        with self._lock:
                            self._queued_bytes -= payload.nbytes
                elif kind == "touch":
                    os.utime(self._path(sha256))
                elif kind == "remove":
                    with self._lock:
                        self._forget(sha256)
                    self._path(sha256).unlink(missing_ok=True)
                elif kind == "flush":
                    payload.set()
            except FileNotFoundError:
                pass  # evicted or removed meanwhile
            except Exception:  # noqa: BLE001 - a full disk costs the tier, not the server
                log.exception("prompt-KV tier: %s of %s failed", kind, sha256)
                with self._lock:
                    self.errors += 1

    def _write(self, sha256: str, kv: torch.Tensor) -> None:
        if sha256 in self:
            return
        tensor = kv.detach().to("cpu").contiguous()
        if tensor.nbytes > self.budget_bytes:
            return
        tmp = self.directory / f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            save_file({"kv": tensor}, str(tmp), metadata={"format": FORMAT, "fingerprint": self.fingerprint,
                                                          "prompt_sha256": sha256})
            size = tmp.stat().st_size
            with self._lock:
                self._evict_to(self.budget_bytes - size)
            os.replace(tmp, self._path(sha256))  # readers see a whole file or none
        finally:
            tmp.unlink(missing_ok=True)
        with self._lock:
            self._forget(sha256)
            self._index[sha256] = size
            self.bytes += size
            self.writes += 1

    # ---- bookkeeping (under the lock) ------------------------------------------------------------
    def _forget(self, sha256: str) -> None:
        size = self._index.pop(sha256, None)
        if size is not None:
            self.bytes -= size

    def _evict_to(self, limit: int) -> None:
        while self._index and self.bytes > limit:
            sha, size = self._index.popitem(last=False)
            self.bytes -= size
            self.evictions += 1
            try:
                self._path(sha).unlink(missing_ok=True)
            except OSError as exc:  # a read-only volume: the file stays, uncounted
                log.warning("prompt-KV tier: could not remove %s (%s)", sha, exc)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(self.hits, self.misses, self.writes, self.evictions, self.errors, self.dropped,
                             self.bytes, len(self._index))


def _size(path: Path, fallback: int) -> int:
    try:
        return path.stat().st_size
    except OSError:  # removed meanwhile by the server that wrote it
        return fallback


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)
