"""Uploaded prompts' KV computed ahead of their first request, in spare engine capacity.

With the prompt-KV tier on (`--kv-tier-dir`, softserve/engine/kv_tier.py), every upload of a prompt-tuning
prompt queues one warm-up: a background engine request (the Batch API's scheduling class: it only takes
capacity that no interactive request waits for) of the prompt plus one token, max_tokens 1, whose only
effect is that the engine computes the prompt's KV and files it in its caches and on disk. Its token is
discarded. A prompt whose KV the tier already holds is skipped, and so is a second upload of the same
content while the first waits. Prefix-tuning prompts need nothing: their tensor is their KV.

Tenants take turns (round robin), so one tenant's bulk upload does not hold back another's warm-ups.
The queue is bounded (`max_pending`); beyond it uploads still succeed and their prompts are computed at
first use, as without the tier.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable

from softserve.engine.async_engine import AsyncEngine
from softserve.engine.request import FinishReason, Request, SamplingParams, SoftPrompt, SoftPromptRef
from softserve.store.store import PromptStore
from softserve.store.types import PromptMeta

log = logging.getLogger("softserve.kv_warmer")


@dataclass(frozen=True)
class WarmerStats:
    pending: int  # queued, not yet handed to the engine
    in_flight: int  # in the engine now
    done: int  # computed and filed
    skipped: int  # the tier held their KV already
    failed: int  # the store read or the engine request failed (computed at first use instead)
    dropped: int  # not queued: the queue was full


class PromptKVWarmer:
    def __init__(self, engine: AsyncEngine, store: PromptStore, *, device, dtype, token_id: int,
                 has_kv: Callable[[str], bool], max_in_flight: int = 8, max_pending: int = 100_000) -> None:
        self.engine = engine
        self.store = store
        self.device, self.dtype = device, dtype
        self.token_id = token_id
        self.has_kv = has_kv
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        # Round robin over tenants, so that one tenant's bulk upload does not hold back another's warm-ups.
        self._pending: dict[str, deque[PromptMeta]] = {}
        self._turns: deque[str] = deque()  # tenants with pending warm-ups, next first
        self._num_pending = 0
        self._queued_shas: set[str] = set()  # pending or in flight: one warm-up per content
        self._in_flight = 0
        self._cond = threading.Condition()
        self._stopped = False
        self.done = self.skipped = self.failed = self.dropped = 0
        self._thread = threading.Thread(target=self._loop, name="softserve-kv-warmer", daemon=True)
        self._thread.start()

    def enqueue(self, meta: PromptMeta, tenant: str) -> bool:
        """Queue `meta`'s warm-up (the uploading tenant's, for fair sharing); False if not queued."""
        if meta.kind != "prompt_tuning":
            return False
        with self._cond:
            if self._stopped or meta.sha256 in self._queued_shas:
                return False
            if self._num_pending >= self.max_pending:
                self.dropped += 1
                return False
            if tenant not in self._pending:
                self._pending[tenant] = deque()
                self._turns.append(tenant)
            self._pending[tenant].append(meta)
            self._num_pending += 1
            self._queued_shas.add(meta.sha256)
            self._cond.notify_all()
        return True

    def stats(self) -> WarmerStats:
        with self._cond:
            return WarmerStats(self._num_pending, self._in_flight, self.done, self.skipped, self.failed, self.dropped)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until nothing is pending or in flight (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._num_pending and not self._in_flight, timeout)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._turns.clear()
            self._num_pending = 0
            self._cond.notify_all()
        self._thread.join(5.0)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or (self._num_pending and self._in_flight < self.max_in_flight))
                if self._stopped:
                    return
                tenant = self._turns.popleft()
                queue = self._pending[tenant]
                meta = queue.popleft()
                if queue:
                    self._turns.append(tenant)
                else:
                    del self._pending[tenant]
                self._num_pending -= 1
                self._in_flight += 1
            try:
                started = self._start(meta, tenant)
            except Exception as exc:  # noqa: BLE001 - a failed warm-up only means the first request computes it
                log.warning("prompt-KV warm-up of %s/%s failed: %s: %s", tenant, meta.ref, type(exc).__name__, exc)
                started = False
                with self._cond:
                    self.failed += 1
            if not started:
                self._finish(meta.sha256)

    def _start(self, meta: PromptMeta, tenant: str) -> bool:
        """Hands the warm-up to the engine; False where there is nothing to do."""
        if self.has_kv(meta.sha256):
            with self._cond:
                self.skipped += 1
            return False
        tensor = self.store.load_tensor(meta).to(device=self.device, dtype=self.dtype)
        ref = SoftPromptRef(name=meta.name, version=meta.version, sha256=meta.sha256,
                            num_virtual_tokens=meta.num_virtual_tokens)

        def on_finish(request: Request) -> None:
            with self._cond:
                if request.finish_reason == FinishReason.ERROR:
                    self.failed += 1
                    log.warning("prompt-KV warm-up of %s/%s failed in the engine: %s", tenant, meta.ref, request.error)
                else:
                    self.done += 1
            self._finish(meta.sha256)

        request = Request(request_id=f"kvwarm-{uuid.uuid4().hex[:16]}", prompt_ids=[self.token_id],
                          sampling=SamplingParams(max_tokens=1, temperature=0.0),
                          soft_prompt=SoftPrompt(ref=ref, embeddings=tensor, kind=meta.kind),
                          tenant=tenant, background=True, on_finish=on_finish)
        self.engine.submit_detached(request)
        return True

    def _finish(self, sha256: str) -> None:
        with self._cond:
            self._in_flight -= 1
            self._queued_shas.discard(sha256)
            self._cond.notify_all()
