"""/v1/completions, /v1/chat/completions and /v1/models (OpenAI-compatible; SSE streaming)."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import APIRouter, Request as HTTPRequest, Response as HTTPResponse
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from softserve.api import schemas as S
from softserve.api.deps import PrincipalDep, RuntimeDep
from softserve.api.errors import service_error_body
from softserve.api.openai_params import check_supported, guided_spec, num_prompts, sampling_template
from softserve.engine.outputs import TokenLogprob
from softserve.engine.request import GuidedSpec
from softserve.service.errors import InvalidRequest, ServiceError
from softserve.service.generation import (
    Choice, ResolvedModel, Tracker, apply_delta, build_requests, check_fan_out, collect, compile_guided, finish_reason_str,
    resolve_model, stream_outputs,
)
from softserve.service.runtime import Runtime
from softserve.service.tenancy import display_prefix, visible_prompts


def _usage(prompts: list[list[int]], choices: list[Choice], num_virtual: int) -> S.Usage:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(c.num_output_tokens for c in choices)
    return S.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, virtual_tokens=num_virtual * len(prompts))


def _completion_logprobs(items: list[TokenLogprob], start_offset: int = 0,
                         echoed: list[tuple[str, float | None, dict | None]] = ()) -> S.CompletionLogprobs:
    """OpenAI's completion logprobs; `echoed` (token, logprob, top) rows for the prompt come first."""
    out = S.CompletionLogprobs()
    rows = list(echoed) + [(i.token, i.logprob, _top_dict(i.top)) for i in items]
    offset = start_offset
    for token, logprob, top in rows:
        out.tokens.append(token)
        out.token_logprobs.append(logprob)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def _top_dict(top) -> dict[str, float] | None:
    # A grammar mask leaves forbidden tokens at -inf: they are not alternatives (and not valid JSON).
    return {tok: lp for _, tok, lp in top if math.isfinite(lp)} if top else None


def _echoed_rows(tokenizer, prompt_ids: list[int], entries, top_n: int) -> list[tuple[str, float | None, dict | None]]:
    """Prompt rows for echo + logprobs: the first token has no logprob (nothing precedes it)."""
    rows = []
    for token_id, entry in zip(prompt_ids, entries or [None] * len(prompt_ids)):
        if entry is None:
            text = tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            rows.append((text, None, None))
        else:
            rows.append((entry.token, entry.logprob, {tok: lp for _, tok, lp in entry.top[:top_n]} if top_n else None))
    return rows


def _vllm_prompt_logprobs(entries, top_n: int) -> list[dict[str, S.PromptLogprob] | None] | None:
    """vLLM's prompt_logprobs: per position {token_id: {logprob, rank, decoded_token}}, the token itself + top-N."""
    if entries is None:
        return None
    out: list[dict[str, S.PromptLogprob] | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        position = {str(tid): S.PromptLogprob(logprob=lp, rank=rank, decoded_token=tok)
                    for rank, (tid, tok, lp) in enumerate(entry.top[:top_n], start=1)}
        if str(entry.token_id) not in position:
            ranks = [tid for tid, _, _ in entry.top]
            rank = ranks.index(entry.token_id) + 1 if entry.token_id in ranks else None
            position[str(entry.token_id)] = S.PromptLogprob(logprob=entry.logprob, rank=rank, decoded_token=entry.token)
        out.append(position)
    return out


def _chat_logprobs(items: list[TokenLogprob]) -> S.ChatLogprobs:
    return S.ChatLogprobs(content=[
        S.ChatTokenLogprob(
            token=i.token, logprob=i.logprob, bytes=list(i.token.encode()),
            top_logprobs=[S.ChatTopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for _, t, lp in i.top
                          if math.isfinite(lp)],
        )
        for i in items
    ])


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


_SENTINEL = "\ue000softserve-text\ue001"  # private-use characters: never in an id, a model label or a number


class _TemplateChunks:
    """A stream's SSE chunks that differ only in one text field (a token's text): each choice index's chunk is
    encoded once with a sentinel in that field, then filled in with json.dumps(text). The same bytes as
    encoding every chunk whole (that is what the whole encoding writes for the text), without building and
    encoding the envelope again for every token. `encode(index, text)` is the whole encoding."""

    def __init__(self, encode: Callable[[int, str], str]) -> None:
        self._encode = encode
        self._parts: dict[int, tuple[str, str]] = {}

    def __call__(self, index: int, text: str) -> str:
        parts = self._parts.get(index)
        if parts is None:
            pre, found, post = self._encode(index, _SENTINEL).rpartition(json.dumps(_SENTINEL, ensure_ascii=False))
            assert found, "the encoding must write the text as json.dumps does"
            parts = self._parts[index] = (pre, post)
        return f"{parts[0]}{json.dumps(text, ensure_ascii=False)}{parts[1]}"


SERVED_MODEL_HEADER = "X-Softserve-Served-Model"  # the pinned "name@version" that served (alias or not)
ASSIGNMENT_HEADER = "X-Softserve-Assignment"  # a split alias's assignment key when the body has no `user`


def _assignment(http_request: HTTPRequest, body) -> str | None:
    """What keeps one caller on one arm of a split alias: the header, else the body's `user`."""
    return http_request.headers.get(ASSIGNMENT_HEADER) or body.user or None


def _served_headers(resolved: ResolvedModel) -> dict[str, str]:
    return {SERVED_MODEL_HEADER: resolved.served} if resolved.served else {}


def _sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    """An SSE stream that always ends with `data: [DONE]`; an error after the first event (the status is
    sent by then) becomes an error event."""

    async def with_done() -> AsyncIterator[str]:
        try:
            try:
                async for event in events:
                    yield event
            except ServiceError as exc:
                yield _sse(service_error_body(exc))
            yield _sse("[DONE]")
        finally:  # client gone: close the inner stream now, which aborts its engine requests
            await events.aclose()

    return StreamingResponse(with_done(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})})


def _tokenize_prompts(tokenizer, prompt, max_chars: int) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt", code="empty_prompt")
    if all(isinstance(x, int) for x in prompt):
        prompt = [prompt]
    out = []
    vocab = len(tokenizer)
    for item in prompt:
        if isinstance(item, str):
            if len(item) > max_chars:
                raise InvalidRequest(f"prompt is too long ({len(item)} characters)", param="prompt", code="context_length_exceeded")
            out.append(tokenizer(item).input_ids)
        else:
            if any(t < 0 or t >= vocab for t in item):
                raise InvalidRequest(f"prompt token ids must be in [0, {vocab})", param="prompt", code="invalid_token_id")
            out.append(list(item))
    return out


async def _disconnected(http_request: HTTPRequest) -> None:
    """Returns when the client has gone away (its connection closed)."""
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


async def _guided(runtime: Runtime, principal, body) -> GuidedSpec | None:
    found = guided_spec(body)
    return None if found is None else await compile_guided(runtime, principal, *found)


router = APIRouter()


@router.get("/v1/models", response_model=S.ModelList)
async def list_models(runtime: RuntimeDep, principal: PrincipalDep) -> S.ModelList:
    runtime.require_ready()
    cards = [S.ModelCard(id=runtime.served_model_name, root=runtime.served_model_name)]
    metas = await run_in_threadpool(visible_prompts, runtime.store, principal)
    for meta in metas:
        cards.append(S.ModelCard(id=f"{display_prefix(meta, principal)}{meta.name}", created=meta.created_at, owned_by=meta.tenant,
                                 root=runtime.served_model_name, parent=runtime.served_model_name,
                                 num_virtual_tokens=meta.num_virtual_tokens, kind=meta.kind))
    return S.ModelList(data=cards)

@router.post("/v1/completions")
async def completions(body: S.CompletionRequest, http_request: HTTPRequest, http_response: HTTPResponse,
                      runtime: RuntimeDep, principal: PrincipalDep):
    return await run_completion(body, runtime, principal, request_id=http_request.state.request_id,
                                disconnected=lambda: _disconnected(http_request), response_headers=http_response.headers,
                                assignment=_assignment(http_request, body))


async def run_completion(body: S.CompletionRequest, runtime: Runtime, principal, *, request_id: str,
                         disconnected=None, response_headers=None, assignment: str | None = None,
                         background: bool = False):
    """/v1/completions without HTTP: the route's, and a Batch API line's (`background`: a batch row).
    `assignment` keeps a caller on one arm of a split alias (the route's header, else `user`)."""
    runtime.require_ready()
    check_fan_out(runtime, num_prompts(body.prompt), body.n)  # before any work that grows with the request
    check_supported(body)
    guided = await _guided(runtime, principal, body)
    resolved = await run_in_threadpool(resolve_model, runtime, principal, body.model,  # may read the store
                                        assignment)
    prompts = await run_in_threadpool(_tokenize_prompts, runtime.tokenizer, body.prompt, runtime.max_model_len * 64)
    echo_logprobs = body.echo and body.logprobs is not None
    wanted = [n for n in (body.prompt_logprobs, body.logprobs if echo_logprobs else None) if n is not None]
    prompt_top = max(wanted) if wanted else None
    prompt_texts = _prompt_texts(runtime.tokenizer, body.prompt, prompts) if body.echo else None
    sampling = sampling_template(body, logprobs=body.logprobs, guided=guided, prompt_logprobs=prompt_top)
    requests, choices = await build_requests(runtime, principal, resolved, prompts, sampling, body.n, body.max_tokens,
                                             request_id, priority=body.priority, background=background)

    def echoed(choice: Choice) -> list:
        if not echo_logprobs:
            return []
        return _echoed_rows(runtime.tokenizer, prompts[choice.prompt_index], choice.prompt_logprobs, body.logprobs)

    def echo_text(choice: Choice) -> str:
        return prompt_texts[choice.prompt_index] if prompt_texts is not None else ""

    def vllm_prompt_logprobs(choice: Choice):
        if body.prompt_logprobs is None:
            return None
        return _vllm_prompt_logprobs(choice.prompt_logprobs, body.prompt_logprobs)
    response_id = f"cmpl-{uuid.uuid4().hex}"
    tracker = Tracker(runtime, request_id=request_id, tenant=principal.tenant, endpoint="completions",
                      model=body.model, resolved=resolved, num_prompt_tokens=sum(len(p) for p in prompts),
                      response_id=response_id)
    num_virtual = resolved.meta.num_virtual_tokens if resolved.meta else 0
    created = int(time.time())

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def whole_text_chunk(index: int, text: str) -> str:
            return _sse({"id": response_id, "object": "text_completion", "created": created, "model": resolved.label,
                         "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": None}]})

        text_chunk = _TemplateChunks(whole_text_chunk)

        async def events() -> AsyncIterator[str]:
            offsets = [0] * len(choices)
            started: set[int] = set()
            async for index, output in stream_outputs(runtime, requests, tracker):
                choice = choices[index]
                apply_delta(choice, output)
                first = index not in started
                started.add(index)
                text = (echo_text(choice) if first else "") + output.text
                lp = None
                rows = echoed(choice) if first else []
                if body.logprobs is not None and (output.logprobs or rows):
                    lp = _completion_logprobs(list(output.logprobs), offsets[index], rows).model_dump()
                    offsets[index] += sum(len(t) for t in lp["tokens"])
                if not text and not output.finished and lp is None:
                    continue
                reason = finish_reason_str(output.finish_reason) if output.finished else None
                if lp is None and reason is None and not (first and body.prompt_logprobs is not None):
                    yield text_chunk(index, text)  # a token's plain text: the common chunk
                    continue
                payload = {"index": index, "text": text, "logprobs": lp, "finish_reason": reason}
                if first and body.prompt_logprobs is not None:
                    payload["prompt_logprobs"] = [None if p is None else {k: v.model_dump() for k, v in p.items()}
                                                  for p in vllm_prompt_logprobs(choice) or []]
                yield _sse({"id": response_id, "object": "text_completion", "created": created, "model": resolved.label,
                            "choices": [payload]})
            if include_usage:
                yield _sse({"id": response_id, "object": "text_completion", "created": created, "model": resolved.label,
                            "choices": [], "usage": _usage(prompts, choices, num_virtual).model_dump()})
        return _sse_response(events(), _served_headers(resolved))

    await collect(runtime, requests, choices, tracker, disconnected=disconnected)
    if response_headers is not None:
        response_headers.update(_served_headers(resolved))
    return S.CompletionResponse(
        id=response_id, created=created, model=resolved.label,
        choices=[S.CompletionChoice(index=c.index, text=echo_text(c) + c.text, finish_reason=c.finish_reason,
                                    logprobs=_completion_logprobs(c.logprobs, 0, echoed(c)) if body.logprobs is not None else None,
                                    prompt_logprobs=vllm_prompt_logprobs(c))
                 for c in choices],
        usage=_usage(prompts, choices, num_virtual),
    )

@router.post("/v1/chat/completions")
async def chat_completions(body: S.ChatCompletionRequest, http_request: HTTPRequest, http_response: HTTPResponse,
                           runtime: RuntimeDep, principal: PrincipalDep):
    return await run_chat_completion(body, runtime, principal, request_id=http_request.state.request_id,
                                     disconnected=lambda: _disconnected(http_request),
                                     response_headers=http_response.headers, assignment=_assignment(http_request, body))


async def run_chat_completion(body: S.ChatCompletionRequest, runtime: Runtime, principal, *, request_id: str,
                              disconnected=None, response_headers=None, assignment: str | None = None,
                              background: bool = False):
    """/v1/chat/completions without HTTP: the route's, and a Batch API line's (`background`: a batch row)."""
    runtime.require_ready()
    check_fan_out(runtime, 1, body.n)
    check_supported(body)
    guided = await _guided(runtime, principal, body)
    resolved = await run_in_threadpool(resolve_model, runtime, principal, body.model,  # may read the store
                                        assignment)
    prompt_ids = await run_in_threadpool(_apply_chat_template, runtime.tokenizer, body.messages, runtime.max_model_len * 64)
    prompts = [prompt_ids]
    max_tokens = body.max_completion_tokens or body.max_tokens
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    sampling = sampling_template(body, logprobs=top_n, guided=guided)
    requests, choices = await build_requests(runtime, principal, resolved, prompts, sampling, body.n, max_tokens,
                                             request_id, priority=body.priority, background=background)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    tracker = Tracker(runtime, request_id=request_id, tenant=principal.tenant, endpoint="chat.completions",
                      model=body.model, resolved=resolved, num_prompt_tokens=len(prompt_ids), response_id=response_id)
    num_virtual = resolved.meta.num_virtual_tokens if resolved.meta else 0
    created = int(time.time())

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices_payload, usage=None) -> str:
            return _sse(S.ChatCompletionChunk(id=response_id, created=created, model=resolved.label,
                                              choices=choices_payload, usage=usage).model_dump(exclude_none=True))

        content_chunk = _TemplateChunks(lambda index, text: chunk([S.ChatStreamChoice(index=index, delta=S.ChatDelta(content=text))]))

        async def events() -> AsyncIterator[str]:
            for c in choices:
                yield chunk([S.ChatStreamChoice(index=c.index, delta=S.ChatDelta(role="assistant", content=""))])
            async for index, output in stream_outputs(runtime, requests, tracker):
                apply_delta(choices[index], output)
                lp = _chat_logprobs(list(output.logprobs)) if body.logprobs and output.logprobs else None
                if output.text and lp is None:
                    yield content_chunk(index, output.text)  # a token's plain text: the common chunk
                elif output.text or lp is not None:
                    yield chunk([S.ChatStreamChoice(index=index, delta=S.ChatDelta(content=output.text), logprobs=lp)])
                if output.finished:
                    yield chunk([S.ChatStreamChoice(index=index, delta=S.ChatDelta(),
                                                    finish_reason=finish_reason_str(output.finish_reason))])
            if include_usage:
                yield chunk([], usage=_usage(prompts, choices, num_virtual))
        return _sse_response(events(), _served_headers(resolved))

    await collect(runtime, requests, choices, tracker, disconnected=disconnected)
    if response_headers is not None:
        response_headers.update(_served_headers(resolved))
    return S.ChatCompletionResponse(
        id=response_id, created=created, model=resolved.label,
        choices=[S.ChatChoice(index=c.index, message=S.ChatResponseMessage(content=c.text),
                              finish_reason=c.finish_reason,
                              logprobs=_chat_logprobs(c.logprobs) if body.logprobs else None)
                 for c in choices],
        usage=_usage(prompts, choices, num_virtual),
    )



def _prompt_texts(tokenizer, prompt, prompts: list[list[int]]) -> list[str]:
    """What echo repeats: the prompt strings as sent, or the decoded token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return [tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) for ids in prompts]


def _apply_chat_template(tokenizer, messages: list[S.ChatMessage], max_chars: int) -> list[int]:
    plain = [{"role": m.role, "content": m.text()} | ({"name": m.name} if m.name else {}) for m in messages]
    if sum(len(m["content"]) for m in plain) > max_chars:
        raise InvalidRequest("messages are too long", param="messages", code="context_length_exceeded")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequest("this model has no chat template; use /v1/completions", code="no_chat_template")
    text = tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


__all__ = ["router", "run_completion", "run_chat_completion"]
