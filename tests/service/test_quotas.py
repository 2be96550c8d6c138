"""Per-tenant quotas (tiny model, in process): one tenant cannot take what the others need."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient

from softserve.service.runtime import LoadedModel
from softserve.app import create_app
from softserve.service.auth import add_key
from softserve.config import Settings
from tests.support.prompts import CFG, blob


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
    from softserve.engine.request import Request, SamplingParams
    from softserve.engine.scheduler import QueueFullError

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
    from softserve.service.ratelimit import TokenBucket

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

    from softserve.store.backends import LocalBackend

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


# ---- 10. per-tenant storage quotas: prompt names (429) and stored bytes (413), freed by deletes -----------
def _prompt_files(seed: int) -> dict:
    """A 4-token prompt for the tiny model (hidden 64) as multipart files."""
    return {"adapter_model": ("adapter_model.safetensors", blob(seed)), "adapter_config": ("adapter_config.json", CFG)}


def test_prompt_count_quota_answers_429_and_delete_frees_it(tiny_model, tokenizer, tmp_path):
    assert Settings().max_prompts_per_tenant > 0  # on by default
    with TestClient(_app(tiny_model, tokenizer, tmp_path, max_prompts_per_tenant=2)) as c:
        assert c.put("/v1/prompts/a", files=_prompt_files(1)).status_code == 201
        assert c.put("/v1/prompts/b", files=_prompt_files(2)).status_code == 201
        r = c.put("/v1/prompts/c", files=_prompt_files(3))
        assert r.status_code == 429, r.text
        error = r.json()["error"]
        assert error["code"] == "prompt_quota_exceeded" and "--max-prompts-per-tenant" in error["message"]
        assert "has 2 prompts" in error["message"] and "is 2" in error["message"]
        assert "retry-after" not in r.headers  # retrying does not help: deleting a prompt does
        assert c.get("/health").status_code == 200
        assert [p["name"] for p in c.get("/v1/prompts").json()["data"]] == ["a", "b"]  # nothing half-written
        assert c.put("/v1/prompts/a", files=_prompt_files(4)).status_code == 201  # a new version of a name is fine
        assert c.delete("/v1/prompts/b").status_code == 200
        assert c.put("/v1/prompts/c", files=_prompt_files(3)).status_code == 201


def test_storage_bytes_quota_answers_413_for_prompts_and_files(tiny_model, tokenizer, tmp_path):
    # Each prompt: 4 x 64 float32 = 1024 tensor bytes.
    assert Settings().max_store_bytes_per_tenant > 0
    with TestClient(_app(tiny_model, tokenizer, tmp_path, max_store_bytes_per_tenant=2500)) as c:
        assert c.put("/v1/prompts/a", files=_prompt_files(1)).status_code == 201
        assert c.put("/v1/prompts/b", files=_prompt_files(2)).status_code == 201
        r = c.put("/v1/prompts/c", files=_prompt_files(3))
        assert r.status_code == 413, r.text
        error = r.json()["error"]
        assert error["code"] == "storage_quota_exceeded" and "--max-store-bytes-per-tenant" in error["message"]
        assert "stores 2048 bytes" in error["message"] and "2500" in error["message"]
        line = b'{"prompt": "a", "completion": " b"}\n'
        r = c.post("/v1/files", files={"file": ("d.jsonl", line * 20)}, data={"purpose": "tune"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "storage_quota_exceeded", r.text
        r = c.post("/v1/files", files={"file": ("d.jsonl", line * 5)}, data={"purpose": "tune"})
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        assert c.get("/health").status_code == 200
        assert c.delete("/v1/prompts/a").status_code == 200  # frees its 1024 bytes
        assert c.put("/v1/prompts/c", files=_prompt_files(3)).status_code == 201
        assert c.put("/v1/prompts/d", files=_prompt_files(5)).status_code == 413
        assert c.delete(f"/v1/files/{file_id}").status_code == 200
        store = c.app.state.service.store
        assert store.usage.get("default").bytes == 2048


def test_tuning_job_over_the_prompt_quota_fails_with_the_quota_error(tiny_model, tokenizer, tmp_path):
    import time

    with TestClient(_app(tiny_model, tokenizer, tmp_path, max_prompts_per_tenant=2)) as c:
        assert c.put("/v1/prompts/x", files=_prompt_files(1)).status_code == 201
        assert c.put("/v1/prompts/y", files=_prompt_files(2)).status_code == 201
        job = {"name": "t", "training_data": [{"prompt": "a", "completion": " b"}] * 2, "steps": 2, "batch_size": 2,
               "num_virtual_tokens": 2}
        r = c.post("/v1/tuning/jobs", json=job)  # its result would be a third name: refused before it runs
        assert r.status_code == 429 and r.json()["error"]["code"] == "prompt_quota_exceeded", r.text
        assert c.delete("/v1/prompts/y").status_code == 200
        r = c.post("/v1/tuning/jobs", json=job)  # 't' fits, but its first checkpoint takes 't-ckpt' (2 of 2)
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120
        while (state := c.get(f"/v1/tuning/jobs/{r.json()['id']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert state["status"] == "failed" and state["error"]["code"] == "prompt_quota_exceeded", state
        assert [p["name"] for p in c.get("/v1/prompts").json()["data"]] == ["t-ckpt", "x"]  # no result 't'
        assert "--max-prompts-per-tenant" in state["error"]["message"]
        assert c.get("/health").status_code == 200
