"""Typed errors end to end: the engine reports an ErrorKind, the service raises a typed error, and
softserve/api/errors.py alone decides the HTTP status. No layer reads another's message text."""

from __future__ import annotations

import inspect
import threading
import time

import pytest
from fastapi.testclient import TestClient

from softserve.store.types import PromptCacheFull, PromptNotFound, PromptStoreError, PromptValidationError
from softserve.api.errors import STATUS_BY_ERROR, http_headers, http_status
from softserve.app import create_app
from softserve.config import Settings
from softserve.engine.outputs import RequestOutput
from softserve.engine.request import ErrorKind, FinishReason
from softserve.service import errors as E
from softserve.service.generation import generation_error
from softserve.service.runtime import LoadedModel


def test_every_service_error_has_an_http_status():
    kinds = [c for _, c in inspect.getmembers(E, inspect.isclass) if issubclass(c, E.ServiceError) and c is not E.ServiceError]
    assert kinds and all(kind in STATUS_BY_ERROR for kind in kinds)
    assert http_status(E.Overloaded("x", retry_after=3)) == 429 and http_headers(E.Overloaded("x", retry_after=3)) == {"Retry-After": "3"}
    assert http_headers(E.Unauthenticated("x")) == {"WWW-Authenticate": "Bearer"}
    assert http_status(E.ClientGone("x")) == 499 and http_status(E.Timeout("x")) == 504


def test_store_errors_are_translated_by_kind():
    assert isinstance(E.from_store_error(PromptNotFound("gone"), "name"), E.NotFound)
    invalid = E.from_store_error(PromptValidationError("bad", status_code=422), "adapter_model")
    assert isinstance(invalid, E.Unprocessable) and invalid.param == "adapter_model" and invalid.code == "invalid_prompt"
    full = E.from_store_error(PromptCacheFull("all pinned"))
    assert isinstance(full, E.NotReady) and full.retry_after == 1
    internal = E.from_store_error(PromptStoreError("disk"), "name")
    assert isinstance(internal, E.InternalError) and internal.param is None  # a server fault names no request field


@pytest.mark.parametrize("kind, expected", [
    (ErrorKind.TIMEOUT, E.Timeout), (ErrorKind.QUEUE_FULL, E.Overloaded), (ErrorKind.ENGINE_DEAD, E.NotReady),
    (ErrorKind.ENGINE_ERROR, E.InternalError), (ErrorKind.REJECTED, E.InvalidRequest),
])
def test_engine_outcomes_map_by_kind_not_by_message(kind, expected):
    # The message says "timed out" and "queue is full" in every case: only the kind decides.
    output = RequestOutput("r", "", (), finished=True, finish_reason=FinishReason.ERROR,
                           error="request timed out; queue is full", error_kind=kind)
    assert type(generation_error(output)) is expected


def test_a_request_past_its_timeout_is_504_and_the_server_stays_healthy(tiny_model, tokenizer, tmp_path):
    settings = Settings(store=str(tmp_path / "s"), max_model_len=256, request_timeout=0.5)
    app = create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as client:
        engine = app.state.service.engine
        result = {}

        def call():
            result["r"] = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 64,
                                                               "ignore_eos": True})

        with engine.step_lock:  # the engine cannot step: the request waits past its timeout
            thread = threading.Thread(target=call)
            thread.start()
            time.sleep(1.0)
        thread.join(30)
        r = result["r"]
        assert r.status_code == 504, r.text
        assert r.json()["error"]["code"] == "timeout" and "timed out" in r.json()["error"]["message"]
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200 and client.get("/ready").status_code == 200


def test_a_request_the_engine_rejects_at_add_is_a_400_that_says_why(tiny_model, tokenizer, tmp_path):
    """The engine's own add-time checks (KV pool size, prompt shape, grammar) guard direct engine users;
    a request that gets past the API's checks and is refused there is the caller's to fix, not a 500."""
    settings = Settings(store=str(tmp_path / "s"), max_model_len=256)
    app = create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as client:
        engine = app.state.service.engine.engine
        real_add = engine.add_request

        def refuse(request):
            raise ValueError("request needs 999 KV slots, the pool holds 256")

        engine.add_request = refuse
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "request_rejected" and "999 KV slots" in error["message"]
        engine.add_request = real_add
        ok = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200 and client.get("/ready").status_code == 200


def test_after_the_engine_loop_dies_requests_say_so_not_loading(tiny_model, tokenizer, tmp_path):
    settings = Settings(store=str(tmp_path / "s"), max_model_len=256)
    app = create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as client:
        async_engine = app.state.service.engine

        def crash():
            raise RuntimeError("device lost")

        async_engine.engine.step = crash  # the loop itself dies at its next step
        first = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert first.status_code == 503, first.text
        deadline = time.monotonic() + 10
        while async_engine.is_alive:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert "engine died" in message and "device lost" in message and "loading" not in message
        ready = client.get("/ready")
        assert ready.status_code == 503 and "engine died" in ready.text
