"""Plain-Python scheduler: who prefills, who decodes, who is done. No torch here.

Iteration-level (continuous) batching: every step each running request gets exactly one new token,
waiting requests are admitted as soon as a row is free, and a finished request leaves at once.

Fairness between tenants follows S-LoRA's virtual token counter (VTC): each tenant has a counter of
the service it received (prompt tokens x input cost + generated tokens x output cost); a free row
goes to the waiting tenant with the smallest counter. A tenant that becomes active is lifted to the
smallest counter among active tenants, so idling does not bank credit for a later burst.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from server.engine.config import SchedulerConfig
from server.engine.request import FinishReason, Request, RequestStatus


class QueueFullError(Exception):
    pass


@dataclass
class SchedulerOutput:
    step: int
    prefill: list[Request] = field(default_factory=list)  # new rows: prefill, then first token
    decode: list[Request] = field(default_factory=list)  # rows already in the batch: one token each
    finished: list[Request] = field(default_factory=list)  # left since the last step (aborted, timed out)

    @property
    def is_empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def scheduled(self) -> list[Request]:
        """Runner output order: decode rows first, then prefill rows."""
        return self.decode + self.prefill


@dataclass(frozen=True)
class RunnerOutput:
    """What the model runner produced for `SchedulerOutput.scheduled`, in that order."""

    sampled_token_ids: list[int]
    logprobs: list[object | None] | None = None  # per row, opaque to the scheduler
    failed_rows: dict[int, str] = field(default_factory=dict)  # row index -> error (that row only)


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_token_ids: set[int]) -> None:
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: dict[str, deque[Request]] = {}  # tenant -> FIFO of its waiting requests
        self.running: list[Request] = []
        self.tenant_counters: dict[str, float] = {}  # VTC: service received per tenant
        self._left: list[Request] = []  # finished outside a step (abort, timeout), reported next step
        self.step_count = 0

    # ---- intake -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def num_waiting_for(self, tenant: str) -> int:
        return len(self.waiting.get(tenant, ()))

    def add(self, request: Request) -> None:
        if self.num_waiting >= self.config.max_queue:
            raise QueueFullError(f"queue is full ({self.config.max_queue} waiting requests)")
        per_tenant = self.config.max_queue_per_tenant
        if per_tenant and self.num_waiting_for(request.tenant) >= per_tenant:
            raise QueueFullError(f"tenant queue is full ({per_tenant} waiting requests)")
        if not self._is_active(request.tenant):
            active = [self.tenant_counters.get(t, 0.0) for t in self._active_tenants()]
            floor = min(active) if active else 0.0
            self.tenant_counters[request.tenant] = max(self.tenant_counters.get(request.tenant, 0.0), floor)
        request.status = RequestStatus.WAITING
        self.waiting.setdefault(request.tenant, deque()).append(request)

    def _active_tenants(self) -> set[str]:
        return {t for t, q in self.waiting.items() if q} | {r.tenant for r in self.running}

    def _is_active(self, tenant: str) -> bool:
        return bool(self.waiting.get(tenant)) or any(r.tenant == tenant for r in self.running)

    def abort(self, request_id: str) -> Request | None:
        return self._remove(request_id, FinishReason.ABORT)

    def _remove(self, request_id: str, reason: FinishReason, error: str | None = None) -> Request | None:
        for queue in list(self.waiting.values()) + [self.running]:
            for request in queue:
                if request.request_id == request_id:
                    request.finish(reason, self.step_count, error=error)
                    queue.remove(request)
                    self._left.append(request)
                    return request
        return None

    def fail(self, requests: list[Request], error: str) -> None:
        for request in requests:
            request.finish(FinishReason.ERROR, self.step_count, error=error)
        self._drop_finished()

    def has_unfinished(self) -> bool:
        return bool(self.num_waiting or self.running or self._left)

    def expire(self, now: float | None = None) -> None:
        """Fail requests older than request_timeout_s (waiting or running)."""
        timeout = self.config.request_timeout_s
        if timeout <= 0:
            return
        now = time.monotonic() if now is None else now
        for queue in list(self.waiting.values()) + [self.running]:
            for request in [r for r in queue if now - r.arrival_time > timeout]:
                self._remove(request.request_id, FinishReason.ERROR, f"request timed out after {timeout:g} s")

    # ---- schedule -----------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> SchedulerOutput:
        self.expire(now)
        self.step_count += 1
        out = SchedulerOutput(step=self.step_count, decode=list(self.running), finished=self._left)
        self._left = []
        budget = self.config.max_prefill_tokens
        while len(self.running) + len(out.prefill) < self.config.max_batch_size:
            tenant = self._next_tenant()
            if tenant is None:
                break
            request = self.waiting[tenant][0]
            cost = len(request.prompt_ids)
            if out.prefill and cost > budget:
                break  # the rest waits one step; the first is always admitted so nothing starves
            self.waiting[tenant].popleft()
            budget -= cost
            self.tenant_counters[tenant] = self.tenant_counters.get(tenant, 0.0) + cost * self.config.input_token_cost
            request.status = RequestStatus.RUNNING
            request.first_scheduled_step = self.step_count
            out.prefill.append(request)
        self.running.extend(out.prefill)
        return out

    def _next_tenant(self) -> str | None:
        candidates = [t for t, q in self.waiting.items() if q]
        if not candidates:
            return None
        # Smallest counter wins; ties go to the tenant whose head request is oldest (FIFO).
        return min(candidates, key=lambda t: (self.tenant_counters.get(t, 0.0), self.waiting[t][0].arrival_time))

    # ---- update -------------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[tuple[int, Request]]:
        """Append each row's token; finish on EOS/stop token/max_tokens/max_model_len.

        Returns (row index, request) for the requests that got a token this step. Stop *strings* need text and are checked by
        the engine's detokenizer, which then calls `finish_by_stop_string`.
        """
        scheduled = sched.scheduled
        assert len(result.sampled_token_ids) == len(scheduled), "runner output does not match the schedule"
        stepped = []
        for row, (request, token_id) in enumerate(zip(scheduled, result.sampled_token_ids)):
            if request.is_finished:  # aborted while the step ran
                continue
            if row in result.failed_rows:
                request.finish(FinishReason.ERROR, self.step_count, error=result.failed_rows[row])
                self._left.append(request)
                continue
            if request.sampling.max_tokens == 0:  # score only: the prefill was for its prompt logprobs
                request.finish(FinishReason.LENGTH, self.step_count)
                stepped.append((row, request))
                continue
            request.output_ids.append(token_id)
            self.tenant_counters[request.tenant] = self.tenant_counters.get(request.tenant, 0.0) + self.config.output_token_cost
            sampling = request.sampling
            is_stop_token = token_id in sampling.stop_token_ids or (
                not sampling.ignore_eos and token_id in self.eos_token_ids
            )
            if is_stop_token and request.num_output_tokens >= sampling.min_tokens:
                request.finish(FinishReason.STOP, self.step_count)
            elif request.num_output_tokens >= sampling.max_tokens:
                request.finish(FinishReason.LENGTH, self.step_count)
            elif request.total_len >= self.config.max_model_len:
                request.finish(FinishReason.LENGTH, self.step_count)
            stepped.append((row, request))
        return stepped

    def finish_by_stop_string(self, request: Request) -> None:
        request.finish(FinishReason.STOP, self.step_count)

    def drop_finished(self) -> list[Request]:
        return self._drop_finished()

    def _drop_finished(self) -> list[Request]:
        done = [r for r in self.running if r.is_finished]
        if done:
            self.running = [r for r in self.running if not r.is_finished]
        return done
