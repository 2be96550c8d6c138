"""--kv-tier-dir through the API, in process: an upload's KV is computed in spare capacity before its first
request, a restarted server reads it from disk, and the tokens are those of a server without the tier."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from softserve.app import create_app
from softserve.config import Settings
from softserve.service.runtime import LoadedModel
from tests.support.live_server import adapter_config, prompt_bytes

REQUEST = {"prompt": "Tell me something", "max_tokens": 6, "temperature": 0, "ignore_eos": True}


def make_client(tiny_model, tokenizer, tmp_path, tier: bool) -> TestClient:
    settings = Settings(store=str(tmp_path / "store"), max_model_len=256,
                        kv_tier_dir=str(tmp_path / "kv") if tier else None)
    return TestClient(create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny")))


def metric(client: TestClient, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", client.get("/metrics").text, re.M)
    assert match, name
    return float(match.group(1))


def upload(client: TestClient, name: str, seed: int, k: int = 6) -> None:
    hidden = client.app.state.service.engine.model.config.hidden_size
    files = {"adapter_model": ("adapter_model.safetensors", prompt_bytes(seed, k, hidden)),
             "adapter_config": ("adapter_config.json", adapter_config(k))}
    assert client.put(f"/v1/prompts/{name}", files=files).status_code == 201


def complete(client: TestClient, model: str) -> str:
    r = client.post("/v1/completions", json={"model": model, **REQUEST})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def settle(client: TestClient) -> None:
    runtime = client.app.state.service
    assert runtime.kv_warmer.wait_idle(30)
    assert runtime.engine.engine.runner.kv_tier.flush(10)


def test_an_upload_is_warmed_and_a_restarted_server_reads_its_kv_from_disk(tiny_model, tokenizer, tmp_path):
    with make_client(tiny_model, tokenizer, tmp_path / "plain", tier=False) as plain:
        upload(plain, "greeter", seed=7)
        expected = complete(plain, "greeter")

    with make_client(tiny_model, tokenizer, tmp_path, tier=True) as client:
        upload(client, "greeter", seed=7)
        settle(client)
        assert metric(client, 'softserve_kv_warmups_total{outcome="done"}') == 1
        assert metric(client, "softserve_kv_tier_writes_total") == 1
        assert metric(client, "softserve_kv_tier_prompts") == 1
        # the warm-up filled the device cache too: the first request computes no virtual token
        assert complete(client, "greeter") == expected
        assert metric(client, "softserve_kv_prefix_cache_hits_total") == 1
        upload(client, "same-content", seed=7)  # another name, the same tensor: nothing to compute
        upload(client, "another", seed=8)
        settle(client)
        assert metric(client, 'softserve_kv_warmups_total{outcome="skipped"}') == 1
        assert metric(client, 'softserve_kv_warmups_total{outcome="done"}') == 2
        assert metric(client, 'softserve_kv_warmups_total{outcome="failed"}') == 0

    with make_client(tiny_model, tokenizer, tmp_path, tier=True) as restarted:  # empty device caches
        assert metric(restarted, "softserve_kv_tier_prompts") == 2
        assert complete(restarted, "greeter") == expected
        assert metric(restarted, "softserve_kv_tier_hits_total") == 1
        assert metric(restarted, "softserve_kv_tier_misses_total") == 0
        # read from disk by the request's thread before admission: the engine found it in the device cache
        assert metric(restarted, "softserve_kv_prefix_cache_hits_total") == 1
        assert metric(restarted, "softserve_kv_prefix_cache_misses_total") == 0
        assert complete(restarted, "same-content") == expected  # the same KV, now from the device cache
        assert restarted.get("/ready").status_code == 200


def test_without_the_tier_uploads_queue_no_warm_up(tiny_model, tokenizer, tmp_path):
    with make_client(tiny_model, tokenizer, tmp_path, tier=False) as client:
        upload(client, "greeter", seed=7)
        assert client.app.state.service.kv_warmer is None
        assert "softserve_kv_tier" not in client.get("/metrics").text


def test_a_tuning_jobs_result_prompt_is_warmed_but_not_its_checkpoints(tiny_model, tokenizer, tmp_path):
    from tests.support.tuning import toy_records, wait_for_job

    with make_client(tiny_model, tokenizer, tmp_path, tier=True) as client:
        body = {"name": "tuned", "training_data": toy_records(8), "init": "vocab", "steps": 4, "batch_size": 4,
                "learning_rate": 0.2, "checkpoint_every": 2, "seed": 1}
        job = client.post("/v1/tuning/jobs", json=body).json()
        done = wait_for_job(client, job["id"], {}, ("succeeded", "failed", "cancelled"))
        assert done["status"] == "succeeded", done["error"]
        settle(client)
        assert metric(client, 'softserve_kv_warmups_total{outcome="done"}') == 1  # the result; its 2 checkpoints not
        assert metric(client, "softserve_kv_tier_prompts") == 1
        r = client.post("/v1/completions", json={"model": done["fine_tuned_model"], **REQUEST})
        assert r.status_code == 200, r.text
        assert metric(client, "softserve_kv_prefix_cache_hits_total") == 1 and metric(client, "softserve_kv_tier_misses_total") == 1


def test_deleting_a_prompt_removes_its_kv_from_the_disk_tier(tiny_model, tokenizer, tmp_path):
    with make_client(tiny_model, tokenizer, tmp_path, tier=True) as client:
        upload(client, "secret", seed=11)
        upload(client, "kept", seed=12)
        settle(client)
        tier = client.app.state.service.engine.engine.runner.kv_tier
        files = sorted(p.name for p in tier.directory.glob("*.safetensors"))
        assert len(files) == 2
        expected_kept = complete(client, "kept")
        assert client.delete("/v1/prompts/secret").status_code == 200
        assert tier.flush(10)
        assert metric(client, "softserve_kv_tier_prompts") == 1 and len(list(tier.directory.glob("*.safetensors"))) == 1
        assert complete(client, "kept") == expected_kept and client.get("/ready").status_code == 200
