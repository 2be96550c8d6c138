"""Hardening on a tiny model, in process: metrics, request ids, body limits, hostile inputs, failures."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from softserve.service.runtime import LoadedModel
from softserve.app import create_app
from softserve.config import Settings


@pytest.fixture()
def client(tiny_model, tokenizer, tmp_path):
    settings = Settings(store=str(tmp_path / "store"), max_model_len=256, max_body_bytes=64 * 1024, max_tokens_limit=100,
                        metrics_tenant_labels=True)
    app = create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as c:
        blob = save({"prompt_embeddings": torch.randn(4, tiny_model.config.hidden_size)})
        assert c.put("/v1/prompts/p1", files={"adapter_model": ("a.safetensors", blob)}).status_code == 201
        yield c


def _healthy(c: TestClient) -> None:
    assert c.get("/ready").status_code == 200
    r = c.post("/v1/completions", json={"model": "p1", "prompt": "hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) > 0


def _is_openai_error(r, status: int) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_metrics_expose_requests_tokens_latency_and_caches(client):
    for _ in range(2):
        client.post("/v1/completions", json={"model": "p1", "prompt": "hi there", "max_tokens": 3, "temperature": 0,
                                             "ignore_eos": True})
    client.post("/v1/completions", json={"model": "missing", "prompt": "x"})
    text = client.get("/metrics").text
    assert 'softserve_requests_total{endpoint="/v1/completions",status="200",tenant="default"} 2.0' in text
    assert 'softserve_requests_total{endpoint="/v1/completions",status="404",tenant="default"} 1.0' in text
    assert 'softserve_generation_tokens_total{tenant="default"} 6.0' in text
    assert 'softserve_virtual_tokens_total{tenant="default"} 8.0' in text
    for name in ("softserve_time_to_first_token_seconds_count 2.0", "softserve_inter_token_latency_seconds_count",
                 "softserve_engine_step_seconds_count", "softserve_queue_depth 0.0", "softserve_running_requests 0.0",
                 "softserve_prompt_cache_hits_total 1.0", "softserve_prompt_cache_misses_total 1.0",
                 "softserve_kv_prefix_cache_hits_total 1.0", "softserve_kv_prefix_cache_bytes", "softserve_ready 1.0"):
        assert name in text, name


def test_metrics_count_unfinished_tuning_jobs_by_status(client):
    import time

    def gauge() -> dict[str, float]:
        lines = [line for line in client.get("/metrics").text.splitlines() if line.startswith("softserve_tuning_jobs{")]
        return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in lines}

    def wait(job_id: str, status: str) -> None:
        deadline = time.monotonic() + 30
        while client.get(f"/v1/tuning/jobs/{job_id}").json()["status"] != status:
            assert time.monotonic() < deadline, f"tuning job not {status}"
            time.sleep(0.05)

    r = client.post("/v1/tuning/jobs", json={"name": "m", "steps": 100_000, "init": "vocab", "num_virtual_tokens": 2,
                                             "training_data": [{"prompt": "a", "completion": " b"}]})
    assert r.status_code == 200, r.text
    wait(r.json()["id"], "running")
    assert gauge() == {"validating_files": 0, "queued": 0, "running": 1}
    assert client.post(f"/v1/tuning/jobs/{r.json()['id']}/cancel").status_code == 200
    wait(r.json()["id"], "cancelled")
    deadline = time.monotonic() + 10
    while gauge()["running"] != 0:  # the worker lets go of the job just after the record says cancelled
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert gauge() == {"validating_files": 0, "queued": 0, "running": 0}


def test_request_id_is_echoed_or_created(client):
    r = client.post("/v1/completions", json={"model": "p1", "prompt": "x", "max_tokens": 1}, headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/health", headers={"X-Request-ID": "bad id with spaces"})
    assert r.headers["x-request-id"] != "bad id with spaces" and len(r.headers["x-request-id"]) == 32


def test_request_log_line_has_no_secrets(client, caplog):
    caplog.set_level("INFO", logger="softserve.request")
    client.post("/v1/completions", json={"model": "p1", "prompt": "x", "max_tokens": 2}, headers={"X-Request-ID": "log-me"})
    records = [r for r in caplog.records if r.name == "softserve.request"]
    fields = records[-1].fields
    assert fields["request_id"] == "log-me" and fields["tenant"] == "default" and fields["prompt"] == "p1"
    assert fields["prompt_version"] and fields["completion_tokens"] == 2 and fields["status"] == "ok"


@pytest.mark.parametrize(
    "body, status",
    [
        ({"model": "p1", "prompt": "x", "max_tokens": 10**30}, 400),  # huge number
        ({"model": "p1", "prompt": "x", "max_tokens": 1000}, 400),  # over --max-tokens-limit
        ({"model": "p1", "prompt": "x", "n": 10**6}, 400),
        ({"model": "p1", "prompt": "x", "logprobs": 50}, 400),
        ({"model": "p1", "prompt": "x", "stop": ["a"] * 100}, 400),
        ({"model": "p1", "prompt": "x", "stop": "s" * 10_000}, 400),
        ({"model": "p1", "prompt": [10**12]}, 400),  # token id outside the vocabulary
        ({"model": "p1", "prompt": "x", "temperature": -1}, 400),
        ({"model": "p1\u0000", "prompt": "x"}, 404),  # control character in a name
        ({"model": "\uff50\uff11", "prompt": "x"}, 404),  # fullwidth "p1": no unicode normalisation tricks
        ({"model": "../p1", "prompt": "x"}, 404),
        ({"model": "p1", "messages": []}, 400),
    ],
)
def test_hostile_json_bodies(client, body, status):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    _is_openai_error(client.post(path, json=body), status)
    _healthy(client)


@pytest.mark.parametrize(
    "raw, content_type",
    [
        (b'{"model": "p1", "prompt": "x", "temperature": NaN}', "application/json"),
        (b'{"model": "p1", "prompt": "x", "top_p": Infinity}', "application/json"),
        (b"[" * 10_000 + b"]" * 10_000, "application/json"),  # deeply nested
        (b'{"model": "p1", "prompt": "\xff\xfe invalid utf-8"}', "application/json"),
        (b"model=p1&prompt=x", "application/x-www-form-urlencoded"),  # wrong content type
        (b"", "application/json"),
    ],
)
def test_hostile_raw_bodies(client, raw, content_type):
    r = client.post("/v1/completions", content=raw, headers={"content-type": content_type})
    assert 400 <= r.status_code < 500, r.text
    _is_openai_error(r, r.status_code)
    _healthy(client)


def test_body_size_limit(client):
    huge = json.dumps({"model": "p1", "prompt": "a" * 200_000}).encode()
    _is_openai_error(client.post("/v1/completions", content=huge, headers={"content-type": "application/json"}), 413)

    def chunked():  # no Content-Length: counted while reading
        yield huge[:1000]
        yield huge[1000:]

    _is_openai_error(client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)
    _healthy(client)


def test_engine_loop_death_turns_ready_503_and_reports(client):
    state = client.app.state.service
    died = []
    state.engine._on_death = died.append

    def explode():
        raise SystemExit("simulated fatal error")

    state.engine.engine.step = explode
    r = client.post("/v1/completions", json={"model": "p1", "prompt": "x", "max_tokens": 2})
    assert r.status_code in (500, 503)
    assert client.get("/ready").status_code == 503
    _is_openai_error(client.post("/v1/completions", json={"model": "p1", "prompt": "x", "max_tokens": 2}), 503)
    assert died and "simulated fatal error" in died[0]
    assert client.get("/health").status_code == 200  # the process is alive; the CLI then exits non-zero


def test_queue_limits_return_429_with_retry_after(tiny_model, tokenizer, tmp_path):
    import asyncio

    from softserve.engine.request import Request, SamplingParams
    from softserve.engine.scheduler import QueueFullError

    settings = Settings(store=str(tmp_path / "s"), max_queue=4, max_queue_per_tenant=2, max_model_len=256)
    app = create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as c:
        engine = app.state.service.engine
        queued = [Request(f"t{i}", [1, 2], SamplingParams(), tenant="default") for i in range(2)]
        queued.append(Request("other", [1, 2], SamplingParams(), tenant="other"))

        async def fill():
            for request in queued:
                engine.submit(request)
            with pytest.raises(QueueFullError, match="tenant queue"):
                engine.submit(Request("t-over", [1, 2], SamplingParams(), tenant="default"))
            queued.append(Request("third", [1, 2], SamplingParams(), tenant="third"))
            engine.submit(queued[-1])
            with pytest.raises(QueueFullError, match="queue is full"):
                engine.submit(Request("global-over", [1, 2], SamplingParams(), tenant="third"))

        with engine.step_lock:  # the engine cannot step: everything submitted stays queued
            asyncio.run(fill())
            r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
            _is_openai_error(r, 429)
            assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
            for request in queued:
                engine.abort(request.request_id)
        _healthy_base(c)


def _healthy_base(c: TestClient) -> None:
    assert c.get("/ready").status_code == 200
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 200, r.text
