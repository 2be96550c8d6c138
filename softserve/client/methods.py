"""`Client` and `AsyncClient`: every method is written once, in `_ClientBase`, `Prompts` and `Tuning`, as
an operation (softserve/client/transport.py) that the client's runner executes. On a `Client` a method
returns its result; on an `AsyncClient` the same method returns an awaitable of it, and the streams are
async iterators."""

from __future__ import annotations

import io
import os
import time
import uuid
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from softserve.api.schemas import (AliasDeleted, AliasInfo, AliasList, ChatCompletionResponse, CompletionResponse,
                                   FeedbackResponse, ModelList, PromptDeleted, PromptInfo, PromptList,
                                   PromptUploadResponse, PromptVersionList)

from .errors import APITimeoutError
from .transport import AsyncRunner, Op, RetryPolicy, Sleep, SyncRunner, Send, send_with_retries

T = TypeVar("T")
DEFAULT_TIMEOUT = 120.0
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled", "canceled"})
_NOT_GIVEN: Any = object()
_CALL_OPTIONS = ("timeout", "request_id", "extra_headers")


def _environment():
    from softserve.config import ClientSettings  # SOFTSERVE_URL, SOFTSERVE_API_KEY (env vars are read there only)

    return ClientSettings()


def _normalize_base_url(base_url: str | None) -> str:
    url = (base_url or _environment().url).rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url  # accept the OpenAI-style ".../v1" too


def _prompt_path(name: str, suffix: str = "") -> str:
    return f"/v1/prompts/{quote(name, safe='/@')}{suffix}"


def _job_path(job_id: str, suffix: str = "") -> str:
    return f"/v1/tuning/jobs/{quote(job_id, safe='')}{suffix}"


def _alias_path(name: str, alias: str | None = None) -> str:
    return _prompt_path(name, "/aliases" + ("" if alias is None else f"/{quote(alias, safe='')}"))


def _alias_body(version: str | None, split: Mapping[str, float] | Sequence[tuple[str, float]] | None) -> dict[str, Any]:
    if (version is None) == (split is None):
        raise ValueError("give exactly one of version or split")
    if version is not None:
        return {"version": version}
    arms = split.items() if isinstance(split, Mapping) else split
    return {"split": [{"version": v, "weight": w} for v, w in arms]}


def _header_value(value: str) -> str:
    return value if value.isascii() else quote(value, safe="")


def _page_params(**params) -> dict[str, Any] | None:
    return {k: v for k, v in params.items() if v is not None} or None


def _generation_body(model: str, key: str, value: Any, params: dict[str, Any], stream: bool) -> dict[str, Any]:
    if "stream" in params:
        raise ValueError("pass stream via stream_complete()/stream_chat(), not as a parameter")
    body = {"model": model, key: value, **params}
    if stream:
        body["stream"] = True
    return body


def _list_data(out: Any) -> list[dict[str, Any]]:
    return out.get("data", []) if isinstance(out, dict) else out


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


class _ClientBase:
    """The methods of both clients; `self._runner` decides whether they block or return awaitables."""

    _runner: SyncRunner | AsyncRunner

    def __init__(self, base_url: str | None, api_key: str | None, timeout: float | httpx.Timeout,
                 max_retries: int, retry: RetryPolicy | None, headers: Mapping[str, str] | None) -> None:
        self.base_url = _normalize_base_url(base_url)
        self.api_key = api_key if api_key is not None else _environment().api_key
        self.timeout = timeout
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self._default_headers = {"User-Agent": "softserve-client/0.1", **(headers or {})}
        if self.api_key:
            self._default_headers["Authorization"] = f"Bearer {self.api_key}"
        self.prompts = Prompts(self)
        self.tuning = Tuning(self)

    # -- plumbing: build a request, send it with retries, decode it
    def _run(self, op: Op[T]) -> Any:
        return self._runner.run(op)

    def _request(self, method: str, path: str, *, model: str | None = None, timeout: Any = _NOT_GIVEN,
                 request_id: str | None = None, extra_headers: Mapping[str, str] | None = None,
                 **kwargs) -> httpx.Request:
        headers = {**self._default_headers, "X-Request-ID": request_id or str(uuid.uuid4())}
        if model is not None:
            headers["X-Softserve-Prompt"] = _header_value(model)
        headers.update(extra_headers or {})
        timeout = self.timeout if timeout is _NOT_GIVEN else timeout  # None: no timeout (httpx semantics)
        return self._runner.http.build_request(method, self.base_url + path, headers=headers, timeout=timeout,
                                               **kwargs)

    def _call(self, method: str, path: str, decode: Callable[[httpx.Response], T], **kwargs) -> Op[T]:
        resp = yield from send_with_retries(self._request(method, path, **kwargs), self.retry)
        return decode(resp)

    def _json(self, method: str, path: str, **kwargs) -> Op[Any]:
        return self._call(method, path, httpx.Response.json, **kwargs)

    def _model(self, into: type[T], method: str, path: str, **kwargs) -> Op[T]:
        return self._call(method, path, lambda resp: into.model_validate(resp.json()), **kwargs)  # type: ignore[attr-defined]

    def _stream(self, path: str, body: dict[str, Any], chat: bool, **kwargs):
        request = self._request("POST", path, json=body, model=body["model"], **kwargs)
        return self._runner.stream(send_with_retries(request, self.retry, stream=True), chat)

    # -- OpenAI-compatible endpoints
    def complete(self, model: str, prompt: str | list, *, timeout: Any = _NOT_GIVEN, request_id: str | None = None,
                 extra_headers: Mapping[str, str] | None = None, **params):
        """POST /v1/completions -> CompletionResponse."""
        body = _generation_body(model, "prompt", prompt, params, stream=False)
        return self._run(self._model(CompletionResponse, "POST", "/v1/completions", json=body, model=model,
                                     timeout=timeout, request_id=request_id, extra_headers=extra_headers))

    def chat(self, model: str, messages: Sequence[Mapping[str, Any]], *, timeout: Any = _NOT_GIVEN,
             request_id: str | None = None, extra_headers: Mapping[str, str] | None = None, **params):
        """POST /v1/chat/completions -> ChatCompletionResponse."""
        body = _generation_body(model, "messages", list(messages), params, stream=False)
        return self._run(self._model(ChatCompletionResponse, "POST", "/v1/chat/completions", json=body, model=model,
                                     timeout=timeout, request_id=request_id, extra_headers=extra_headers))

    def stream_complete(self, model: str, prompt: str | list, *, timeout: Any = _NOT_GIVEN,
                        request_id: str | None = None, extra_headers: Mapping[str, str] | None = None, **params):
        """Text deltas (of every choice, in arrival order, when n > 1); errors surface on iteration."""
        body = _generation_body(model, "prompt", prompt, params, stream=True)
        return self._stream("/v1/completions", body, False, timeout=timeout, request_id=request_id,
                            extra_headers=extra_headers)

    def stream_chat(self, model: str, messages: Sequence[Mapping[str, Any]], *, timeout: Any = _NOT_GIVEN,
                    request_id: str | None = None, extra_headers: Mapping[str, str] | None = None, **params):
        body = _generation_body(model, "messages", list(messages), params, stream=True)
        return self._stream("/v1/chat/completions", body, True, timeout=timeout, request_id=request_id,
                            extra_headers=extra_headers)

    def feedback(self, completion_id: str, score: float, **kw):
        """POST /v1/feedback: attribute `score` to the prompt version that served `completion_id` (an id
        of this tenant's completion, served by this replica) -> FeedbackResponse."""
        return self._run(self._model(FeedbackResponse, "POST", "/v1/feedback",
                                     json={"id": completion_id, "score": score}, **kw))

    def models(self, *, timeout: Any = _NOT_GIVEN):
        """GET /v1/models -> ModelList."""
        return self._run(self._model(ModelList, "GET", "/v1/models", timeout=timeout))

    def _ready(self, timeout: Any) -> Op[bool]:
        try:
            resp = yield Send(self._request("GET", "/ready", timeout=timeout))
        except httpx.TransportError:
            return False
        return resp.status_code == 200

    def ready(self, *, timeout: Any = 5.0):
        """True when the server answers /ready with 200 (no retries)."""
        return self._run(self._ready(timeout))

    def _wait_ready(self, timeout: float, interval: float) -> Op[None]:
        deadline = time.monotonic() + timeout
        while not (yield from self._ready(5.0)):
            if time.monotonic() > deadline:
                raise APITimeoutError(f"server at {self.base_url} not ready after {timeout:.0f} s")
            yield Sleep(interval)

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5):
        return self._run(self._wait_ready(timeout, interval))


class Client(_ClientBase):
    """Synchronous client. `base_url` defaults to $SOFTSERVE_URL or http://127.0.0.1:8000 (a trailing
    /v1 is accepted); `api_key` defaults to $SOFTSERVE_API_KEY."""

    _runner: SyncRunner

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: Mapping[str, str] | None = None,
                 http_client: httpx.Client | None = None) -> None:
        self._runner = SyncRunner(http_client or httpx.Client(timeout=timeout))
        self._owns_http = http_client is None
        super().__init__(base_url, api_key, timeout, max_retries, retry, headers)

    def close(self) -> None:
        if self._owns_http:
            self._runner.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """Asynchronous twin of `Client`: the same methods, awaitable; streams are async iterators."""

    _runner: AsyncRunner

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT, max_retries: int = 3,
                 retry: RetryPolicy | None = None, headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        self._runner = AsyncRunner(http_client or httpx.AsyncClient(timeout=timeout))
        self._owns_http = http_client is None
        super().__init__(base_url, api_key, timeout, max_retries, retry, headers)

    async def aclose(self) -> None:
        if self._owns_http:
            await self._runner.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class Prompts:
    """`client.prompts`: the prompt store (PUT/GET/DELETE /v1/prompts...). Each call accepts `timeout=`,
    `request_id=` and `extra_headers=`."""

    def __init__(self, client: _ClientBase) -> None:
        self._c = client

    def push(self, dir_or_file: str | os.PathLike[str], name: str, description: str | None = None, **kw):
        """Upload a PEFT adapter directory or a bare .safetensors file -> PromptUploadResponse."""
        data = {"description": description} if description else {}
        return self._c._run(self._c._model(PromptUploadResponse, "PUT", _prompt_path(name),
                                           files=_push_files(dir_or_file), data=data, **kw))

    def _list_page(self, after: str | None, limit: int | None, **kw) -> Op[PromptList]:
        return self._c._model(PromptList, "GET", "/v1/prompts", params=_page_params(after=after, limit=limit), **kw)

    def _list(self, page_size: int | None, **kw) -> Op[list[PromptInfo]]:
        out: list[PromptInfo] = []
        after = None
        while True:
            page = yield from self._list_page(after, page_size, **kw)
            out += page.data
            if not page.has_more or not page.data:
                return out
            after = page.last_id

    def list(self, *, page_size: int | None = None, **kw):
        """Every prompt you can use (your own by name, then the public ones), fetched page by page."""
        return self._c._run(self._list(page_size, **kw))

    def list_page(self, *, after: str | None = None, limit: int | None = None, **kw):
        """One page of GET /v1/prompts -> PromptList (`has_more`, `last_id`: pass it as `after` for the next)."""
        return self._c._run(self._list_page(after, limit, **kw))

    def get(self, name: str, **kw):
        return self._c._run(self._c._model(PromptInfo, "GET", _prompt_path(name), **kw))

    def versions(self, name: str, **kw):
        return self._c._run(self._c._model(PromptVersionList, "GET", _prompt_path(name, "/versions"), **kw))

    def delete(self, name: str, **kw):
        return self._c._run(self._c._model(PromptDeleted, "DELETE", _prompt_path(name), **kw))

    def set_alias(self, name: str, alias: str, version: str | None = None, *,
                  split: Mapping[str, float] | Sequence[tuple[str, float]] | None = None, **kw):
        """Point `name@alias` at one version, or a weighted `split` ({version: weight}, up to 8) -> AliasInfo."""
        return self._c._run(self._c._model(AliasInfo, "PUT", _alias_path(name, alias), json=_alias_body(version, split),
                                           **kw))

    def aliases(self, name: str, **kw):
        """Every alias of a prompt -> list[AliasInfo]."""
        return self._c._run(self._c._call("GET", _alias_path(name), lambda r: AliasList.model_validate(r.json()).data,
                                          **kw))

    def get_alias(self, name: str, alias: str, **kw):
        """One alias with its `history` (who, when, from, to; oldest first) -> AliasInfo."""
        return self._c._run(self._c._model(AliasInfo, "GET", _alias_path(name, alias), **kw))

    def delete_alias(self, name: str, alias: str, **kw):
        return self._c._run(self._c._model(AliasDeleted, "DELETE", _alias_path(name, alias), **kw))

    def pull(self, name: str, dir: str | os.PathLike[str], version: str | None = None, **kw):
        """Download `name` (or `name@version`) as a PEFT adapter directory; returns the directory."""
        params = {"version": version} if version else None
        return self._c._run(self._c._call("GET", _prompt_path(name, "/download"),
                                          lambda resp: _write_adapter(resp.content, dir), params=params, **kw))


class Tuning:
    """`client.tuning`: soft-prompt tuning jobs (/v1/tuning/jobs, shaped like OpenAI fine-tuning jobs).
    `create(**params)` posts the params as the JSON body (e.g. name=, training_data=[{"prompt",
    "completion"}...] or training_file=, num_virtual_tokens=, steps=, learning_rate=). Results are plain
    dicts so new server fields pass through; a finished job's `fine_tuned_model` is the prompt ref."""

    def __init__(self, client: _ClientBase) -> None:
        self._c = client

    def create(self, **params):
        kw = {k: params.pop(k) for k in _CALL_OPTIONS if k in params}
        return self._c._run(self._c._json("POST", "/v1/tuning/jobs", json=params, **kw))

    def get(self, job_id: str, **kw):
        return self._c._run(self._c._json("GET", _job_path(job_id), **kw))

    def _list(self, limit: int | None, **kw) -> Op[list[dict[str, Any]]]:
        out: list[dict[str, Any]] = []
        after = None
        while True:
            page = yield from self._c._json("GET", "/v1/tuning/jobs", params=_page_params(after=after, limit=limit),
                                            **kw)
            data = _list_data(page)
            out += data
            if not (isinstance(page, dict) and page.get("has_more")) or not data:
                return out
            after = data[-1]["id"]

    def list(self, limit: int | None = None, **kw):
        """Every job you own, newest first, fetched page by page (`limit`: the page size)."""
        return self._c._run(self._list(limit, **kw))

    def cancel(self, job_id: str, **kw):
        return self._c._run(self._c._json("POST", _job_path(job_id, "/cancel"), **kw))

    def events(self, job_id: str, *, after: str | None = None, limit: int | None = None, order: str | None = None,
               **kw):
        """One page of the job's events (`order` "desc", the default: newest first, `after` an event id
        pages to older ones; "asc": oldest first, `after` tails newer ones)."""
        return self._c._run(self._c._call("GET", _job_path(job_id, "/events"), lambda r: _list_data(r.json()),
                                          params=_page_params(after=after, limit=limit, order=order), **kw))

    def checkpoints(self, job_id: str, *, after: str | None = None, limit: int | None = None, **kw):
        """The job's checkpoints, newest first; each `fine_tuned_model_checkpoint` is a servable prompt ref."""
        return self._c._run(self._c._call("GET", _job_path(job_id, "/checkpoints"), lambda r: _list_data(r.json()),
                                          params=_page_params(after=after, limit=limit), **kw))

    def wait(self, job_id: str, *, poll_interval: float = 2.0, timeout: float | None = None):
        """Poll until the job's `status` is terminal (succeeded/failed/cancelled); return the job."""
        return self._c._run(self._wait(job_id, poll_interval, timeout))

    def _wait(self, job_id: str, poll_interval: float, timeout: float | None) -> Op[dict[str, Any]]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = yield from self._c._json("GET", _job_path(job_id))
            if job.get("status") in TERMINAL_JOB_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise APITimeoutError(f"tuning job {job_id} still {job.get('status')!r} after {timeout} s")
            yield Sleep(poll_interval)
