"""Abuse resistance, round 2 (issue #26), on the API over the tiny model: ids that are not storage
keys, reserved names, quotas that concurrent or tuning writes used to get around."""

from __future__ import annotations

import pytest

from tests.support.prompts import CFG, blob

BAD_JOB_IDS = ["tunejob-%C2%B2", "tunejob-%D9%A3abc", "tunejob-" + "a" * 1000]


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
@pytest.mark.parametrize("method,suffix", [("GET", ""), ("GET", "/events"), ("GET", "/checkpoints"),
                                           ("POST", "/cancel")])
def test_a_job_id_that_is_not_a_storage_key_is_a_404(api, job_id, method, suffix):
    """F8: `str.isalnum` accepted Unicode digits and any length: the store refused the key, a 500."""
    r = api.request(method, f"/v1/tuning/jobs/{job_id}{suffix}", headers=api.h["a"])
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "job_not_found"
    assert api.get("/health").status_code == 200


@pytest.mark.parametrize("file_id", ["file-%C2%B2", "file-" + "a" * 1000])
def test_a_file_id_that_is_not_a_storage_key_is_a_404(api, file_id):
    assert api.get(f"/v1/files/{file_id}", headers=api.h["a"]).status_code == 404


def test_a_prompt_cannot_take_the_base_models_name(api):
    """F9: it was stored (201), and /v1/models then listed the id twice; `model: <name>` meant the base."""
    files = {"adapter_model": ("m.safetensors", blob(1)), "adapter_config": ("c.json", CFG)}
    r = api.put("/v1/prompts/tiny-llama", headers=api.h["a"], files=files)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "name_reserved"
    ids = [m["id"] for m in api.get("/v1/models", headers=api.h["a"]).json()["data"]]
    assert ids.count("tiny-llama") == 1
    assert api.put("/v1/prompts/tiny-llama-2", headers=api.h["a"], files=files).status_code == 201
