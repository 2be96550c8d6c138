"""Finished tuning jobs do not keep their resume state, and are removed after the retention period.

- succeeded / failed / cancelled: the job's `checkpoints/` objects (trainer state with the optimizer
  moments) are gone, while the published prompt, the `<name>-ckpt` versions and the API's job, events
  and checkpoints views keep working;
- a clean-up cut short after the finished record was written is finished by a scan;
- `--tuning-job-retention-seconds` removes a finished job (record, data, events, lease) once it is old
  enough, by an injected clock, and keeps unfinished, recent and other tenants' jobs; two replicas
  sweeping at once do not get in each other's way.

Self-contained (only the tiny model and tokenizer fixtures of conftest.py).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from softserve.store import keys
from softserve.store.backends import LocalBackend
from softserve.store.store import PromptStore
from softserve.tuning.config import TuningConfig
from softserve.tuning.persist import JobStore

WORDS = "apple river stone cloud tiger lemon violin candle forest mirror pepper rocket".split()
FINISHED = ("succeeded", "failed", "cancelled")


def records(n: int) -> list[dict]:
    return [{"prompt": f"Word: {WORDS[i % len(WORDS)]}\nLabel:", "completion": " yes" if i % 2 else " no"}
            for i in range(n)]


def job_keys(backend, tenant: str, job_id: str, part: str = "") -> list[str]:
    return backend.list(keys.job_prefix(tenant, job_id) + part)


def wait_for(check, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_finished_index_keys():
    key = keys.finished_job("t.x", "tunejob-ab12", 1_700_000_000)
    assert key == "tuning/finished/t.x/tunejob-ab12-1700000000.json"
    assert keys.parse_finished_job(key) == ("t.x", "tunejob-ab12", 1_700_000_000)
    for junk in ("tuning/finished/t/x.json", "tuning/finished/tunejob-1-5.json", "tuning/active/j.json",
                 "tuning/finished/t/a/tunejob-1-5.json"):
        assert keys.parse_finished_job(junk) is None, junk
    assert keys.job_checkpoint("t", "j", 5).startswith(keys.job_checkpoints_prefix("t", "j"))
    assert not keys.FINISHED_INDEX_READY.startswith(keys.FINISHED_JOBS_PREFIX)


# ---- through the manager (no HTTP) ---------------------------------------------------------------------
def make_manager(model, tokenizer, root, **kw):
    from softserve.tuning.export import model_info
    from softserve.tuning.jobs import TuningManager

    store_kw = {k: kw.pop(k) for k in ("max_prompts_per_tenant",) if k in kw}
    store = PromptStore(LocalBackend(root), model_info(model, "tiny"), revalidate_seconds=0, **store_kw)
    return TuningManager(model, tokenizer, store, model_name="tiny", **{"scan_seconds": 0.05, **kw})


def submit(manager, *, tenant: str = "acme", name: str = "kept", steps: int = 6, checkpoint_every: int = 2) -> str:
    from softserve.tuning.job import new_job_id
    from softserve.tuning.records import new_record

    cfg = TuningConfig(num_virtual_tokens=3, init="vocab", steps=steps, batch_size=4, micro_batch_size=2,
                       learning_rate=0.1, seed=9, max_length=200)
    record = new_record(job_id=new_job_id(), tenant=tenant, namespace=tenant, name=name, model="tiny", config=cfg,
                        checkpoint_every=checkpoint_every, auto=[], num_examples={"train": 8, "validation": 0},
                        training_file=None, validation_file=None, description=None, suffix=None, metadata=None)
    return manager.submit(record, {"train": "".join(json.dumps(r) + "\n" for r in records(8))}).id


def finished(manager, job_id: str, tenant: str = "acme") -> dict:
    return wait_for(lambda: (r := manager.get(tenant, job_id))["status"] in FINISHED and r, what=f"{job_id} to finish")


def settled(manager, job_id: str, tenant: str = "acme") -> dict:
    """Finished, and this replica is done with it (its clean-up ran: the job left tuning/active/, and
    the worker let go of its lease, which it does last)."""
    record = finished(manager, job_id, tenant)
    wait_for(lambda: (tenant, job_id) not in manager.jobs.active(), timeout=10, what=f"{job_id} to leave active")
    wait_for(lambda: manager.jobs.lease_holder(tenant, job_id) is None, timeout=10, what=f"{job_id}'s lease")
    return record


def test_failed_job_drops_resume_state_keeps_checkpoint_prompts(tiny_model, tokenizer, tmp_path):
    """A job that fails after writing checkpoints (its result would be a second prompt name, past a quota
    of one): the state is gone, the `-ckpt` versions it listed still resolve."""
    m = make_manager(tiny_model, tokenizer, tmp_path, max_prompts_per_tenant=1)
    backend = m.store.backend
    try:
        job_id = submit(m, name="fails")
        record = settled(m, job_id)
    finally:
        m.close()
    assert record["status"] == "failed" and record["error"]["code"] == "prompt_quota_exceeded", record["error"]
    assert [c["step"] for c in record["checkpoints"]] == [2, 4, 6]
    assert job_keys(backend, "acme", job_id, "checkpoints/") == []
    for ckpt in record["checkpoints"]:
        assert m.store.resolve("acme", ckpt["prompt"]["name"], ckpt["prompt"]["version"]).version == ckpt["prompt"]["version"]
    assert m.jobs.active() == []
    assert [(e.tenant, e.job_id) for e in m.jobs.finished()] == [("acme", job_id)]
    assert m.jobs.read("acme", job_id)["status"] == "failed"  # the record itself stays (until retention)


def test_cancelled_running_job_drops_resume_state(tiny_model, tokenizer, tmp_path):
    m = make_manager(tiny_model, tokenizer, tmp_path)
    try:
        job_id = submit(m, name="stopped", steps=100_000, checkpoint_every=2)
        wait_for(lambda: len(m.get("acme", job_id)["checkpoints"]) >= 2, what="two checkpoints")
        assert job_keys(m.store.backend, "acme", job_id, "checkpoints/")  # resume state while it runs
        m.cancel("acme", job_id, wait_s=60)
        record = settled(m, job_id)
        assert record["status"] == "cancelled"
        assert job_keys(m.store.backend, "acme", job_id, "checkpoints/") == []
        latest = record["checkpoints"][-1]["prompt"]
        assert m.store.resolve("acme", "stopped-ckpt", latest["version"]).version == latest["version"]
        assert m.events("acme", job_id)[-1]["message"].startswith("Job cancelled")
    finally:
        m.close()


def test_cleanup_cut_short_is_finished_by_a_scan(tiny_model, tokenizer, tmp_path):
    """The finished record is written, then deleting the state fails (a crash or a store error right
    there): the job still succeeded, stays in tuning/active/, and a later scan deletes the state."""
    m = make_manager(tiny_model, tokenizer, tmp_path, scan_seconds=3600)  # scans only when told
    real = m.jobs.delete_resume_state
    failures = []

    def broken(tenant, job_id):
        failures.append(job_id)
        raise OSError("store went away")

    m.jobs.delete_resume_state = broken
    try:
        job_id = submit(m, name="crashy")
        record = finished(m, job_id)
        wait_for(lambda: failures, timeout=10, what="the failed clean-up")
        wait_for(lambda: m.jobs.lease_holder("acme", job_id) is None and job_id not in m._claimed, timeout=10,
                 what="the worker to let go of the job")
        assert record["status"] == "succeeded" and m.jobs.read("acme", job_id)["status"] == "succeeded"
        assert job_keys(m.store.backend, "acme", job_id, "checkpoints/")  # left behind
        assert ("acme", job_id) in m.jobs.active()
        m.jobs.delete_resume_state = real
        m.scan()
    finally:
        m.close()
    assert job_keys(m.store.backend, "acme", job_id, "checkpoints/") == []
    assert m.jobs.active() == [] and [e.job_id for e in m.jobs.finished()] == [job_id]
    assert m.jobs.read("acme", job_id)["status"] == "succeeded"


def test_retention_removes_old_finished_jobs_only(tiny_model, tokenizer, tmp_path):
    """Retention 1500 s on an injected clock: a job of acme finished at t=1000 goes at t=2600, one of
    beta finished at t=3000 and an unfinished one stay; beta's goes by its own age at t=4600."""
    now = [1000.0]
    m = make_manager(tiny_model, tokenizer, tmp_path, retention_seconds=1500, clock=lambda: now[0])
    backend = m.store.backend
    # An unfinished job another (live) replica runs: no sweep may touch it.
    ghost = JobStore(backend, owner="ghost", lease_seconds=1e9)
    running = {"id": "tunejob-running0", "tenant": "acme", "status": "running", "finished_at": None,
               "created_at": 0, "event_chunks": [], "next_event_seq": 0, "checkpoints": []}
    ghost.create(running, {"train": "{}\n"})
    assert ghost.acquire("acme", "tunejob-running0") is not None
    try:
        old = submit(m, name="old")
        assert settled(m, old)["finished_at"] == 1000
        now[0] = 3000.0
        recent = submit(m, tenant="beta", name="recent")
        assert settled(m, recent, "beta")["finished_at"] == 3000
        beta_before = backend.list(keys.jobs_prefix("beta"))
        assert m.sweep(now=2400.0) == 0  # 1400 s after the first: not yet
        assert [r["id"] for r in m.list("acme")] == [old, "tunejob-running0"]

        now[0] = 2600.0
        assert m.sweep() == 1
        assert job_keys(backend, "acme", old) == [] and [r["id"] for r in m.list("acme")] == ["tunejob-running0"]
        with pytest.raises(KeyError):
            m.get("acme", old)
        assert m.store.resolve("acme", "old").name == "old"  # the published prompt stays
        assert m.store.resolve("acme", "old-ckpt").name == "old-ckpt"
        assert backend.list(keys.jobs_prefix("beta")) == beta_before and [r["id"] for r in m.list("beta")] == [recent]
        assert job_keys(backend, "acme", "tunejob-running0") and ("acme", "tunejob-running0") in m.jobs.active()

        now[0] = 4600.0
        assert m.sweep() == 1 and m.list("beta") == [] and backend.list(keys.jobs_prefix("beta")) == []
        assert backend.list(keys.FINISHED_JOBS_PREFIX) == []
        assert m.jobs.read("acme", "tunejob-running0")["status"] == "running"
    finally:
        m.close()


def test_retention_zero_keeps_finished_jobs(tiny_model, tokenizer, tmp_path):
    m = make_manager(tiny_model, tokenizer, tmp_path, retention_seconds=0)
    try:
        job_id = submit(m, name="forever")
        settled(m, job_id)
        assert m.sweep(now=time.time() + 10 * 365 * 86400) == 0
        assert [r["id"] for r in m.list("acme")] == [job_id]
        assert job_keys(m.store.backend, "acme", job_id, "checkpoints/") == []  # the state goes regardless
    finally:
        m.close()


def test_two_replicas_sweeping_at_once(tiny_model, tokenizer, tmp_path):
    now = [1000.0]
    a = make_manager(tiny_model, tokenizer, tmp_path, retention_seconds=60, clock=lambda: now[0])
    b = make_manager(tiny_model, tokenizer, tmp_path, retention_seconds=60, clock=lambda: now[0])
    try:
        ids = []
        for i in range(3):
            ids.append(submit(a, name=f"job{i}", steps=2, checkpoint_every=1))
            settled(a, ids[-1])
        for trial in range(3):
            barrier = threading.Barrier(2)
            errors, removed = [], []

            def sweep(m):
                barrier.wait()
                try:
                    removed.append(m.sweep(now=5000.0))
                except Exception as exc:  # pragma: no cover - the failure being tested
                    errors.append(exc)

            threads = [threading.Thread(target=sweep, args=(m,)) for m in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert errors == [], errors
            if trial == 0:
                assert sum(removed) >= len(ids)
        assert a.list("acme") == [] and b.list("acme") == []
        assert a.store.backend.list(keys.jobs_prefix("acme")) == [] and a.store.backend.list(keys.FINISHED_JOBS_PREFIX) == []
        assert a.store.resolve("acme", "job0").name == "job0"
    finally:
        a.close()
        b.close()


def test_jobs_finished_before_the_index_are_indexed_once(tiny_model, tokenizer, tmp_path):
    """A store written by a version without the finished index: a finished job with its state and no
    tuning/finished/ entry gets one (its state deleted) on the first sweep, so retention reaches it."""
    m = make_manager(tiny_model, tokenizer, tmp_path, retention_seconds=100, clock=lambda: 1000.0)
    backend = m.store.backend
    try:
        job_id = submit(m, name="legacy")
        settled(m, job_id)
        # Put it back as the old code left it: state present, no index entry, no "index ready" marker.
        backend.put(keys.job_checkpoint("acme", job_id, 2), b"old state")
        for key in backend.list(keys.FINISHED_JOBS_PREFIX):
            backend.delete(key)
        backend.delete(keys.FINISHED_INDEX_READY)
        m._index_ready = False
        assert m.sweep(now=1050.0) == 0
        assert job_keys(backend, "acme", job_id, "checkpoints/") == [] and backend.exists(keys.FINISHED_INDEX_READY)
        assert m.sweep(now=1200.0) == 1 and m.list("acme") == []
    finally:
        m.close()


# ---- through the API ---------------------------------------------------------------------------------
@pytest.fixture
def api(tiny_model, tokenizer, tmp_path):
    from softserve.app import create_app
    from softserve.config import Settings
    from softserve.service.auth import add_key
    from softserve.service.runtime import LoadedModel

    keyfile = tmp_path / "keys.yaml"
    tokens = {"a": add_key(keyfile, "acme"), "b": add_key(keyfile, "beta")}
    app = create_app(Settings(store=str(tmp_path / "store"), api_keys=str(keyfile), max_model_len=256,
                              tuning_job_retention_seconds=3600),
                     loaded=LoadedModel(tiny_model, tokenizer, "tiny-llama"))
    with TestClient(app) as client:
        client.h = {w: {"Authorization": f"Bearer {k}"} for w, k in tokens.items()}
        client.manager = lambda: app.state.service.tuning.get_manager()
        yield client


def test_api_after_success_and_after_retention(api):
    a = api.h["a"]
    body = {"name": "served", "training_data": records(8), "validation_data": records(3), "init": "vocab",
            "steps": 6, "batch_size": 4, "learning_rate": 0.2, "eval_every": 3, "checkpoint_every": 2, "seed": 2}
    job = api.post("/v1/tuning/jobs", headers=a, json=body).json()
    manager = api.manager()
    done = settled(manager, job["id"])
    assert done["status"] == "succeeded", done["error"]
    backend = manager.store.backend
    assert job_keys(backend, "acme", job["id"], "checkpoints/") == []

    view = api.get(f"/v1/tuning/jobs/{job['id']}", headers=a).json()
    assert view["status"] == "succeeded" and view["fine_tuned_model"].startswith("served@")
    events = api.get(f"/v1/tuning/jobs/{job['id']}/events", params={"limit": 100}, headers=a).json()["data"]
    assert events[0]["message"].startswith("Job succeeded")
    page = api.get(f"/v1/tuning/jobs/{job['id']}/checkpoints", headers=a).json()
    assert [c["step_number"] for c in page["data"]][:3] == [6, 4, 3]
    for model in [view["fine_tuned_model"]] + [c["fine_tuned_model_checkpoint"] for c in page["data"]]:
        r = api.post("/v1/completions", headers=a, json={"model": model, "prompt": "Word: a\nLabel:", "max_tokens": 1})
        assert r.status_code == 200, r.text

    assert manager.sweep(now=time.time() + 3500) == 0
    assert manager.sweep(now=time.time() + 3700) == 1
    assert api.get("/v1/tuning/jobs", headers=a).json()["data"] == []
    assert api.get(f"/v1/tuning/jobs/{job['id']}", headers=a).status_code == 404
    assert api.get(f"/v1/tuning/jobs/{job['id']}/checkpoints", headers=a).status_code == 404
    r = api.post("/v1/completions", headers=a, json={"model": view["fine_tuned_model"], "prompt": "x", "max_tokens": 1})
    assert r.status_code == 200, r.text
