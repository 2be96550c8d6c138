"""Plain-Python scheduler: who prefills, who decodes, who is done. No torch here.

Iteration-level (continuous) batching: every step each running request gets exactly one new token,
waiting requests are admitted as soon as a row is free, and a finished request leaves at once.
"""

from __future__ import annotations

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
    finished: list[Request] = field(default_factory=list)  # left since the last step (aborted)

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


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_token_ids: set[int]) -> None:
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._aborted: list[Request] = []
        self.step_count = 0

    # ---- intake -------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFullError(f"queue is full ({self.config.max_queue} waiting requests)")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    request.finish(FinishReason.ABORT, self.step_count)
                    queue.remove(request)
                    self._aborted.append(request)
                    return request
        return None

    def fail(self, requests: list[Request], error: str) -> None:
        for request in requests:
            request.finish(FinishReason.ERROR, self.step_count, error=error)
        self._drop_finished()

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    # ---- schedule -----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self.step_count += 1
        out = SchedulerOutput(step=self.step_count, decode=list(self.running), finished=self._aborted)
        self._aborted = []
        budget = self.config.max_prefill_tokens
        while self.waiting and len(self.running) + len(out.prefill) < self.config.max_batch_size:
            request = self.waiting[0]
            cost = len(request.prompt_ids)
            if out.prefill and cost > budget:
                break  # the rest waits one step; the first is always admitted so nothing starves
            self.waiting.popleft()
            budget -= cost
            request.status = RequestStatus.RUNNING
            request.first_scheduled_step = self.step_count
            out.prefill.append(request)
        self.running.extend(out.prefill)
        return out

    # ---- update -------------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Append each row's token; finish on EOS/stop token/max_tokens/max_model_len.

        Returns the requests that got a token this step. Stop *strings* need text and are checked by
        the engine's detokenizer, which then calls `finish_by_stop_string`.
        """
        scheduled = sched.scheduled
        assert len(result.sampled_token_ids) == len(scheduled), "runner output does not match the schedule"
        for request, token_id in zip(scheduled, result.sampled_token_ids):
            if request.is_finished:  # aborted while the step ran
                continue
            request.output_ids.append(token_id)
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
        return scheduled

    def finish_by_stop_string(self, request: Request) -> None:
        request.finish(FinishReason.STOP, self.step_count)

    def drop_finished(self) -> list[Request]:
        return self._drop_finished()

    def _drop_finished(self) -> list[Request]:
        done = [r for r in self.running if r.is_finished]
        if done:
            self.running = [r for r in self.running if not r.is_finished]
        return done
