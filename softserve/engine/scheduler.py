"""Plain-Python scheduler: which tokens of which requests go into this step's one forward. No torch.

Token-level continuous batching. Every step builds ONE packed batch:
- one token for every decoding row (its last sampled token);
- a chunk of the prompt of every row still prefilling, and of newly admitted rows, under a per-step
  token budget (`max_prefill_tokens`): a long prompt is split over several steps (chunked prefill);
- the virtual tokens of a soft prompt whose KV is not cached yet are computed as part of the row's
  first chunk (positions 0..k-1), and the runner files their KV in the prefix cache from that same
  forward. A request whose prompt is being computed by another row waits one step and then hits.
A row samples a token only in the step whose chunk reaches the end of its known tokens.

Finishing: `finish` is the one place a request ends, for every reason (EOS, stop token, length, a
stop string the engine's detokenizer found, abort, timeout, a failed row or step). It takes the
request out of the queue or the batch at once, frees its KV, and queues it for `take_finished`,
from which the engine builds the request's last delta.

KV: each running request owns one contiguous extent of the KV pool (see kv_allocator.py) from
admission to finish. Admission stops when no extent fits, so a full pool means waiting, never OOM.

Fairness between tenants follows S-LoRA's virtual token counter (VTC): each tenant has a counter of
the service it received (prompt tokens x input cost + generated tokens x output cost); a free row
goes to the waiting tenant with the smallest counter. A tenant that becomes active is lifted to the
smallest counter among active tenants, so idling does not bank credit for a later burst.

Priorities: a request's `priority` (lower first, as in vLLM) orders only its own tenant's queue, so a
tenant cannot jump other tenants with it (between tenants the counters decide). The same holds for
background rows among the tenant's own waiting background rows.

Background rows (Batch API lines) take only the capacity interactive traffic leaves:
- they wait in queues of their own and are admitted only when no interactive request waits;
- they never hold a row an interactive request needs: interactive admission counts interactive rows
  only (`max_batch_size` of them), background admission counts every row;
- while interactive work is present (a request waits or runs, or one did less than
  `background_grace_s` ago), background decode rows ride in the step (a decode token adds little to a
  step whose cost is streaming the weights) up to the rows interactive ones leave free
  (`max_batch_size` minus the step's interactive rows, oldest first), and their prompt chunks and
  admissions together get at most `max_background_tokens` prompt tokens per step (prompt tokens are
  what make a step long); the others pause for that step and keep their KV. In a step whose
  interactive rows all decode (one token each), each background prompt chunk is one token: the
  runner attends every one-query row in its decode group (packed_attention.py), so batch prompt work
  never adds a prefill group (an SDPA call per layer, ~+5 ms of a ~42 ms CPU step) beside interactive
  decodes, and still advances (up to the cap's rows, a token each) under unending decode traffic. The
  grace keeps a
  client's next request from landing behind a long step of batch rows. Except when an
  interactive request waits for KV pool space: then running background rows run uncapped, to finish
  and free it (no new ones are admitted); and when one waits for a soft prompt's KV that a background
  row is computing, that row's chunk is uncapped;
- for `background_hold_s` after interactive work left (the first schedule that finds none), no
  background row runs at all: a client's next request, sent as soon as it has its answer, finds the
  engine free instead of behind a step of batch rows (`idle_seconds` tells the engine thread how long
  to wait for a request instead of scheduling again);
- a step made of background rows only (no interactive work present) holds at most
  `max_background_step_tokens` tokens (decode tokens first, then prompt chunks, then admissions), so
  an interactive request that arrives waits behind a short step, never a long batch prefill;
- a paused row's timeout does not count while it is paused (its clock stops).
- The Batch runner bounds how many it hands over, so they are outside the --max-queue limits, and a
  waiting background row never times out (only once it runs).
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from softserve.engine.config import SchedulerConfig
from softserve.engine.kv_allocator import KVAllocator
from softserve.engine.outputs import RunnerOutput
from softserve.engine.request import ErrorKind, FinishReason, Request, RequestStatus


class QueueFullError(Exception):
    """The waiting queue (all tenants, or this tenant's share) is full: retry later."""

    def __init__(self, message: str, *, per_tenant: bool) -> None:
        super().__init__(message)
        self.per_tenant = per_tenant


@dataclass(frozen=True)
class ScheduledRow:
    """One request's slice of the packed batch: positions start .. start+num_tokens-1 of its sequence."""

    request: Request
    start: int  # first position computed this step (== request.num_computed_tokens at schedule time)
    num_tokens: int
    samples: bool  # the chunk reaches the end of the known tokens: sample the next token
    computes_prefix: bool  # the chunk covers the soft prompt's virtual tokens (cache miss)


@dataclass
class SchedulerOutput:
    step: int
    rows: list[ScheduledRow] = field(default_factory=list)  # packed order: decode, continued prefill, new
    prefill: list[Request] = field(default_factory=list)  # admitted this step
    decode: list[Request] = field(default_factory=list)  # already running, one token each

    @property
    def is_empty(self) -> bool:
        return not self.rows

    @property
    def scheduled(self) -> list[Request]:
        """Rows that get a token this step, in packed order: the runner's outputs line up with these."""
        return [row.request for row in self.rows if row.samples]


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        eos_token_ids: set[int],
        prefix_lookup: Callable[[Request], Any] | None = None,
    ) -> None:
        self.config = config
        self.eos_token_ids = set(eos_token_ids)
        # Returns the prompt's cached KV (any non-None handle) or None; given by the engine.
        self.prefix_lookup = prefix_lookup or (lambda request: None)
        self.waiting: dict[str, deque[Request]] = {}  # tenant -> its waiting interactive requests, by priority
        self.background: dict[str, deque[Request]] = {}  # tenant -> FIFO of its waiting background rows
        self.running: list[Request] = []
        self.tenant_counters: dict[str, float] = {}  # VTC: service received per tenant
        self.kv = KVAllocator(config.kv_cache_tokens) if config.kv_cache_tokens else None
        self._prefix_in_progress: dict[str, str] = {}  # prompt sha256 -> request computing its KV
        self._finished: list[Request] = []  # finished since the engine last took them (take_finished)
        self.step_count = 0
        self._interactive_seen_at = -float("inf")  # when interactive work was last present (the grace)
        self._interactive_left_at = -float("inf")  # the first schedule that found none after some (the hold)
        self._had_interactive = False  # the last schedule found interactive work
        self._pool_blocked = False  # this step's interactive admission stopped at a full KV pool
        self._prefix_blocker: str | None = None  # ... or at a prompt KV this request (id) computes

    # ---- intake -------------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values()) + self.num_background_waiting

    @property
    def num_background_waiting(self) -> int:
        return sum(len(q) for q in self.background.values())

    def _queues(self) -> list[deque[Request]]:
        return list(self.waiting.values()) + list(self.background.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def num_waiting_for(self, tenant: str) -> int:
        return len(self.waiting.get(tenant, ()))

    def reservation(self, request: Request) -> int:
        return max(1, min(request.kv_reservation, self.config.max_model_len))

    def check_admission(self, tenant: str, *, also_waiting: int = 0, also_waiting_for_tenant: int = 0,
                        background: bool = False) -> None:
        """The one queue check: raises QueueFullError when the queue, or the tenant's share of it, is
        full. `also_*` count requests handed over but not added yet (the async engine's pending).
        Background rows are bounded by their runner, not here, and never fill the interactive queue."""
        if background:
            return
        if self.num_waiting - self.num_background_waiting + also_waiting >= self.config.max_queue:
            raise QueueFullError(f"queue is full ({self.config.max_queue} waiting requests)", per_tenant=False)
        per_tenant = self.config.max_queue_per_tenant
        if per_tenant and self.num_waiting_for(tenant) + also_waiting_for_tenant >= per_tenant:
            raise QueueFullError(f"tenant queue is full ({per_tenant} waiting requests)", per_tenant=True)

    def add(self, request: Request) -> None:
        if self.kv is not None and self.reservation(request) > self.kv.capacity:
            raise ValueError(f"request needs {self.reservation(request)} KV slots, the pool holds {self.kv.capacity}")
        self.check_admission(request.tenant, background=request.background)
        if not self._is_active(request.tenant):
            active = [self.tenant_counters.get(t, 0.0) for t in self._active_tenants()]
            floor = min(active) if active else 0.0
            self.tenant_counters[request.tenant] = max(self.tenant_counters.get(request.tenant, 0.0), floor)
        request.status = RequestStatus.WAITING
        queue = (self.background if request.background else self.waiting).setdefault(request.tenant, deque())
        if queue and queue[-1].priority > request.priority:  # behind every request of its priority or better
            position = next(i for i, r in enumerate(queue) if r.priority > request.priority)
            queue.insert(position, request)
        else:
            queue.append(request)

    def _active_tenants(self) -> set[str]:
        return ({t for t, q in self.waiting.items() if q} | {t for t, q in self.background.items() if q}
                | {r.tenant for r in self.running})

    def _is_active(self, tenant: str) -> bool:
        return (bool(self.waiting.get(tenant)) or bool(self.background.get(tenant))
                or any(r.tenant == tenant for r in self.running))

    def abort(self, request_id: str) -> Request | None:
        request = self._find(request_id)
        if request is not None:
            self.finish(request, FinishReason.ABORT)
        return request

    def _find(self, request_id: str) -> Request | None:
        for queue in self._queues() + [self.running]:
            for request in queue:
                if request.request_id == request_id:
                    return request
        return None

    def finish(self, request: Request, reason: FinishReason, error: str | None = None,
               error_kind: ErrorKind | None = None) -> bool:
        """The one place a request finishes (see the module docstring). False if it had already."""
        if not request.mark_finished(reason, self.step_count, error=error, error_kind=error_kind):
            return False
        for queue in (self.running, self.waiting.get(request.tenant, ()), self.background.get(request.tenant, ())):
            # (or none of them: refused at add)
            if _unlink(queue, request):
                break
        self._release(request)
        self._finished.append(request)
        return True

    def take_finished(self) -> list[Request]:
        """The requests finished since the last call, in the order they finished (each once)."""
        finished, self._finished = self._finished, []
        return finished

    def _release(self, request: Request) -> None:
        """Give back the request's KV extent and any claim on computing its prompt's KV."""
        if self.kv is not None:
            self.kv.free(request.request_id)
        request.kv_offset = None
        request.cached_prefix = None
        sha = request.prompt_sha256
        if sha is not None and self._prefix_in_progress.get(sha) == request.request_id:
            del self._prefix_in_progress[sha]

    def fail(self, requests: list[Request], error: str) -> None:
        for request in requests:
            self.finish(request, FinishReason.ERROR, error=error, error_kind=ErrorKind.ENGINE_ERROR)

    def has_unfinished(self) -> bool:
        """Anything to run, or a finished request whose last delta the engine has not built yet."""
        return bool(self.num_waiting or self.running or self._finished)

    def expire(self, now: float | None = None) -> None:
        """Fail requests older than request_timeout_s (waiting or running; a paused background row's
        clock stops while it is paused)."""
        timeout = self.config.request_timeout_s
        if timeout <= 0:
            return
        now = time.monotonic() if now is None else now
        for queue in list(self.waiting.values()) + [self.running]:  # waiting background rows never time out
            for request in [r for r in queue if _age(r, now) > timeout]:
                self.finish(request, FinishReason.ERROR, f"request timed out after {timeout:g} s", ErrorKind.TIMEOUT)

    # ---- schedule -----------------------------------------------------------------------------
    def schedule(self, now: float | None = None) -> SchedulerOutput:
        self.expire(now)
        now = time.monotonic() if now is None else now
        self.step_count += 1
        out = SchedulerOutput(step=self.step_count)
        budget = self.config.max_prefill_tokens
        chunk = sys.maxsize  # the most prompt tokens one background row gets this step
        has_interactive = self._has_interactive_work()
        holding = self._holding(now, has_interactive)
        interactive_present = self._interactive_present(now, has_interactive)
        decoding, prefilling = [], []
        for request in self.running:
            if request.num_uncomputed_tokens == 1 and request.num_computed_tokens >= self._prompt_end(request):
                decoding.append(request)
            else:
                prefilling.append(request)
        # Interactive work first: its decodes, prefill chunks, then its admissions.
        for request in (r for r in decoding if not r.background):
            self._schedule_decode(out, request)
        for request in (r for r in prefilling if not r.background):  # next chunk of admitted rows
            if budget <= 0:
                break
            budget -= self._schedule_chunk(out, request, budget)
        self._pool_blocked, self._prefix_blocker = False, None
        budget = self._admit(out, self.waiting, budget, now)
        blocker = next((r for r in prefilling if r.background and r.request_id == self._prefix_blocker), None)
        if blocker is not None and budget > 0:
            # An interactive request waits for the prompt KV this batch row computes: uncapped, so it never
            # waits on the cap (nor forever, with a cap of 0).
            budget -= self._schedule_chunk(out, blocker, budget)
        # Background rows get what is left (module docstring): decodes (oldest first), prefill chunks,
        # then admissions, under one of three limits.
        if self._pool_blocked:  # an interactive request waits for KV that batch rows hold: let them finish
            rows, tokens = sys.maxsize, sys.maxsize
        elif holding:  # interactive work just left: the engine stays free for the client's next request
            rows, tokens = 0, 0
        elif interactive_present:  # decodes ride up to the free rows; prompt tokens under the cap
            rows = max(0, self.config.max_batch_size - len(out.rows))
            tokens = sys.maxsize
            budget = min(budget, self.config.max_background_tokens)
            if out.rows and all(row.num_tokens == 1 for row in out.rows):
                chunk = 1  # interactive decodes only: batch prompt chunks of one query never open a prefill group
        else:  # a batch-only step: short, so an arriving interactive request never waits long
            rows, tokens = sys.maxsize, self.config.max_background_step_tokens
        for request in (r for r in decoding if r.background):
            if rows <= 0 or tokens <= 0:
                break  # the rest pause this step: they keep their row and KV
            self._schedule_decode(out, request)
            rows, tokens = rows - 1, tokens - 1
        budget = min(budget, tokens)
        for request in (r for r in prefilling if r.background and r is not blocker):
            if budget <= 0 or rows <= 0:
                break
            budget -= self._schedule_chunk(out, request, min(budget, chunk))
            rows -= 1
        if not any(self.waiting.values()) and rows > 0:  # an interactive request waits: it goes first
            self._admit(out, self.background, budget, now, max_rows=rows, max_chunk=chunk)
        self._track_pauses(out, now)
        return out

    def _track_pauses(self, out: SchedulerOutput, now: float) -> None:
        """Stop a paused background row's timeout clock; restart it (shifted) when the row runs again."""
        scheduled = {id(row.request) for row in out.rows}
        for request in self.running:
            if not request.background:
                continue
            if id(request) not in scheduled:
                if request.paused_since is None:
                    request.paused_since = now
            elif request.paused_since is not None:
                request.arrival_time += now - request.paused_since
                request.paused_since = None

    @staticmethod
    def _schedule_decode(out: SchedulerOutput, request: Request) -> None:
        out.decode.append(request)
        out.rows.append(ScheduledRow(request, request.num_computed_tokens, 1, True, False))

    def _has_interactive_work(self) -> bool:
        """Interactive requests waiting or running now (batch rows aside)."""
        return any(self.waiting.values()) or any(not r.background for r in self.running)

    def _holding(self, now: float, present: bool) -> bool:
        """No interactive work now (`present` False), and it left less than `background_hold_s` ago (tracked
        here: the first schedule without it after one with it is when it left)."""
        if self._had_interactive and not present:
            self._interactive_left_at = now
        self._had_interactive = present
        return not present and now - self._interactive_left_at < self.config.background_hold_s

    def idle_seconds(self, now: float | None = None) -> float:
        """After a step that scheduled nothing: how long schedules stay empty unless a request arrives (the
        hold, or the grace of a prompt-token cap that leaves batch rows nothing), so the engine waits for a
        command instead of spinning. 0: schedule again now."""
        if self._has_interactive_work():
            return 0.0
        now = time.monotonic() if now is None else now
        for end in (self._interactive_left_at + self.config.background_hold_s,
                    self._interactive_seen_at + self.config.background_grace_s):
            if now < end:
                return end - now
        return 0.0

    def _interactive_present(self, now: float, present: bool) -> bool:
        """Interactive work now (`present`), or it left less than `background_grace_s` ago."""
        if present:
            self._interactive_seen_at = now
            return True
        return now - self._interactive_seen_at < self.config.background_grace_s

    def _admit(self, out: SchedulerOutput, queues: dict[str, deque[Request]], budget: int, now: float,
               max_rows: int = sys.maxsize, max_chunk: int = sys.maxsize) -> int:
        """Admit waiting requests from `queues` while rows and prefill budget last (at most `max_chunk` tokens
        each); returns the budget left. Interactive requests count only interactive rows: background rows
        pause instead of holding one."""
        background = queues is self.background
        rows = len(self.running) if background else sum(1 for r in self.running if not r.background)
        while budget > 0 and rows < self.config.max_batch_size and max_rows > 0:
            tenant = self._next_tenant(queues)
            if tenant is None:
                break
            request = queues[tenant][0]
            sha = request.prompt_sha256
            if sha is not None and sha in self._prefix_in_progress:
                if not background:
                    self._prefix_blocker = self._prefix_in_progress[sha]
                break  # another row is computing this prompt's KV: wait one step and hit the cache
            if self.kv is not None:
                offset = self.kv.allocate(request.request_id, self.reservation(request))
                if offset is None:
                    self._pool_blocked = not background
                    break  # the pool is full: wait for a row to finish (never over-commit memory)
                request.kv_offset = offset
            queues[tenant].popleft()
            if request.background:  # its timeout counts from here: waiting for spare capacity is not slowness
                request.arrival_time = now
            request.status = RequestStatus.RUNNING
            request.first_scheduled_step = self.step_count
            request.num_computed_tokens = 0
            if request.soft_prompt is not None:
                request.cached_prefix = self.prefix_lookup(request)
                if request.cached_prefix is not None:
                    request.num_computed_tokens = request.num_virtual_tokens
                else:
                    self._prefix_in_progress[sha] = request.request_id
            self.running.append(request)
            rows += 1
            max_rows -= 1
            out.prefill.append(request)
            budget -= self._schedule_chunk(out, request, min(budget, max_chunk))
        return budget

    @staticmethod
    def _prompt_end(request: Request) -> int:
        return request.num_virtual_tokens + len(request.prompt_ids)

    def _schedule_chunk(self, out: SchedulerOutput, request: Request, budget: int) -> int:
        start = request.num_computed_tokens
        num_tokens = min(request.num_uncomputed_tokens, budget)
        samples = start + num_tokens == request.total_len
        computes_prefix = request.cached_prefix is None and start < request.num_virtual_tokens
        out.rows.append(ScheduledRow(request, start, num_tokens, samples, computes_prefix))
        prompt_tokens = max(0, min(start + num_tokens, self._prompt_end(request)) - max(start, request.num_virtual_tokens))
        self.tenant_counters[request.tenant] = (
            self.tenant_counters.get(request.tenant, 0.0) + prompt_tokens * self.config.input_token_cost
        )
        return num_tokens

    def _next_tenant(self, queues: dict[str, deque[Request]]) -> str | None:
        candidates = [t for t, q in queues.items() if q]
        if not candidates:
            return None
        # Smallest counter wins; ties go to the tenant whose head request is oldest (FIFO).
        return min(candidates, key=lambda t: (self.tenant_counters.get(t, 0.0), queues[t][0].arrival_time))

    # ---- update -------------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[tuple[int, Request]]:
        """Advance every row's computed tokens; append sampled tokens; finish on EOS/stop token/length.

        Returns (index into `sched.scheduled`, request) for the requests that got a token this step
        (finished ones too). Stop *strings* need text: the engine's detokenizer finds them and calls
        `finish`.
        """
        scheduled = sched.scheduled
        assert len(result.sampled_token_ids) == len(scheduled), "runner output does not match the schedule"
        for row in sched.rows:
            request = row.request
            if not request.is_finished:
                request.num_computed_tokens = row.start + row.num_tokens
                sha = request.prompt_sha256
                if row.computes_prefix and request.num_computed_tokens >= request.num_virtual_tokens:
                    if self._prefix_in_progress.get(sha) == request.request_id:
                        del self._prefix_in_progress[sha]  # its KV is in the prefix cache now
        stepped = []
        for index, (request, token_id) in enumerate(zip(scheduled, result.sampled_token_ids)):
            if request.is_finished:  # aborted while the step ran
                continue
            if index in result.failed_rows:
                self.finish(request, FinishReason.ERROR, error=result.failed_rows[index])
                continue
            if request.sampling.max_tokens == 0:  # score only: the prefill was for its prompt logprobs
                self.finish(request, FinishReason.LENGTH)
                stepped.append((index, request))
                continue
            request.output_ids.append(token_id)
            self.tenant_counters[request.tenant] = self.tenant_counters.get(request.tenant, 0.0) + self.config.output_token_cost
            sampling = request.sampling
            is_stop_token = token_id in sampling.stop_token_ids or (
                not sampling.ignore_eos and token_id in self.eos_token_ids
            )
            if is_stop_token and request.num_output_tokens >= sampling.min_tokens:
                self.finish(request, FinishReason.STOP)
            elif request.num_output_tokens >= sampling.max_tokens or request.total_len >= self.config.max_model_len:
                self.finish(request, FinishReason.LENGTH)
            stepped.append((index, request))
        return stepped


def _age(request: Request, now: float) -> float:
    """Seconds a request has been waiting or running, less the time a background row spent paused."""
    return (now if request.paused_since is None else request.paused_since) - request.arrival_time


def _unlink(queue: list[Request] | deque[Request], request: Request) -> bool:
    """Remove `request` by identity (Request is a dataclass: == would compare every field)."""
    for index, queued in enumerate(queue):
        if queued is request:
            del queue[index]
            return True
    return False
