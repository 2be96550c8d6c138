"""Per-tenant quotas (tiny model, in process): one tenant cannot take what the others need."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from server.service.runtime import LoadedModel
from server.app import create_app
from server.service.auth import add_key
from server.config import Settings


def _app(tiny_model, tokenizer, tmp_path, **overrides):
    settings = Settings(**{"store": str(tmp_path / "store"), "max_model_len": 256, **overrides})
    return create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))


@pytest.fixture()
def two_tenants(tiny_model, tokenizer, tmp_path):
    keyfile = tmp_path / "keys.yaml"
    keys = {"a": add_key(keyfile, "acme"), "b": add_key(keyfile, "beta")}
    app = _app(tiny_model, tokenizer, tmp_path, api_keys=str(keyfile))
    with TestClient(app) as c:
        yield c, {who: {"Authorization": f"Bearer {key}"} for who, key in keys.items()}


# ---- 5. tuning jobs per tenant; the inference queue per tenant is on by default -----------------------------
def test_one_tenant_cannot_fill_the_tuning_queue(two_tenants):
    c, h = two_tenants
    job = {"name": "t", "training_data": [{"prompt": "a", "completion": " b"}] * 2, "steps": 50, "batch_size": 2,
           "num_virtual_tokens": 2}
    engine = c.app.state.service.engine
    created = []
    with engine.step_lock:  # the trainer needs this lock for every unit of work: nothing finishes meanwhile
        for _ in range(2):
            r = c.post("/v1/tuning/jobs", json=job, headers=h["a"])
            assert r.status_code == 200, r.text
            created.append(r.json()["id"])
        r = c.post("/v1/tuning/jobs", json=job, headers=h["a"])
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
        assert "--max-tuning-jobs-per-tenant" in r.json()["error"]["message"]
        r = c.post("/v1/tuning/jobs", json=job, headers=h["b"])  # the other tenant still gets in
        assert r.status_code == 200, r.text
        created.append(r.json()["id"])
        for job_id, who in zip(created, "aab"):
            assert c.post(f"/v1/tuning/jobs/{job_id}/cancel", headers=h[who]).status_code == 200


def test_per_tenant_inference_queue_limit_is_on_by_default(tiny_model, tokenizer, tmp_path):
    from server.engine.request import Request, SamplingParams
    from server.engine.scheduler import QueueFullError

    defaults = Settings()
    assert 0 < defaults.max_queue_per_tenant < defaults.max_queue
    with TestClient(_app(tiny_model, tokenizer, tmp_path)) as c:
        engine = c.app.state.service.engine
        limit = defaults.max_queue_per_tenant
        flood = [Request(f"f{i}", [1, 2], SamplingParams(), tenant="greedy") for i in range(limit)]

        async def fill():
            for request in flood:
                engine.submit(request)
            with pytest.raises(QueueFullError, match="tenant"):
                engine.submit(Request("over", [1, 2], SamplingParams(), tenant="greedy"))
            flood.append(Request("polite", [1, 2], SamplingParams(), tenant="polite"))
            engine.submit(flood[-1])  # another tenant is still admitted

        with engine.step_lock:
            asyncio.run(fill())
            for request in flood:
                engine.abort(request.request_id)


# ---- 12. rate limits per tenant: requests/s and tokens/min, 429 with Retry-After, in the metrics -----------
def test_token_bucket_refills_at_its_rate():
    from server.service.ratelimit import TokenBucket

    bucket = TokenBucket(rate=2.0, capacity=4.0, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(4)] == [0.0] * 4
    assert bucket.take(1, 0.0) == pytest.approx(0.5)  # empty: one unit in 1/rate s
    assert bucket.take(1, 0.5) == 0.0
    assert bucket.take(3, 1.0) == pytest.approx(1.0)  # 1 unit there, 2 more take 1 s; nothing taken
    assert bucket.take(3, 100.0) == 0.0 and bucket.level == pytest.approx(1.0)  # refill stops at capacity


def _metric(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_requests_per_second_per_tenant(tiny_model, tokenizer, tmp_path):
    keyfile = tmp_path / "keys.yaml"
    keys = {"a": add_key(keyfile, "acme"), "b": add_key(keyfile, "beta"), "ops": add_key(keyfile, "ops", role="admin")}
    h = {who: {"Authorization": f"Bearer {key}"} for who, key in keys.items()}
    with TestClient(_app(tiny_model, tokenizer, tmp_path, api_keys=str(keyfile), rate_limit_rps=0.2)) as c:
        c.app.state.service.rate_limiter.clock = lambda: 1000.0  # frozen: no refill, however slow the machine
        assert c.get("/v1/models", headers=h["a"]).status_code == 200  # burst: 1
        r = c.get("/v1/models", headers=h["a"])
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.headers["retry-after"] == "5" and "--rate-limit-rps" in r.json()["error"]["message"]  # 1 / 0.2 s
        assert c.get("/v1/models", headers=h["b"]).status_code == 200  # another tenant has its own bucket
        assert c.get("/health").status_code == 200  # probes are not limited
        text = c.get("/metrics", headers=h["ops"]).text
        assert _metric(text, 'softserve_rejected_requests_total{reason="rate_limit_requests"}') == 1.0


def test_tokens_per_minute_per_tenant(tiny_model, tokenizer, tmp_path):
    with TestClient(_app(tiny_model, tokenizer, tmp_path, rate_limit_tokens_per_minute=100)) as c:
        c.app.state.service.rate_limiter.clock = lambda: 1000.0  # frozen: no refill, however slow the machine
        body = {"model": "tiny", "prompt": [5, 6], "max_tokens": 40}  # costs 42
        assert c.post("/v1/completions", json=body).status_code == 200
        assert c.post("/v1/completions", json=body).status_code == 200
        r = c.post("/v1/completions", json=body)  # 16 left: 26 short, refilled at 100/60 per second
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.headers["retry-after"] == "16"  # 26 tokens at 100/60 per second: 15.6 s
        r = c.post("/v1/completions", json={**body, "max_tokens": 99})  # could never fit: not a retry
        assert r.status_code == 400 and "--rate-limit-tokens-per-minute" in r.json()["error"]["message"]
        assert _metric(c.get("/metrics").text, 'softserve_rejected_requests_total{reason="rate_limit_tokens"}') == 1.0


# ---- 10 (part). temp files left by a writer killed mid-write are removed after a grace period ---------------
def test_stale_temp_files_are_removed_at_start_fresh_ones_kept(tiny_model, tokenizer, tmp_path):
    import os
    import time

    from prompt_store.backend import LocalBackend

    store = tmp_path / "store"
    blobs = store / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    stale, fresh = blobs / ".tmp-killed", blobs / ".tmp-writing"
    stale.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    (blobs / "abc.safetensors").write_bytes(b"z")
    os.utime(blobs / "abc.safetensors", (old, old))  # only temp files go, however old a real key is
    with TestClient(_app(tiny_model, tokenizer, tmp_path)) as c:
        assert c.get("/ready").status_code == 200
    assert not stale.exists() and fresh.exists() and (blobs / "abc.safetensors").exists()
    assert LocalBackend(store).remove_stale_temp_files(older_than_s=0.0, now=time.time() + 1) == 1  # the fresh one, later
