"""The one seam between the client's logic and I/O.

Every client operation (a call with retries, a paged listing, polling a job) is written once, as a
generator that yields instructions (`Send` a request, `Sleep`) and receives their results. A runner
executes those instructions: `SyncRunner` with httpx.Client and time.sleep, `AsyncRunner` with
httpx.AsyncClient and asyncio.sleep. So `Client` and `AsyncClient` share every method; only the ~30
lines of the two runners are written per I/O style.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from .errors import connection_error, error_from_body, error_from_response

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 503})
# Failures where the request provably never reached the server: safe to retry even for POST.
RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


@dataclass(frozen=True)
class Send:
    """Send `request`; the runner answers with the httpx.Response or throws the httpx.TransportError.
    A `stream` response is returned open and unread, unless its status is an error (then it is read)."""

    request: httpx.Request
    stream: bool = False


@dataclass(frozen=True)
class Sleep:
    seconds: float


Op = Generator["Send | Sleep", Any, T]


class RetryPolicy:
    """Exponential backoff with jitter: attempt i (0-based) waits uniform(0.5, 1) * min(max_delay,
    base_delay * 2**i); a `Retry-After` header (seconds or HTTP date) replaces that, capped at
    `max_retry_after`."""

    def __init__(self, max_retries: int = 3, base_delay: float = 0.5, max_delay: float = 8.0,
                 max_retry_after: float = 60.0) -> None:
        self.max_retries = max_retries
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_retry_after = max_retry_after

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        if response is not None:
            after = _parse_retry_after(response.headers.get("retry-after"))
            if after is not None:
                return min(after, self.max_retry_after)
        return min(self.max_delay, self.base_delay * (2 ** attempt)) * random.uniform(0.5, 1.0)


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def send_with_retries(request: httpx.Request, policy: RetryPolicy, stream: bool = False) -> Op[httpx.Response]:
    """Send until a success (returned; open and unread if `stream`), retrying 429/503 answers and
    connection failures per `policy`; anything else raises a `SoftserveError`."""
    request_id = request.headers.get("X-Request-ID")
    attempt = 0
    while True:
        try:
            resp = yield Send(request, stream)
        except RETRY_EXCEPTIONS as exc:
            if attempt >= policy.max_retries:
                raise connection_error(exc, request_id) from exc
            yield Sleep(policy.delay(attempt))
            attempt += 1
            continue
        except httpx.TransportError as exc:
            raise connection_error(exc, request_id) from exc
        if resp.status_code < 400:
            return resp
        if resp.status_code in RETRY_STATUSES and attempt < policy.max_retries:
            yield Sleep(policy.delay(attempt, resp))
            attempt += 1
            continue
        raise error_from_response(resp, request_id)


class SseDeltas:
    """Text deltas from the SSE lines of a completion or chat stream: raises an error sent inside the
    stream, and sets `done` at `data: [DONE]` (both runners stop there)."""

    def __init__(self, chat: bool, request_id: str | None) -> None:
        self.chat = chat
        self.request_id = request_id
        self.done = False

    def feed(self, line: str) -> list[str]:
        if not line.startswith("data:"):
            return []
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return []
        payload = json.loads(data)
        if "error" in payload:
            raise error_from_body(payload, None, request_id=self.request_id)
        out = []
        for choice in payload.get("choices") or ():
            text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if text:
                out.append(text)
        return out


class _Resumption:
    """One operation between two instructions: `next()` resumes it with the last instruction's result
    (or throws its transport error into it) and returns the next instruction, or None once it returned
    (its value is then `result`)."""

    def __init__(self, op: Op[T]) -> None:
        self.op = op
        self.reply: Any = None
        self.error: httpx.TransportError | None = None
        self.result: Any = None

    def next(self) -> Send | Sleep | None:
        reply, error, self.reply, self.error = self.reply, self.error, None, None
        try:
            return self.op.throw(error) if error is not None else self.op.send(reply)
        except StopIteration as stop:
            self.result = stop.value
            return None


class SyncRunner:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def run(self, op: Op[T]) -> T:
        state = _Resumption(op)
        while (step := state.next()) is not None:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                continue
            try:
                state.reply = self.http.send(step.request, stream=step.stream)
            except httpx.TransportError as exc:
                state.error = exc
                continue
            if step.stream and state.reply.is_error:  # the op reads the error body
                state.reply.read()
                state.reply.close()
        return state.result

    def stream(self, op: Op[httpx.Response], chat: bool) -> Iterator[str]:
        resp = self.run(op)
        deltas = SseDeltas(chat, resp.request.headers.get("X-Request-ID"))
        try:
            for line in resp.iter_lines():
                yield from deltas.feed(line)
                if deltas.done:
                    return
        except httpx.TransportError as exc:
            raise connection_error(exc, deltas.request_id) from exc
        finally:
            resp.close()


class AsyncRunner:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def run(self, op: Op[T]) -> T:
        state = _Resumption(op)
        while (step := state.next()) is not None:
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                continue
            try:
                state.reply = await self.http.send(step.request, stream=step.stream)
            except httpx.TransportError as exc:
                state.error = exc
                continue
            if step.stream and state.reply.is_error:
                await state.reply.aread()
                await state.reply.aclose()
        return state.result

    async def stream(self, op: Op[httpx.Response], chat: bool) -> AsyncIterator[str]:
        resp = await self.run(op)
        deltas = SseDeltas(chat, resp.request.headers.get("X-Request-ID"))
        try:
            async for line in resp.aiter_lines():
                for text in deltas.feed(line):
                    yield text
                if deltas.done:
                    return
        except httpx.TransportError as exc:
            raise connection_error(exc, deltas.request_id) from exc
        finally:
            await resp.aclose()
