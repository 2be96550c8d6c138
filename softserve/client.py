"""Python client for Softserve (sync `Client` and `AsyncClient`), for internal services.

    from softserve.client import Client

    with Client("http://127.0.0.1:8000", api_key="sk-ss-...") as ss:
        out = ss.complete("my-task", "The capital of France is", max_tokens=16, temperature=0)
        print(out.choices[0].text)
        for delta in ss.stream_chat("my-task", [{"role": "user", "content": "Hi"}], max_tokens=32):
            print(delta, end="")
        ss.prompts.push("./my-adapter", "my-task", description="v2")

- Results are the server's own pydantic response models (`softserve.api.schemas`, `softserve.api.prompts`),
  so the client and the server cannot drift; unknown extra fields are ignored.
- Retries: 429 and 503 answers and connection failures (the request never reached the server) are
  retried with exponential backoff and jitter, honouring `Retry-After`. Other 4xx/5xx are never
  retried. Every call accepts `timeout=` (seconds or `httpx.Timeout`) and `request_id=`.
- Every generation request carries `X-Softserve-Prompt: <model>` (affinity routing: a router can
  send one prompt's traffic to the replica whose KV prefix cache already holds it) and every request
  carries `X-Request-ID` (a uuid4 unless given; the same id on each retry of one call).
- Errors raise `SoftserveError` subclasses parsed from the OpenAI error shape
  `{"error": {"message", "type", "param", "code"}}`, including errors sent inside an SSE stream.

Importing this module needs only httpx and pydantic (the prompt-store models are imported on first use
of `client.prompts`, because their module lives next to the server's torch-based store). $SOFTSERVE_URL
and $SOFTSERVE_API_KEY are read through `softserve.config.ClientSettings` when a client is made.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import os
import random
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import quote

import httpx

from softserve.api.schemas import ChatCompletionResponse, CompletionResponse, ModelList

if TYPE_CHECKING:  # imported lazily at run time (see the module docstring)
    from softserve.api.prompts import PromptDeleted, PromptInfo, PromptList, PromptUploadResponse, PromptVersionList

__all__ = [
    "Client", "AsyncClient", "RetryPolicy",
    "SoftserveError", "APIConnectionError", "APITimeoutError", "BadRequestError", "AuthenticationError",
    "PermissionDeniedError", "NotFoundError", "ConflictError", "PayloadTooLargeError", "UnprocessableEntityError",
    "RateLimitError", "InternalServerError", "ServiceUnavailableError",
    "CompletionResponse", "ChatCompletionResponse", "ModelList",
]

DEFAULT_TIMEOUT = 120.0
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled", "canceled"})
_NOT_GIVEN: Any = object()


# ---- errors -----------------------------------------------------------------------------------------
class SoftserveError(Exception):
    """Base of every client error. `status_code` is None for errors without an HTTP status
    (connection failures, errors reported inside an SSE stream whose type is unknown)."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 param: str | None = None, type: str | None = None, body: Any = None,
                 headers: Mapping[str, str] | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.param = param
        self.type = type
        self.body = body
        self.headers = dict(headers or {})
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [f"{self.status_code}" if self.status_code is not None else None,
                 f"[{self.code}]" if self.code else None, self.message]
        return " ".join(p for p in parts if p)


class APIConnectionError(SoftserveError):
    """The server could not be reached (after retries), or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The call exceeded its timeout."""


class BadRequestError(SoftserveError):  # 400 (and 413/415/422 via subclasses or directly)
    pass


class AuthenticationError(SoftserveError):  # 401
    pass


class PermissionDeniedError(SoftserveError):  # 403
    pass


class NotFoundError(SoftserveError):  # 404
    pass


class ConflictError(SoftserveError):  # 409
    pass


class PayloadTooLargeError(BadRequestError):  # 413
    pass


class UnprocessableEntityError(BadRequestError):  # 422
    pass


class RateLimitError(SoftserveError):  # 429
    pass


class InternalServerError(SoftserveError):  # 5xx other than 503
    pass


class ServiceUnavailableError(SoftserveError):  # 503
    pass


_CLASS_BY_STATUS: dict[int, type[SoftserveError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: PayloadTooLargeError, 415: BadRequestError, 422: UnprocessableEntityError,
    429: RateLimitError, 503: ServiceUnavailableError,
}
# Errors inside an SSE stream carry no status; the OpenAI `type` names it (see softserve/api/errors.py).
_STATUS_BY_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403, "not_found_error": 404,
    "conflict_error": 409, "rate_limit_error": 429, "server_error": 500, "service_unavailable": 503,
}


def _error_class(status: int | None) -> type[SoftserveError]:
    if status is None:
        return SoftserveError
    if status in _CLASS_BY_STATUS:
        return _CLASS_BY_STATUS[status]
    if status >= 500:
        return InternalServerError
    return BadRequestError if status >= 400 else SoftserveError


def _error_from_body(body: Any, status: int | None, headers: Mapping[str, str] | None = None,
                     request_id: str | None = None, fallback: str = "") -> SoftserveError:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or fallback or "error")
        etype, code, param = err.get("type"), err.get("code"), err.get("param")
    else:
        message, etype, code, param = (str(err) if err else fallback or "error"), None, None, None
    if status is None and etype in _STATUS_BY_TYPE:
        status = _STATUS_BY_TYPE[etype]
    return _error_class(status)(message, status_code=status, code=code, param=param, type=etype, body=body,
                                headers=headers, request_id=request_id)


def _error_from_response(resp: httpx.Response, request_id: str | None) -> SoftserveError:
    try:
        body = resp.json()
    except ValueError:
        body = None
    fallback = resp.text[:500] if body is None else ""
    return _error_from_body(body, resp.status_code, resp.headers, request_id, fallback or resp.reason_phrase)


# ---- retries ----------------------------------------------------------------------------------------
RETRY_STATUSES = frozenset({429, 503})
# Failures where the request provably never reached the server: safe to retry even for POST.
_RETRY_EXCEPTIONS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


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


# ---- shared request building ------------------------------------------------------------------------
def _environment():
    from softserve.config import ClientSettings  # SOFTSERVE_URL, SOFTSERVE_API_KEY (env vars are read there only)

    return ClientSettings()


def _normalize_base_url(base_url: str | None) -> str:
    url = (base_url or _environment().url).rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url  # accept the OpenAI-style ".../v1" too


def _prompt_path(name: str, suffix: str = "") -> str:
    return f"/v1/prompts/{quote(name, safe='/@')}{suffix}"


def _header_value(value: str) -> str:
    return value if value.isascii() else quote(value, safe="")


def _generation_body(model: str, key: str, value: Any, params: dict[str, Any], stream: bool) -> dict[str, Any]:
    if "stream" in params:
        raise ValueError("pass stream via stream_complete()/stream_chat(), not as a parameter")
    body = {"model": model, key: value, **params}
    if stream:
        body["stream"] = True
    return body


def _sse_payloads(lines) -> Iterator[dict]:
    """Decode SSE `data:` lines; raise on an in-stream error; stop at [DONE]."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def _chunk_deltas(payload: dict, chat: bool, request_id: str) -> list[str]:
    if "error" in payload:
        raise _error_from_body(payload, None, request_id=request_id)
    out = []
    for choice in payload.get("choices") or ():
        text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
        if text:
            out.append(text)
    return out


def _push_files(path: str | os.PathLike[str]) -> dict[str, tuple[str, bytes, str]]:
    p = Path(path)
    files: dict[str, tuple[str, bytes, str]] = {}
    if p.is_file():
        files["adapter_model"] = ("adapter_model.safetensors", p.read_bytes(), "application/octet-stream")
        return files
    model_file = p / "adapter_model.safetensors"
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} not found (push a PEFT adapter directory or a .safetensors file)")
    files["adapter_model"] = ("adapter_model.safetensors", model_file.read_bytes(), "application/octet-stream")
    config = p / "adapter_config.json"
    if config.is_file():
        files["adapter_config"] = ("adapter_config.json", config.read_bytes(), "application/json")
    return files


def _write_adapter(zip_bytes: bytes, directory: str | os.PathLike[str]) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        for member in ("adapter_config.json", "adapter_model.safetensors"):  # never extract other names
            (out / member).write_bytes(zf.read(member))
    return out


def _prompt_models():
    from softserve.api import prompts as P

    return P


class _Base:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout,
                 max_retries: int, retry: RetryPolicy | None, headers: Mapping[str, str] | None) -> None:
        self.base_url = _normalize_base_url(base_url)
        self.api_key = api_key if api_key is not None else _environment().api_key
        self.timeout = timeout
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self._default_headers = {"User-Agent": "softserve-client/0.1", **(headers or {})}
        if self.api_key:
            self._default_headers["Authorization"] = f"Bearer {self.api_key}"

    def _headers(self, request_id: str | None, model: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
        h = {"X-Request-ID": request_id or str(uuid.uuid4())}
        if model is not None:
            h["X-Softserve-Prompt"] = _header_value(model)
        if extra:
            h.update(extra)
        return h

    def _timeout(self, timeout: Any) -> Any:
        return self.timeout if timeout is _NOT_GIVEN else timeout  # None: no timeout (httpx semantics)

    def _should_retry(self, attempt: int) -> bool:
        return attempt < self.retry.max_retries


def _connection_error(exc: Exception, request_id: str) -> APIConnectionError:
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return cls(f"{type(exc).__name__}: {exc}", request_id=request_id)


# ---- sync -------------------------------------------------------------------------------------------
class Client(_Base):
    """Synchronous client. `base_url` defaults to $SOFTSERVE_URL or http://127.0.0.1:8000 (a trailing
    /v1 is accepted); `api_key` defaults to $SOFTSERVE_API_KEY."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: Mapping[str, str] | None = None,
                 http_client: httpx.Client | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, retry, headers)
        self._http = http_client or httpx.Client(timeout=timeout)
        self._owns_http = http_client is None
        self.prompts = Prompts(self)
        self.tuning = Tuning(self)

    # -- plumbing
    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _send(self, method: str, path: str, *, model: str | None = None, timeout: Any = _NOT_GIVEN,
              request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
              stream: bool = False, **kwargs) -> httpx.Response:
        """Send with retries; returns a successful response (open, unread, if `stream`)."""
        headers = {**self._default_headers, **self._headers(request_id, model, extra_headers)}
        rid = headers["X-Request-ID"]
        request = self._http.build_request(method, self.base_url + path, headers=headers,
                                           timeout=self._timeout(timeout), **kwargs)
        attempt = 0
        while True:
            try:
                resp = self._http.send(request, stream=stream)
            except _RETRY_EXCEPTIONS as exc:
                if not self._should_retry(attempt):
                    raise _connection_error(exc, rid) from exc
                time.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            except httpx.TransportError as exc:
                raise _connection_error(exc, rid) from exc
            if resp.status_code < 400:
                return resp
            if stream:
                resp.read()
                resp.close()
            if resp.status_code in RETRY_STATUSES and self._should_retry(attempt):
                time.sleep(self.retry.delay(attempt, resp))
                attempt += 1
                continue
            raise _error_from_response(resp, rid)

    def _json(self, method: str, path: str, **kwargs) -> Any:
        return self._send(method, path, **kwargs).json()

    def _stream(self, path: str, body: dict, chat: bool, *, model: str, timeout: Any, request_id: str | None,
                extra_headers: Mapping[str, str] | None) -> Iterator[str]:
        resp = self._send("POST", path, json=body, model=model, timeout=timeout, request_id=request_id,
                          extra_headers=extra_headers, stream=True)
        rid = resp.request.headers["X-Request-ID"]
        try:
            for payload in _sse_payloads(resp.iter_lines()):
                yield from _chunk_deltas(payload, chat, rid)
        except httpx.TransportError as exc:
            raise _connection_error(exc, rid) from exc
        finally:
            resp.close()

    # -- OpenAI-compatible endpoints
    def complete(self, model: str, prompt: str | list, *, timeout: Any = _NOT_GIVEN, request_id: str | None = None,
                 extra_headers: Mapping[str, str] | None = None, **params) -> CompletionResponse:
        body = _generation_body(model, "prompt", prompt, params, stream=False)
        data = self._json("POST", "/v1/completions", json=body, model=model, timeout=timeout,
                          request_id=request_id, extra_headers=extra_headers)
        return CompletionResponse.model_validate(data)

    def chat(self, model: str, messages: Sequence[Mapping[str, Any]], *, timeout: Any = _NOT_GIVEN,
             request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
             **params) -> ChatCompletionResponse:
        body = _generation_body(model, "messages", list(messages), params, stream=False)
        data = self._json("POST", "/v1/chat/completions", json=body, model=model, timeout=timeout,
                          request_id=request_id, extra_headers=extra_headers)
        return ChatCompletionResponse.model_validate(data)

    def stream_complete(self, model: str, prompt: str | list, *, timeout: Any = _NOT_GIVEN,
                        request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
                        **params) -> Iterator[str]:
        """Yield text deltas (of every choice, in arrival order, when n > 1)."""
        body = _generation_body(model, "prompt", prompt, params, stream=True)
        return self._stream("/v1/completions", body, False, model=model, timeout=timeout, request_id=request_id,
                            extra_headers=extra_headers)

    def stream_chat(self, model: str, messages: Sequence[Mapping[str, Any]], *, timeout: Any = _NOT_GIVEN,
                    request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
                    **params) -> Iterator[str]:
        body = _generation_body(model, "messages", list(messages), params, stream=True)
        return self._stream("/v1/chat/completions", body, True, model=model, timeout=timeout, request_id=request_id,
                            extra_headers=extra_headers)

    def models(self, *, timeout: Any = _NOT_GIVEN) -> ModelList:
        return ModelList.model_validate(self._json("GET", "/v1/models", timeout=timeout))

    def ready(self, *, timeout: Any = 5.0) -> bool:
        """True when the server answers /ready with 200 (no retries)."""
        try:
            return self._http.get(self.base_url + "/ready", timeout=timeout).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise APITimeoutError(f"server at {self.base_url} not ready after {timeout:.0f} s")
            time.sleep(interval)


class Prompts:
    """`client.prompts`: the prompt store (PUT/GET/DELETE /v1/prompts...)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def push(self, dir_or_file: str | os.PathLike[str], name: str, description: str | None = None,
             **kw) -> "PromptUploadResponse":
        data = {"description": description} if description else {}
        out = self._c._json("PUT", _prompt_path(name), files=_push_files(dir_or_file), data=data, **kw)
        return _prompt_models().PromptUploadResponse.model_validate(out)

    def list(self, *, page_size: int | None = None, **kw) -> "list[PromptInfo]":
        """Every prompt you can use (your own by name, then the public ones), fetched page by page."""
        out: list = []
        after = None
        while True:
            page = self.list_page(after=after, limit=page_size, **kw)
            out += page.data
            if not page.has_more or not page.data:
                return out
            after = page.last_id

    def list_page(self, *, after: str | None = None, limit: int | None = None, **kw) -> "PromptList":
        """One page of GET /v1/prompts (`has_more`, `last_id`: pass it as `after` for the next)."""
        out = self._c._json("GET", "/v1/prompts", params=_page_params(after=after, limit=limit), **kw)
        return _prompt_models().PromptList.model_validate(out)

    def get(self, name: str, **kw) -> "PromptInfo":
        return _prompt_models().PromptInfo.model_validate(self._c._json("GET", _prompt_path(name), **kw))

    def versions(self, name: str, **kw) -> "PromptVersionList":
        return _prompt_models().PromptVersionList.model_validate(self._c._json("GET", _prompt_path(name, "/versions"), **kw))

    def delete(self, name: str, **kw) -> "PromptDeleted":
        return _prompt_models().PromptDeleted.model_validate(self._c._json("DELETE", _prompt_path(name), **kw))

    def pull(self, name: str, dir: str | os.PathLike[str], version: str | None = None, **kw) -> Path:
        """Download `name` (or `name@version`) as a PEFT adapter directory; returns the directory."""
        params = {"version": version} if version else None
        resp = self._c._send("GET", _prompt_path(name, "/download"), params=params, **kw)
        return _write_adapter(resp.content, dir)


def _page_params(**params) -> dict[str, Any] | None:
    return {k: v for k, v in params.items() if v is not None} or None


class Tuning:
    """`client.tuning`: soft-prompt tuning jobs (/v1/tuning/jobs, shaped like OpenAI fine-tuning jobs).
    `create(**params)` posts the params as the JSON body (e.g. name=, training_data=[{"prompt",
    "completion"}...] or training_file=, num_virtual_tokens=, steps=, learning_rate=). Results are plain
    dicts so new server fields pass through; a finished job's `fine_tuned_model` is the prompt ref."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, **params) -> dict[str, Any]:
        kw = {k: params.pop(k) for k in ("timeout", "request_id", "extra_headers") if k in params}
        return self._c._json("POST", "/v1/tuning/jobs", json=params, **kw)

    def get(self, job_id: str, **kw) -> dict[str, Any]:
        return self._c._json("GET", f"/v1/tuning/jobs/{quote(job_id, safe='')}", **kw)

    def list(self, limit: int | None = None, **kw) -> list[dict[str, Any]]:
        out = self._c._json("GET", "/v1/tuning/jobs", params={"limit": limit} if limit else None, **kw)
        return out.get("data", []) if isinstance(out, dict) else out

    def cancel(self, job_id: str, **kw) -> dict[str, Any]:
        return self._c._json("POST", f"/v1/tuning/jobs/{quote(job_id, safe='')}/cancel", **kw)

    def events(self, job_id: str, *, after: str | None = None, limit: int | None = None, order: str | None = None,
               **kw) -> list[dict[str, Any]]:
        """One page of the job's events (`order` "desc", the default: newest first, `after` an event id
        pages to older ones; "asc": oldest first, `after` tails newer ones)."""
        out = self._c._json("GET", f"/v1/tuning/jobs/{quote(job_id, safe='')}/events",
                            params=_page_params(after=after, limit=limit, order=order), **kw)
        return out.get("data", []) if isinstance(out, dict) else out

    def checkpoints(self, job_id: str, *, after: str | None = None, limit: int | None = None, **kw) -> list[dict[str, Any]]:
        """The job's checkpoints, newest first; each `fine_tuned_model_checkpoint` is a servable prompt ref."""
        out = self._c._json("GET", f"/v1/tuning/jobs/{quote(job_id, safe='')}/checkpoints",
                            params=_page_params(after=after, limit=limit), **kw)
        return out.get("data", []) if isinstance(out, dict) else out

    def wait(self, job_id: str, *, poll_interval: float = 2.0, timeout: float | None = None) -> dict[str, Any]:
        """Poll until the job's `status` is terminal (succeeded/failed/cancelled); return the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.get("status") in TERMINAL_JOB_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise APITimeoutError(f"tuning job {job_id} still {job.get('status')!r} after {timeout} s")
            time.sleep(poll_interval)


# ---- async ------------------------------------------------------------------------------------------
class AsyncClient(_Base):
    """Asynchronous twin of `Client` (same methods, awaitable; streams are async iterators)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        super().__init__(base_url, api_key, timeout, max_retries, retry, headers)
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self._owns_http = http_client is None
        self.prompts = AsyncPrompts(self)
        self.tuning = AsyncTuning(self)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _send(self, method: str, path: str, *, model: str | None = None, timeout: Any = _NOT_GIVEN,
                    request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
                    stream: bool = False, **kwargs) -> httpx.Response:
        headers = {**self._default_headers, **self._headers(request_id, model, extra_headers)}
        rid = headers["X-Request-ID"]
        request = self._http.build_request(method, self.base_url + path, headers=headers,
                                           timeout=self._timeout(timeout), **kwargs)
        attempt = 0
        while True:
            try:
                resp = await self._http.send(request, stream=stream)
            except _RETRY_EXCEPTIONS as exc:
                if not self._should_retry(attempt):
                    raise _connection_error(exc, rid) from exc
                await asyncio.sleep(self.retry.delay(attempt))
                attempt += 1
                continue
            except httpx.TransportError as exc:
                raise _connection_error(exc, rid) from exc
            if resp.status_code < 400:
                return resp
            if stream:
                await resp.aread()
                await resp.aclose()
            if resp.status_code in RETRY_STATUSES and self._should_retry(attempt):
                await asyncio.sleep(self.retry.delay(attempt, resp))
                attempt += 1
                continue
            raise _error_from_response(resp, rid)

    async def _json(self, method: str, path: str, **kwargs) -> Any:
        return (await self._send(method, path, **kwargs)).json()

    async def _stream(self, path: str, body: dict, chat: bool, *, model: str, timeout: Any,
                      request_id: str | None, extra_headers: Mapping[str, str] | None) -> AsyncIterator[str]:
        resp = await self._send("POST", path, json=body, model=model, timeout=timeout, request_id=request_id,
                                extra_headers=extra_headers, stream=True)
        rid = resp.request.headers["X-Request-ID"]
        try:
            async for line in resp.aiter_lines():
                for payload in _sse_payloads((line,)):
                    for text in _chunk_deltas(payload, chat, rid):
                        yield text
                if line.startswith("data:") and line[5:].strip() == "[DONE]":
                    return
        except httpx.TransportError as exc:
            raise _connection_error(exc, rid) from exc
        finally:
            await resp.aclose()

    async def complete(self, model: str, prompt: str | list, *, timeout: Any = _NOT_GIVEN,
                       request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
                       **params) -> CompletionResponse:
        body = _generation_body(model, "prompt", prompt, params, stream=False)
        data = await self._json("POST", "/v1/completions", json=body, model=model, timeout=timeout,
                                request_id=request_id, extra_headers=extra_headers)
        return CompletionResponse.model_validate(data)

    async def chat(self, model: str, messages: Sequence[Mapping[str, Any]], *, timeout: Any = _NOT_GIVEN,
                   request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
                   **params) -> ChatCompletionResponse:
        body = _generation_body(model, "messages", list(messages), params, stream=False)
        data = await self._json("POST", "/v1/chat/completions", json=body, model=model, timeout=timeout,
                                request_id=request_id, extra_headers=extra_headers)
        return ChatCompletionResponse.model_validate(data)

    def stream_complete(self, model: str, prompt: str | list, *, timeout: Any = _NOT_GIVEN,
                        request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
                        **params) -> AsyncIterator[str]:
        body = _generation_body(model, "prompt", prompt, params, stream=True)
        return self._stream("/v1/completions", body, False, model=model, timeout=timeout, request_id=request_id,
                            extra_headers=extra_headers)

    def stream_chat(self, model: str, messages: Sequence[Mapping[str, Any]], *, timeout: Any = _NOT_GIVEN,
                    request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
                    **params) -> AsyncIterator[str]:
        body = _generation_body(model, "messages", list(messages), params, stream=True)
        return self._stream("/v1/chat/completions", body, True, model=model, timeout=timeout,
                            request_id=request_id, extra_headers=extra_headers)

    async def models(self, *, timeout: Any = _NOT_GIVEN) -> ModelList:
        return ModelList.model_validate(await self._json("GET", "/v1/models", timeout=timeout))

    async def ready(self, *, timeout: Any = 5.0) -> bool:
        try:
            return (await self._http.get(self.base_url + "/ready", timeout=timeout)).status_code == 200
        except httpx.TransportError:
            return False

    async def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() > deadline:
                raise APITimeoutError(f"server at {self.base_url} not ready after {timeout:.0f} s")
            await asyncio.sleep(interval)


class AsyncPrompts:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def push(self, dir_or_file: str | os.PathLike[str], name: str, description: str | None = None,
                   **kw) -> "PromptUploadResponse":
        data = {"description": description} if description else {}
        out = await self._c._json("PUT", _prompt_path(name), files=_push_files(dir_or_file), data=data, **kw)
        return _prompt_models().PromptUploadResponse.model_validate(out)

    async def list(self, *, page_size: int | None = None, **kw) -> "list[PromptInfo]":
        out: list = []
        after = None
        while True:
            page = await self.list_page(after=after, limit=page_size, **kw)
            out += page.data
            if not page.has_more or not page.data:
                return out
            after = page.last_id

    async def list_page(self, *, after: str | None = None, limit: int | None = None, **kw) -> "PromptList":
        out = await self._c._json("GET", "/v1/prompts", params=_page_params(after=after, limit=limit), **kw)
        return _prompt_models().PromptList.model_validate(out)

    async def get(self, name: str, **kw) -> "PromptInfo":
        return _prompt_models().PromptInfo.model_validate(await self._c._json("GET", _prompt_path(name), **kw))

    async def versions(self, name: str, **kw) -> "PromptVersionList":
        out = await self._c._json("GET", _prompt_path(name, "/versions"), **kw)
        return _prompt_models().PromptVersionList.model_validate(out)

    async def delete(self, name: str, **kw) -> "PromptDeleted":
        return _prompt_models().PromptDeleted.model_validate(await self._c._json("DELETE", _prompt_path(name), **kw))

    async def pull(self, name: str, dir: str | os.PathLike[str], version: str | None = None, **kw) -> Path:
        params = {"version": version} if version else None
        resp = await self._c._send("GET", _prompt_path(name, "/download"), params=params, **kw)
        return _write_adapter(resp.content, dir)


class AsyncTuning:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, **params) -> dict[str, Any]:
        kw = {k: params.pop(k) for k in ("timeout", "request_id", "extra_headers") if k in params}
        return await self._c._json("POST", "/v1/tuning/jobs", json=params, **kw)

    async def get(self, job_id: str, **kw) -> dict[str, Any]:
        return await self._c._json("GET", f"/v1/tuning/jobs/{quote(job_id, safe='')}", **kw)

    async def list(self, limit: int | None = None, **kw) -> list[dict[str, Any]]:
        out = await self._c._json("GET", "/v1/tuning/jobs", params={"limit": limit} if limit else None, **kw)
        return out.get("data", []) if isinstance(out, dict) else out

    async def cancel(self, job_id: str, **kw) -> dict[str, Any]:
        return await self._c._json("POST", f"/v1/tuning/jobs/{quote(job_id, safe='')}/cancel", **kw)

    async def events(self, job_id: str, *, after: str | None = None, limit: int | None = None, order: str | None = None,
                     **kw) -> list[dict[str, Any]]:
        out = await self._c._json("GET", f"/v1/tuning/jobs/{quote(job_id, safe='')}/events",
                                  params=_page_params(after=after, limit=limit, order=order), **kw)
        return out.get("data", []) if isinstance(out, dict) else out

    async def checkpoints(self, job_id: str, *, after: str | None = None, limit: int | None = None,
                          **kw) -> list[dict[str, Any]]:
        out = await self._c._json("GET", f"/v1/tuning/jobs/{quote(job_id, safe='')}/checkpoints",
                                  params=_page_params(after=after, limit=limit), **kw)
        return out.get("data", []) if isinstance(out, dict) else out

    async def wait(self, job_id: str, *, poll_interval: float = 2.0, timeout: float | None = None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if job.get("status") in TERMINAL_JOB_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise APITimeoutError(f"tuning job {job_id} still {job.get('status')!r} after {timeout} s")
            await asyncio.sleep(poll_interval)
