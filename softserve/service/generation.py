"""Generation without HTTP: turns checked inputs into engine Requests and engine deltas into results.

Shared by completions and chat completions: soft-prompt resolution (tenant-scoped, pinned in the
device cache until the request leaves the engine), the request-size and length checks, fan-out for
`n`, and cancellation when the caller goes away. Errors are typed (softserve.service.errors).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from anyio.to_thread import run_sync as run_in_threadpool

from softserve.store.types import PromptMeta, PromptStoreError
from softserve.engine.async_engine import EngineDeadError
from softserve.engine.grammar_sandbox import SandboxUnavailable
from softserve.engine.guided import GuidedSpecError
from softserve.engine.outputs import RequestOutput
from softserve.engine.request import (
    ErrorKind, FinishReason, GuidedSpec, Request, SamplingParams, SoftPrompt, SoftPromptRef,
)
from softserve.engine.scheduler import QueueFullError
from softserve.logs import log_request
from softserve.service.auth import Principal
from softserve.service.errors import (
    ClientGone, InternalError, InvalidRequest, NotFound, NotReady, Overloaded, Timeout, from_store_error,
)
from softserve.service.runtime import Runtime
from softserve.service.tenancy import INVALID_COMPOSITION, resolve_served, served_label


@dataclass
class ResolvedModel:
    label: str  # what we echo back in `model`: the request's, or the pinned served ref when an alias picked it
    meta: PromptMeta | None = None  # None: the base model; a composition's own meta for "a+b"
    parts: tuple[PromptMeta, ...] = ()  # the parts of a composition, in order; () for a single prompt
    served: str | None = None  # pinned ref of what serves ("name@version", parts joined by "+"); None: base model
    via_alias: tuple[tuple[PromptMeta, str], ...] = ()  # (version, alias) pairs an alias picked


@dataclass
class Choice:
    index: int
    prompt_index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: tuple | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0


def check_fan_out(runtime: Runtime, prompts: int, n: int) -> None:
    """Admission in O(1), before anything is tokenized or built: one request may start at most
    --max-choices-per-request sequences (len(prompt) x n)."""
    settings = runtime.settings
    if n > settings.max_n:
        raise InvalidRequest(f"n must be <= {settings.max_n} (--max-n)", param="n", code="invalid_parameter")
    limit = settings.max_choices_per_request
    if prompts * n > limit:
        raise InvalidRequest(f"this request asks for {prompts} prompt(s) x n={n} = {prompts * n} sequences; the limit "
                       f"is {limit} per request (--max-choices-per-request). Split it into smaller requests.",
                       param="prompt" if prompts > 1 else "n", code="too_many_choices")


def check_request_tokens(runtime: Runtime, prompts: list[list[int]], n: int) -> None:
    """Prompt tokens the request makes the server prefill (x n): at most --max-request-tokens."""
    limit = runtime.settings.max_request_tokens
    total = sum(len(p) for p in prompts) * n
    if total > limit:
        raise InvalidRequest(f"this request has {total} prompt tokens (summed over its prompts, x n={n}); the limit is "
                       f"{limit} per request (--max-request-tokens)", param="prompt", code="request_too_large")


def store_error(exc: PromptStoreError):
    error = from_store_error(exc, param="model")
    error.code = "model_not_found" if isinstance(error, NotFound) else "prompt_error"
    return error


def resolve_model(runtime: Runtime, principal: Principal, model_field: str, assignment: str | None = None) -> ResolvedModel:
    """`model` is the base model's served name (no soft prompt) or a prompt reference. `assignment`
    (the request's `user`, or X-Softserve-Assignment) keeps a caller on one arm of a split alias."""
    if model_field == runtime.served_model_name:
        return ResolvedModel(label=model_field)
    try:
        served = resolve_served(runtime.store, principal, model_field, assignment)
    except PromptStoreError as exc:
        if exc.code == INVALID_COMPOSITION:  # too many parts / tokens, mixed kinds: say so
            raise InvalidRequest(exc.message, param="model", code=INVALID_COMPOSITION) from exc
        if exc.status_code == 400:  # malformed reference: still "no such model" to the client
            raise NotFound(f"model {model_field!r} not found", param="model", code="model_not_found") from exc
        raise store_error(exc) from exc
    pinned = served_label(served, principal)
    return ResolvedModel(label=pinned if served.via_alias else model_field, meta=served.meta, parts=served.parts,
                         served=pinned, via_alias=served.via_alias)


async def pin_soft_prompt(runtime: Runtime, resolved: ResolvedModel) -> SoftPrompt | None:
    """Pin the prompt's tensor on the device (one pin per engine request); released on finish."""
    if resolved.meta is None:
        return None
    def acquire():  # the tensor pinned, and the KV staged from the disk tier (if on) off the engine thread
        loaded = runtime.cache.acquire(resolved.meta, resolved.parts)
        runtime.stage_prompt_kv(loaded.meta)
        return loaded

    try:
        loaded = await run_in_threadpool(acquire)
    except PromptStoreError as exc:
        raise store_error(exc) from exc
    meta = loaded.meta
    ref = SoftPromptRef(name=meta.name, version=meta.version, sha256=meta.sha256, num_virtual_tokens=meta.num_virtual_tokens)
    return SoftPrompt(ref=ref, embeddings=loaded.embeddings, kind=meta.kind)


def check_length(runtime: Runtime, num_virtual: int, num_prompt: int, max_tokens: int | None) -> int:
    """Returns the effective max_tokens; 400 naming the numbers when the request cannot fit."""
    limit = runtime.max_model_len
    if num_prompt == 0:
        raise InvalidRequest("prompt is empty: at least one token is required", param="prompt", code="empty_prompt")
    room = limit - num_virtual - num_prompt
    if max_tokens is None:
        if room < 1:
            raise InvalidRequest(f"this model's maximum context length is {limit} tokens; the request uses "
                           f"{num_virtual} virtual + {num_prompt} prompt tokens, leaving no room to generate",
                           param="messages", code="context_length_exceeded")
        return room
    if max_tokens > room:
        raise InvalidRequest(
            f"this model's maximum context length is {limit} tokens; the request needs "
            f"{num_virtual + num_prompt + max_tokens} ({num_virtual} virtual + {num_prompt} prompt + "
            f"{max_tokens} max_tokens). Reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


async def compile_guided(runtime: Runtime, principal: Principal, param: str, spec: GuidedSpec) -> GuidedSpec:
    """Compile the constraint once per request (or not at all while it is cached), off the engine thread
    and first in the sandbox (runtime.grammars): a bad or hostile grammar is an InvalidRequest, and every
    choice of the request shares the compiled grammar. An uncached compile holds one of the tenant's
    compile slots (--guided-compiles-per-tenant), so one tenant cannot queue up the compilers."""
    compiler = runtime.grammars
    if compiler is None:
        raise NotReady("structured output is not available yet", retry_after=5)
    compiled = compiler.cached(spec)
    if compiled is None:
        release = runtime.compile_slots.acquire(principal.tenant)
        try:
            compiled = await run_in_threadpool(compiler.compile, spec)
        except GuidedSpecError as exc:
            raise InvalidRequest(f"{param}: {exc}", param=param, code="invalid_grammar") from exc
        except SandboxUnavailable as exc:
            raise NotReady(f"structured output is unavailable: {exc}", retry_after=5) from exc
        finally:
            release()
    return dataclasses.replace(spec, compiled=compiled)


def per_choice_sampling(template: SamplingParams, max_tokens: int, seed_offset: int) -> SamplingParams:
    """Choice j of a request with n > 1 gets seed + j, so its n samples differ yet each is reproducible."""
    seed = template.seed
    if seed is not None:
        seed = (seed + seed_offset) % (2**63)
    return dataclasses.replace(template, max_tokens=max_tokens, seed=seed, min_tokens=min(template.min_tokens, max_tokens))


async def build_requests(
    runtime: Runtime, principal: Principal, resolved: ResolvedModel, prompts: list[list[int]],
    sampling: SamplingParams, n: int, max_tokens: int | None, request_id: str = "req", *, priority: int = 0,
    background: bool = False,
) -> tuple[list[Request], list[Choice]]:
    """One engine Request per (prompt, choice). `sampling` is the request's template: max_tokens (None:
    fill the context), seed and min_tokens are set per choice here. `priority` orders the tenant's own
    waiting requests (lower first); `background` marks Batch API rows (softserve/engine/scheduler.py)."""
    check_fan_out(runtime, len(prompts), n)  # callers check earlier too; this is the last line of defence
    check_request_tokens(runtime, prompts, n)
    num_virtual = resolved.meta.num_virtual_tokens if resolved.meta is not None else 0
    # The context check first: its message names the numbers that matter; the cap applies after.
    effective = [check_length(runtime, num_virtual, len(p), max_tokens) for p in prompts]
    limit = runtime.settings.max_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        raise InvalidRequest(f"max_tokens must be <= {limit} (--max-tokens-limit)", param="max_tokens", code="invalid_parameter")
    effective = [min(e, limit) for e in effective]
    if runtime.rate_limiter is not None:  # what the request may cost: its prompt tokens and all it may generate
        runtime.rate_limiter.charge_tokens(principal.tenant, sum(len(p) + e for p, e in zip(prompts, effective)) * n)
    requests: list[Request] = []
    choices: list[Choice] = []
    base_id = f"{request_id}-{uuid.uuid4().hex[:8]}"  # unique even if a client reuses X-Request-ID
    try:
        for p_index, prompt_ids in enumerate(prompts):
            for j in range(n):
                soft_prompt = await pin_soft_prompt(runtime, resolved)
                release = _releaser(runtime, resolved) if soft_prompt is not None else None
                index = p_index * n + j
                requests.append(Request(
                    request_id=f"{base_id}-{index}",
                    prompt_ids=prompt_ids,
                    sampling=per_choice_sampling(sampling, effective[p_index], seed_offset=j),
                    soft_prompt=soft_prompt,
                    tenant=principal.tenant,
                    on_finish=release,
                    priority=priority,
                    background=background,
                ))
                choices.append(Choice(index=index, prompt_index=p_index))
    except BaseException:
        release_all(requests)
        raise
    return requests, choices


def _releaser(runtime: Runtime, resolved: ResolvedModel):
    sha = resolved.meta.sha256

    def release(_request: Request) -> None:
        runtime.cache.release(sha)

    return release


def release_all(requests: list[Request]) -> None:
    for request in requests:
        if request.on_finish is not None:
            callback, request.on_finish = request.on_finish, None
            callback(request)


class Tracker:
    """Latency metrics and the one structured log line per API request."""

    def __init__(self, runtime: Runtime, *, request_id: str, tenant: str, endpoint: str, model: str,
                 resolved: ResolvedModel, num_prompt_tokens: int, response_id: str | None = None) -> None:
        self.runtime, self.request_id, self.tenant, self.endpoint, self.model = runtime, request_id, tenant, endpoint, model
        self.response_id = response_id  # the completion id POST /v1/feedback names
        self.resolved = resolved
        self.meta = resolved.meta
        self.num_prompt_tokens = num_prompt_tokens
        self.started = time.monotonic()
        self.last_token_at: dict[int, float] = {}
        self.first_token_at: float | None = None
        self.completion_tokens = 0

    def on_delta(self, index: int, output: RequestOutput) -> None:
        if not output.token_ids:
            return
        now = time.monotonic()
        metrics = self.runtime.metrics
        previous = self.last_token_at.get(index)
        if previous is None:
            if self.first_token_at is None:
                self.first_token_at = now
            if metrics is not None:
                metrics.ttft.observe(now - self.started)
        elif metrics is not None:
            metrics.itl.observe((now - previous) / len(output.token_ids))
        self.last_token_at[index] = now
        self.completion_tokens += len(output.token_ids)

    def finish(self, status: str) -> None:
        latency = time.monotonic() - self.started
        metrics = self.runtime.metrics
        if metrics is not None:
            metrics.latency.observe(latency)
            metrics.count_tokens(self.tenant, prompt=self.num_prompt_tokens, generated=self.completion_tokens,
                                 virtual=self.meta.num_virtual_tokens if self.meta is not None else 0)
        if self.meta is not None:
            self._per_version(status, latency)
        log_request(
            request_id=self.request_id, tenant=self.tenant, endpoint=self.endpoint, model=self.model,
            prompt=self.meta.name if self.meta is not None else None,
            prompt_version=self.meta.version if self.meta is not None else None,
            prompt_tokens=self.num_prompt_tokens, completion_tokens=self.completion_tokens,
            ttft_s=round(self.first_token_at - self.started, 4) if self.first_token_at else None,
            latency_s=round(latency, 4), status=status,
        )


    def _per_version(self, status: str, latency: float) -> None:
        """Per-version metrics, and the completion id -> served versions record that feedback uses."""
        served = version_series(self.runtime, self.tenant, self.resolved)
        metrics = self.runtime.metrics
        if metrics is not None:
            ttft = self.first_token_at - self.started if self.first_token_at else None
            for labels in {labels for _, labels in served}:
                metrics.versions.observe(labels, status=status, tokens=self.completion_tokens, ttft=ttft, latency=latency)
        if self.response_id is not None:
            self.runtime.completions.record(self.tenant, self.response_id, served)


def version_series(runtime: Runtime, tenant: str, resolved: ResolvedModel) -> list[tuple[PromptMeta, tuple[str, str, str]]]:
    """(version, metric labels) per part that served: the aliased parts get their own series while
    there is room; a request that named no alias counts its prompt as "other"."""
    metrics = runtime.metrics
    picks = list(resolved.via_alias) or [(resolved.meta, None)]
    out = []
    for meta, alias in picks:
        prompt = meta.name if meta.tenant == tenant else f"{meta.tenant}/{meta.name}"
        labels = (metrics.versions.labels(tenant, prompt, meta.version, alias is not None) if metrics is not None
                  else (tenant, prompt, meta.version))
        out.append((meta, labels))
    return out


async def stream_outputs(
    runtime: Runtime, requests: list[Request], tracker: Tracker | None = None
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Submit every request and yield (request index, delta) as they arrive, interleaved."""
    engine = runtime.engine
    status = "cancelled"
    merged: asyncio.Queue = asyncio.Queue()
    queues: list[asyncio.Queue] = []
    pumps: list[asyncio.Task] = []
    finished: set[int] = set()
    submitted = 0
    try:
        for request in requests:
            try:
                queues.append(engine.submit(request))
            except QueueFullError as exc:
                status = "rejected"
                if runtime.metrics is not None:
                    runtime.metrics.rejected.labels("queue_full").inc()
                raise Overloaded(str(exc), code="queue_full", retry_after=1) from exc
            except EngineDeadError as exc:
                status = "unavailable"
                raise NotReady("engine is not running") from exc
            submitted += 1
        # One request (n=1, one prompt: the common case) reads its engine queue directly; several are
        # merged by one pump task each. A pump costs a task switch and a queue hop per token.
        single = queues[0] if len(queues) == 1 else None
        if single is None:
            pumps = [asyncio.ensure_future(_pump(index, q, merged)) for index, q in enumerate(queues)]
        while len(finished) < len(requests):
            if single is not None:
                index, output = 0, await single.get()
            else:
                index, output = await merged.get()
            if output.finished:
                finished.add(index)
                if output.finish_reason == FinishReason.ERROR:
                    status = "error"
            if tracker is not None:
                tracker.on_delta(index, output)
            yield index, output
        if status == "cancelled":
            status = "ok"
    finally:
        if tracker is not None:
            tracker.finish(status)
        # Leaving early (client gone, error): free the batch slots; unsubmitted requests unpin here.
        for index in range(submitted):
            if index not in finished:
                engine.abort(requests[index].request_id)
        release_all(requests[submitted:])
        for task in pumps:
            task.cancel()


async def _pump(index: int, source: asyncio.Queue, sink: asyncio.Queue) -> None:
    while True:
        output = await source.get()
        await sink.put((index, output))
        if output.finished:
            return


async def collect(runtime: Runtime, requests: list[Request], choices: list[Choice], tracker: Tracker | None = None, *,
                  disconnected: Callable[[], Awaitable[None]] | None = None) -> None:
    """Run to completion; if `disconnected()` returns first (the caller went away), abort everything."""

    async def consume() -> None:
        async for index, output in stream_outputs(runtime, requests, tracker):
            apply_delta(choices[index], output)

    consumer = asyncio.ensure_future(consume())
    if disconnected is None:
        await consumer
        return
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (consumer, watcher):
            if not task.done():
                task.cancel()
    if consumer in done:
        consumer.result()  # re-raise a ServiceError etc.
    else:
        try:
            await consumer
        except (asyncio.CancelledError, Exception):
            pass
        raise ClientGone("client closed the connection")


def apply_delta(choice: Choice, output: RequestOutput) -> None:
    if output.finished and output.finish_reason == FinishReason.ERROR:
        raise generation_error(output)
    choice.text += output.text
    choice.token_ids.extend(output.token_ids)
    choice.logprobs.extend(output.logprobs)
    if output.prompt_logprobs is not None:
        choice.prompt_logprobs = output.prompt_logprobs
    choice.num_output_tokens = output.num_output_tokens or choice.num_output_tokens
    if output.finished:
        choice.finish_reason = finish_reason_str(output.finish_reason)


def generation_error(output: RequestOutput):
    """The typed error of a request the engine finished with FinishReason.ERROR."""
    kind = output.error_kind
    if kind == ErrorKind.TIMEOUT:
        return Timeout(output.error or "request timed out")
    if kind == ErrorKind.QUEUE_FULL:  # lost a race with the admission check
        return Overloaded(output.error or "queue is full", code="queue_full", retry_after=1)
    if kind == ErrorKind.ENGINE_DEAD:
        return NotReady("engine is not running")
    if kind == ErrorKind.REJECTED:  # the engine refused it at add: the request itself can never run
        return InvalidRequest(f"the engine rejected this request: {output.error or 'rejected'}", code="request_rejected")
    return InternalError(f"generation failed: {output.error or 'internal error'}", code="generation_error")


def finish_reason_str(reason: FinishReason | None) -> str | None:
    if reason is None:
        return None
    return "stop" if reason in (FinishReason.STOP, FinishReason.ABORT) else reason.value
