"""The upload warm-up queue (softserve/service/kv_warmer.py) with a stand-in engine: tenants take turns,
one warm-up per content, at most `max_in_flight` in the engine, and every outcome is counted."""

from __future__ import annotations

import threading
import time

import torch

from softserve.engine.request import ErrorKind, FinishReason
from softserve.service.kv_warmer import PromptKVWarmer
from softserve.store.types import PromptMeta


class FakeEngine:
    def __init__(self) -> None:
        self.submitted = []
        self.lock = threading.Lock()

    def submit_detached(self, request) -> None:
        with self.lock:
            self.submitted.append(request)

    def finish(self, index: int, error: bool = False) -> None:
        request = self.submitted[index]
        request.finish_reason = FinishReason.ERROR if error else FinishReason.LENGTH
        request.error_kind = ErrorKind.ENGINE_ERROR if error else None
        request.on_finish(request)


class FakeStore:
    def load_tensor(self, meta):
        return torch.zeros(meta.num_virtual_tokens, 8)


def meta(tenant: str, name: str, sha: str, peft_type: str = "PROMPT_TUNING") -> PromptMeta:
    return PromptMeta(tenant=tenant, name=name, version=sha[:12], sha256=sha, num_virtual_tokens=4, token_dim=8,
                      dtype="float32", peft_type=peft_type, created_at=0, description=None)


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_tenants_take_turns_and_each_content_is_warmed_once():
    engine = FakeEngine()
    warmer = PromptKVWarmer(engine, FakeStore(), device="cpu", dtype=torch.float32, token_id=0,
                            has_kv=lambda sha: sha == "k" * 64, max_in_flight=1)
    try:
        with warmer._cond:  # (re-entrant) every upload queued before the warmer takes the first
            for i in range(4):
                assert warmer.enqueue(meta("bulk", f"p{i}", str(i) * 64), "bulk")
            assert not warmer.enqueue(meta("bulk", "again", "0" * 64), "bulk")  # the same content is queued already
            assert warmer.enqueue(meta("other", "q", "9" * 64), "other")
            assert warmer.enqueue(meta("other", "known", "k" * 64), "other")  # the tier has it: skipped
            assert not warmer.enqueue(meta("other", "prefix", "8" * 64, peft_type="PREFIX_TUNING"), "other")
        order = []
        for step in range(5):
            wait_until(lambda: len(engine.submitted) == step + 1)
            request = engine.submitted[step]
            order.append((request.tenant, request.soft_prompt.ref.sha256[0]))
            assert request.background and request.sampling.max_tokens == 1 and request.prompt_ids == [0]
            assert warmer.stats().in_flight == 1  # one at a time, as configured
            engine.finish(step, error=step == 2)
        assert warmer.wait_idle(5)
        assert order == [("bulk", "0"), ("other", "9"), ("bulk", "1"), ("bulk", "2"), ("bulk", "3")]
        stats = warmer.stats()
        assert (stats.done, stats.failed, stats.skipped, stats.pending, stats.in_flight) == (4, 1, 1, 0, 0)
        assert warmer.enqueue(meta("bulk", "p0", "0" * 64), "bulk")  # finished: may be queued again
    finally:
        warmer.close()


def test_a_full_queue_drops_and_counts():
    engine = FakeEngine()
    warmer = PromptKVWarmer(engine, FakeStore(), device="cpu", dtype=torch.float32, token_id=0,
                            has_kv=lambda sha: False, max_in_flight=1, max_pending=2)
    try:
        results = [warmer.enqueue(meta("t", f"p{i}", str(i) * 64), "t") for i in range(5)]
        wait_until(lambda: len(engine.submitted) == 1)
        assert results.count(False) >= 2 and warmer.stats().dropped == results.count(False)
    finally:
        warmer.close()
