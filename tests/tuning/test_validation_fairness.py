"""Tuning job validation and bookkeeping under abuse (issue #26 F6, F3's second half, "also" items):

- validation is fair between tenants: one tenant's huge file does not hold another tenant's 1-example
  job (it used to wait behind it on one shared thread);
- a cancel stops tokenizing at once (it used to tokenize the whole file after the API said "cancelled");
- example counts are capped (--max-tuning-examples, 400);
- a job is never `cancelled` with an `invalid_training_data` error;
- finished jobs per tenant are capped (--max-finished-tuning-jobs-per-tenant), oldest first.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from tests.support.tuning import local_manager, toy_records
from softserve.tuning.data import DatasetError
from softserve.tuning.validation import FairQueue

FINISHED = ("succeeded", "failed", "cancelled")


def wait_for(check, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class SlowTokenizer:
    """The real tokenizer, but texts containing "SLOW" take `delay` s each (a huge file, in a test's time)."""

    def __init__(self, tokenizer, delay: float = 0.02) -> None:
        self._tok = tokenizer
        self.delay = delay
        self.slow_calls = 0

    def __call__(self, text, **kw):
        if "SLOW" in text:
            self.slow_calls += 1
            time.sleep(self.delay)
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def submit(manager, lines: list[dict], tenant: str = "acme", steps: int = 1, name: str = "t") -> str:
    from softserve.tuning.job import new_job_id
    from softserve.tuning.records import new_record
    from softserve.tuning.trainer import TuningConfig

    cfg = TuningConfig(num_virtual_tokens=2, init="vocab", steps=steps, batch_size=2, micro_batch_size=2,
                       learning_rate=0.1, seed=1, max_length=200)
    record = new_record(job_id=new_job_id(), tenant=tenant, namespace=tenant, name=name, model="tiny", config=cfg,
                        checkpoint_every=10, auto=[], num_examples={"train": len(lines), "validation": 0},
                        training_file=None, validation_file=None, description=None, suffix=None, metadata=None)
    return manager.submit(record, {"train": "".join(json.dumps(r) + "\n" for r in lines)}).id


def released(manager, job_id: str) -> bool:
    return job_id not in manager._claimed and manager.jobs.lease_holder(*_owner(manager, job_id)) is None


def _owner(manager, job_id):
    for tenant in ("acme", "beta"):
        try:
            manager.jobs.read(tenant, job_id)
            return tenant, job_id
        except KeyError:
            continue
    raise KeyError(job_id)


# ---- the queue ------------------------------------------------------------------------------------
def test_fair_queue_takes_tenants_in_turn_and_one_item_per_tenant_at_a_time():
    q = FairQueue()
    for i in range(3):
        q.put("acme", f"a{i}")
    q.put("beta", "b0")
    q.put("gamma", "g0")
    assert q.get() == ("acme", "a0")
    # acme is busy: the others go first, and acme's next item waits until a0 is done.
    assert q.get() == ("beta", "b0")
    assert q.get() == ("gamma", "g0")
    assert q.get(timeout=0.05) is None  # only acme has items left, and it is busy
    for tenant in ("acme", "beta", "gamma"):
        q.done(tenant)
    q.put("beta", "b1")
    assert q.get() == ("acme", "a1")  # acme's turn came before beta's new item
    assert q.get() == ("beta", "b1")
    assert q.get(timeout=0.05) is None
    q.done("acme")
    assert q.get() == ("acme", "a2")
    q.close()
    assert q.get() is None


# ---- F6: fairness and cancel during tokenization ------------------------------------------------------
def test_a_huge_file_does_not_hold_another_tenant_and_cancel_stops_tokenizing(tiny_model, tokenizer, tmp_path):
    slow = SlowTokenizer(tokenizer)
    m = local_manager(tiny_model, slow, tmp_path)
    try:
        # 3,000 slow examples: a minute of tokenizing (the 10^6-line file of the issue, scaled down).
        big = submit(m, [{"prompt": f"SLOW {i}", "completion": " x"} for i in range(3000)], name="big")
        wait_for(lambda: slow.slow_calls >= 20, what="the big file to be tokenizing")
        small = submit(m, toy_records(4), tenant="beta", name="small")
        wait_for(lambda: m.get("beta", small)["status"] in ("queued", "running", "succeeded"), timeout=40,
                 what="the other tenant's 1-example job to be validated (it waited behind the big file)")
        assert m.get("acme", big)["status"] == "validating_files"  # it went first, not after the big one

        at_cancel = slow.slow_calls
        m.cancel("acme", big, wait_s=0)
        wait_for(lambda: released(m, big), timeout=40, what="the validator to let go of the cancelled job")
        after = slow.slow_calls
        assert after - at_cancel <= 2, f"tokenized {after - at_cancel} more examples after the cancel"
        time.sleep(0.3)
        assert slow.slow_calls == after  # nothing tokenizes it any more
        record = m.jobs.read("acme", big)
        assert record["status"] == "cancelled" and record["error"] is None, record
        assert m.events("acme", big)[-1]["message"] == "Job cancelled while its data was being validated"
        assert m.jobs.active() == [("beta", small)] or m.get("beta", small)["status"] in FINISHED
    finally:
        m.close()


# ---- "also": cancelled never comes with invalid_training_data ------------------------------------------
def test_a_cancel_during_validation_that_then_fails_ends_cancelled_without_the_error(tiny_model, tokenizer, tmp_path):
    m = local_manager(tiny_model, tokenizer, tmp_path)
    started, go = threading.Event(), threading.Event()

    def examples(job, which, should_stop=None):  # bad data found only after the cancel landed
        started.set()
        go.wait(20)
        raise DatasetError("bad example", line=1, source="training_data")

    m.examples = examples
    try:
        job_id = submit(m, toy_records(4))
        assert started.wait(20)
        assert m.cancel("acme", job_id, wait_s=0)["status"] == "cancelled"
        go.set()
        wait_for(lambda: released(m, job_id), what="the validator to finish with the job")
        for record in (m.jobs.read("acme", job_id), m.get("acme", job_id)):
            assert record["status"] == "cancelled", record
            assert record["error"] is None, record  # was {"code": "invalid_training_data", ...}
    finally:
        m.close()


# ---- F3: finished jobs per tenant ---------------------------------------------------------------------
def test_only_the_newest_finished_jobs_of_a_tenant_are_kept(tiny_model, tokenizer, tmp_path):
    now = [1000.0]
    m = local_manager(tiny_model, tokenizer, tmp_path, max_finished_per_tenant=2, clock=lambda: now[0])
    try:
        ids = []
        for i in range(4):
            now[0] += 10
            ids.append(submit(m, toy_records(4), name=f"j{i}"))
            wait_for(lambda: m.jobs.read("acme", ids[-1])["status"] in FINISHED and released(m, ids[-1]),
                     what="the job to finish")
        other = submit(m, toy_records(4), tenant="beta", name="b")
        wait_for(lambda: m.jobs.read("beta", other)["status"] in FINISHED and released(m, other), what="beta's job")
        wait_for(lambda: sorted(r["id"] for r in m.list("acme")) == sorted(ids[2:]), timeout=20,
                 what=f"acme's two newest jobs only, got {[r['id'] for r in m.list('acme')]}")
        for old in ids[:2]:
            with pytest.raises(KeyError):
                m.get("acme", old)
        assert [r["id"] for r in m.list("beta")] == [other]  # another tenant's count is its own
        assert m.store.resolve("acme", "j0").name == "j0"  # the prompts stay
        assert sorted(e.job_id for e in m.jobs.finished("acme")) == sorted(ids[2:])
        assert m.store.usage.get("acme").file_bytes == sum(m.jobs.read("acme", j)["data_bytes"] for j in ids[2:])
    finally:
        m.close()


# ---- F6: example counts -------------------------------------------------------------------------------
@pytest.fixture
def api(tiny_model, tokenizer, tmp_path):
    from softserve.app import create_app
    from softserve.config import Settings
    from softserve.service.auth import add_key
    from softserve.service.runtime import LoadedModel

    keyfile = tmp_path / "keys.yaml"
    key = add_key(keyfile, "acme")
    app = create_app(Settings(store=str(tmp_path / "store"), api_keys=str(keyfile), max_model_len=256,
                              max_tuning_examples=5), loaded=LoadedModel(tiny_model, tokenizer, "tiny-llama"))
    with TestClient(app) as client:
        client.h = {"Authorization": f"Bearer {key}"}
        yield client


def test_example_counts_are_capped(api):
    lines = toy_records(6)
    data = "".join(json.dumps(r) + "\n" for r in lines).encode()
    r = api.post("/v1/files", headers=api.h, files={"file": ("d.jsonl", data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_training_data" and "line 6" in err["message"] and "--max-tuning-examples" in err["message"]
    r = api.post("/v1/tuning/jobs", headers=api.h, json={"name": "t", "training_data": lines})
    assert r.status_code == 400 and "--max-tuning-examples" in r.json()["error"]["message"], r.text
    r = api.post("/v1/tuning/jobs", headers=api.h, json={"name": "t", "training_data": toy_records(4),
                                                        "validation_data": lines})
    assert r.status_code == 400 and r.json()["error"]["param"] == "validation_data", r.text
    five = "".join(json.dumps(r) + "\n" for r in lines[:5]).encode()
    r = api.post("/v1/files", headers=api.h, files={"file": ("d.jsonl", five)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200 and r.json()["num_examples"] == 5, r.text
    r = api.post("/v1/tuning/jobs", headers=api.h, json={"name": "t", "training_file": r.json()["id"], "steps": 1})
    assert r.status_code == 200, r.text
