"""Abuse resistance, round 2 (issue #26), on the API over the tiny model: ids that are not storage
keys, reserved names, quotas that concurrent or tuning writes used to get around."""

from __future__ import annotations

import time

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


def _jsonl(nbytes: int) -> bytes:
    line = b'{"prompt": "a", "completion": " ' + b"b" * 90 + b'"}\n'
    return line * (nbytes // len(line))


class _SlowDisk:
    """A backend whose data writes take a while, as a real disk's do under load: the window in which
    concurrent uploads used to all pass the quota check against the same old total."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def put(self, key, data, **kw):
        if key.endswith(".jsonl"):
            import time
            time.sleep(0.3)
        return self._backend.put(key, data, **kw)

    def __getattr__(self, name):
        return getattr(self._backend, name)


def test_concurrent_file_uploads_cannot_overshoot_the_bytes_quota(tmp_path):
    """F5: four 600 KB uploads at once against a 1 MB quota: three were accepted."""
    from tests.support.concurrency import run_together
    from softserve.store.backends import LocalBackend
    from softserve.store.types import QuotaExceeded
    from softserve.store.usage import UsageLedger
    from softserve.tuning.files import FileRegistry

    backend = _SlowDisk(LocalBackend(tmp_path / "store"))
    usage = UsageLedger(backend, max_bytes=1_000_000)
    files = FileRegistry(backend, 10_000_000, usage=usage)
    data = _jsonl(600_000)
    raised = run_together([lambda: files.create("acme", "d.jsonl", "fine-tune", data)] * 4)
    assert len(raised) == 3 and all(isinstance(e, QuotaExceeded) for e in raised), raised
    assert len(files.list("acme")) == 1
    assert usage.get("acme").file_bytes == len(data)  # what is on disk, no more


def test_a_result_file_written_before_any_usage_record_is_counted(tmp_path):
    """A tenant's first stored bytes may be a batch result file: the usage record is then built by walking
    the store, which must already hold the file (it was counted as 0 bytes when added before the write)."""
    from softserve.store.backends import LocalBackend
    from softserve.store.usage import UsageLedger
    from softserve.tuning.files import FileRegistry

    backend = LocalBackend(tmp_path / "store")
    usage = UsageLedger(backend, max_bytes=1_000_000)
    files = FileRegistry(backend, 10_000_000, usage=usage)
    data = _jsonl(5_000)
    meta, new = files.create_result("acme", "file-" + "a" * 24, "out.jsonl", data)
    assert new and meta.bytes == len(data)
    assert usage.get("acme").file_bytes == len(data)
    files.create("acme", "d.jsonl", "fine-tune", data)  # and counting continues from there
    assert usage.get("acme").file_bytes == 2 * len(data)


def test_the_per_tenant_job_limit_holds_across_replicas(tiny_model, tokenizer, tmp_path):
    """F7: each of two replicas on one store accepted --max-tuning-jobs-per-tenant of one tenant's jobs."""
    from tests.support.tuning import local_manager, submit_toy_job
    from softserve.tuning.jobs import QueueFull

    a = local_manager(tiny_model, tokenizer, tmp_path, max_active_per_tenant=2)
    b = local_manager(tiny_model, tokenizer, tmp_path, max_active_per_tenant=2)
    try:
        ids = [submit_toy_job(a, steps=10_000) for _ in range(2)]
        with pytest.raises(QueueFull, match="--max-tuning-jobs-per-tenant"):
            submit_toy_job(b, steps=10_000)
        submit_toy_job(b, steps=1, tenant="beta")  # another tenant is not held back
        a.cancel("acme", ids[0])
        deadline = time.monotonic() + 30
        while True:  # a finished job frees its place on every replica (once a has finalized it)
            try:
                ids.append(submit_toy_job(b, steps=10_000))
                break
            except QueueFull:
                assert time.monotonic() < deadline, "the cancelled job still counts"
                time.sleep(0.05)
        for job_id in ids[1:]:
            (a if job_id in ids[:2] else b).cancel("acme", job_id)
    finally:
        a.close()
        b.close()


def test_a_jsonl_file_with_a_utf8_bom_is_accepted(api):
    """Also: a UTF-8 BOM (as Windows editors write it) made line 1 invalid JSON."""
    data = "\ufeff".encode() + b'{"prompt": "a", "completion": " b"}\n' * 3
    r = api.post("/v1/files", headers=api.h["a"], files={"file": ("d.jsonl", data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    assert r.json().get("num_examples", 3) == 3


@pytest.mark.parametrize("field,value", [("weight_decay", 1e6), ("max_grad_norm", 1e30)])
def test_optimizer_settings_have_upper_bounds(api, field, value):
    body = {"name": "t", "training_data": [{"prompt": "a", "completion": " b"}] * 2, field: value}
    r = api.post("/v1/tuning/jobs", headers=api.h["a"], json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


@pytest.mark.parametrize("line2", [
    {"prompt": "a", "completions": " b"},  # a misspelt extra field (the right one is added below)
    {"prompt": "a", "completion": " b", "weight": 0},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
])
def test_unknown_fields_in_training_lines_are_refused_with_the_line(api, line2):
    """Also: unknown fields in JSONL lines were silently ignored; the API refuses unknown fields."""
    import json

    lines = [{"prompt": "a", "completion": " b"}, line2]
    if "completions" in line2:
        line2["completion"] = " c"  # the known fields are all there: only the extra one is wrong
    data = "".join(json.dumps(x) + "\n" for x in lines).encode()
    r = api.post("/v1/files", headers=api.h["a"], files={"file": ("d.jsonl", data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400, r.text
    assert "line 2" in r.json()["error"]["message"] and "unknown field" in r.json()["error"]["message"], r.text
    r = api.post("/v1/tuning/jobs", headers=api.h["a"], json={"name": "t", "training_data": lines})
    assert r.status_code == 400, r.text
    assert "line 2" in r.json()["error"]["message"] and r.json()["error"]["param"] == "training_data", r.text
