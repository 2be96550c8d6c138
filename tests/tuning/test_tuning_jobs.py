"""Tuning jobs that persist: trainer state round trips, lease/CAS in the store, events and
checkpoints endpoints, auto hyperparameters, early stopping, and a manager restart that resumes.
(The kill -9 of a live server is in test_tuning_restart.py.)"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from tests.support.tuning import local_manager, submit_toy_job, toy_data, toy_records, wait_for_job

from softserve.store.backends import LocalBackend, MemoryBackend
from softserve.tuning.persist import JobStore
from softserve.tuning.runner import JobHost
from softserve.tuning.trainer import PromptTuner, TuningConfig


# ---- trainer state ------------------------------------------------------------------------------------
def _capture_at(step: int, box: dict):
    def on_progress(info):
        if info.step == step:
            box["state"] = box["tuner"].state()
            box["prompt"] = box["tuner"].prompt.detach().clone()
    return on_progress


def test_resume_from_saved_state_is_bit_identical(tiny_model, tokenizer):
    """Stop after step 3 (mid-epoch: 10 examples, batch 4), save through safetensors, resume in a new
    tuner: same per-step losses and the same final prompt, bit for bit."""
    data, evals = toy_data(tokenizer, 10), toy_data(tokenizer, 3)
    cfg = TuningConfig(num_virtual_tokens=3, init="vocab", steps=7, batch_size=4, micro_batch_size=2,
                       learning_rate=0.1, seed=5, eval_every=2)
    full = PromptTuner(tiny_model, tokenizer, data, evals, cfg).run()

    box: dict = {}
    box["tuner"] = first = PromptTuner(tiny_model, tokenizer, data, evals, cfg, on_progress=_capture_at(3, box))
    first.run()
    jobs = JobStore(MemoryBackend(), owner="t")
    key = jobs.write_checkpoint("acme", "tunejob-x", 3, *box["state"])
    tensors, meta = jobs.read_checkpoint(key)
    assert meta["step"] == 3 and meta["best_step"] == 2

    resumed = PromptTuner(tiny_model, tokenizer, data, evals, cfg)
    resumed.load_state(tensors, meta)
    out = resumed.run()
    assert [h.step for h in out.history] == [4, 5, 6, 7]
    assert [h.loss for h in out.history] == [h.loss for h in full.history[3:]]
    assert torch.equal(out.embeddings, full.embeddings)
    assert out.trained_tokens == full.trained_tokens and out.best_step == full.best_step

    # Without the optimizer moments the run differs: the state really carries them.
    del tensors["adam.exp_avg"], tensors["adam.exp_avg_sq"], tensors["adam.step"]
    fresh_opt = PromptTuner(tiny_model, tokenizer, data, evals, cfg)
    fresh_opt.load_state(tensors, meta)
    assert not torch.equal(fresh_opt.run().embeddings, full.embeddings)


def test_early_stopping_selects_the_best_prompt(tiny_model, tokenizer):
    data, evals = toy_data(tokenizer, 8), toy_data(tokenizer, 3)
    # min_delta this large: no eval after the first improves, so patience 2 stops at the 3rd eval.
    cfg = TuningConfig(num_virtual_tokens=3, init="vocab", steps=20, batch_size=4, learning_rate=0.1, seed=1,
                       eval_every=2, early_stopping_patience=2, early_stopping_min_delta=1e9, result_prompt="best")
    box: dict = {}
    box["tuner"] = tuner = PromptTuner(tiny_model, tokenizer, data, evals, cfg, on_progress=_capture_at(2, box))
    out = tuner.run()
    assert out.stopped_early and out.steps_done == 6 and out.best_step == 2
    assert [h.is_best for h in out.history if h.eval_loss is not None] == [True, False, False]
    assert out.history[-1].stopping
    assert torch.equal(out.embeddings, box["prompt"].float())
    last = PromptTuner(tiny_model, tokenizer, data, evals, TuningConfig(**{**cfg.__dict__, "result_prompt": "last"})).run()
    assert last.stopped_early and not torch.equal(last.embeddings, out.embeddings)


# ---- lease and compare-and-swap --------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "local"])
def test_lease_is_exclusive_and_expires(kind, tmp_path):
    backend = MemoryBackend() if kind == "memory" else LocalBackend(tmp_path)
    now = [1000.0]
    a = JobStore(backend, owner="a", lease_seconds=10, clock=lambda: now[0])
    b = JobStore(backend, owner="b", lease_seconds=10, clock=lambda: now[0])
    lease = a.acquire("t", "tunejob-1")
    assert lease is not None and b.acquire("t", "tunejob-1") is None and b.lease_holder("t", "tunejob-1") == "a"
    now[0] += 8
    assert a.renew(lease) and b.acquire("t", "tunejob-1") is None
    now[0] += 11  # a stopped renewing (died): its lease expires
    assert b.lease_holder("t", "tunejob-1") is None
    taken = b.acquire("t", "tunejob-1")
    assert taken is not None and not a.renew(lease)  # a learns it lost the job
    a.release(lease)  # a stale release must not drop b's lease
    assert b.lease_holder("t", "tunejob-1") == "b"
    b.release(taken)
    assert a.acquire("t", "tunejob-1") is not None


def test_expired_lease_race_has_one_winner(tmp_path):
    backend = LocalBackend(tmp_path)
    for trial in range(10):
        stores = [JobStore(backend, owner=f"r{i}", lease_seconds=30) for i in range(4)]
        barrier = threading.Barrier(len(stores))
        won = []

        def take(js):
            barrier.wait()
            if js.acquire("t", f"tunejob-{trial}") is not None:
                won.append(js.owner)

        threads = [threading.Thread(target=take, args=(js,)) for js in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1, won


def test_record_update_is_compare_and_swap():
    jobs = JobStore(MemoryBackend(), owner="a")
    jobs.create({"id": "tunejob-1", "tenant": "t", "n": 0}, {"train": "{}\n"})
    threads = [threading.Thread(target=lambda: [jobs.update("t", "tunejob-1", lambda r: {**r, "n": r["n"] + 1})
                                                for _ in range(25)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert jobs.read("t", "tunejob-1")["n"] == 100
    assert jobs.active() == [("t", "tunejob-1")] and jobs.read_data("t", "tunejob-1", "train") == "{}\n"


# ---- API: events, checkpoints, auto, validation -------------------------------------------------------
def _all_events(client, job_id, headers, order="asc", limit=5):
    out, after = [], None
    while True:
        params = {"limit": limit, "order": order} | ({"after": after} if after else {})
        page = client.get(f"/v1/tuning/jobs/{job_id}/events", params=params, headers=headers).json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = page["data"][-1]["id"]


def test_api_events_and_checkpoints(api):
    a = api.h["a"]
    body = {"name": "ev", "suffix": "v1", "metadata": {"team": "nlp"}, "training_data": toy_records(8),
            "validation_data": toy_records(3), "init": "vocab", "steps": 6, "batch_size": 4, "learning_rate": 0.2,
            "eval_every": 3, "checkpoint_every": 2, "seed": 2}
    job = api.post("/v1/tuning/jobs", headers=a, json=body).json()
    assert job["name"] == "ev-v1" and job["metadata"] == {"team": "nlp"} and job["suffix"] == "v1"
    done = wait_for_job(api, job["id"], a, ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    assert done["trained_tokens"] > 0 and done["estimated_finish"] is None and done["error"] is None

    events = _all_events(api, done["id"], a)
    assert [e["id"] for e in events] == sorted(e["id"] for e in events) and len({e["id"] for e in events}) == len(events)
    metrics = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert metrics == [1, 2, 3, 4, 5, 6]
    assert [e["data"]["step"] for e in events if e["type"] == "metrics" and "eval_loss" in e["data"]] == [3, 6]
    messages = [e["message"] for e in events if e["type"] == "message"]
    assert messages[0].startswith("Created") and messages[1].startswith("Validated") and messages[2].startswith("Started")
    assert messages[-1].startswith("Job succeeded")
    assert all(e["object"] == "tuning.job.event" and e["level"] == "info" for e in events)
    newest_first = _all_events(api, done["id"], a, order="desc", limit=4)
    assert newest_first == events[::-1]

    page = api.get(f"/v1/tuning/jobs/{done['id']}/checkpoints", headers=a).json()
    steps = [c["step_number"] for c in page["data"]]
    assert steps == sorted(steps, reverse=True) and {2, 4, 6} <= set(steps) and 3 in steps  # every 2 + first eval (best)
    assert page["first_id"] == page["data"][0]["id"]
    for ckpt in page["data"]:
        ref = ckpt["fine_tuned_model_checkpoint"]
        assert ref.startswith("ev-v1-ckpt@")
        r = api.post("/v1/completions", headers=a, json={"model": ref, "prompt": "Word: a\nLabel:", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["usage"]["virtual_tokens"] == 8, r.text
    assert sum(c["is_best"] for c in page["data"]) == 1
    last = page["data"][0]
    assert last["metrics"]["eval_loss"] == done["metrics"]["eval_loss"]
    # The step-6 checkpoint holds the final prompt: the same version as the result (content-addressed).
    assert last["prompt"]["version"] == done["result_prompt"]["version"]
    assert api.get(f"/v1/tuning/jobs/{done['id']}/events", headers=api.h["b"]).status_code == 404
    assert api.get(f"/v1/tuning/jobs/{done['id']}/events", params={"after": "nope"}, headers=a).status_code == 400


def test_api_auto_hyperparameters_and_async_validation(api):
    a = api.h["a"]
    job = api.post("/v1/tuning/jobs", headers=a, json={"name": "auto", "training_data": toy_records(6), "init": "vocab",
                                                         "steps": "auto", "batch_size": "auto", "learning_rate": "auto"}).json()
    assert job["hyperparameters"]["batch_size"] == 6 and job["hyperparameters"]["steps"] == 50
    assert job["hyperparameters"]["learning_rate"] == 0.03 and job["hyperparameters"]["checkpoint_every"] == 5
    assert sorted(job["auto_hyperparameters"]) == ["batch_size", "checkpoint_every", "learning_rate", "steps"]
    api.post(f"/v1/tuning/jobs/{job['id']}/cancel", headers=a)
    assert api.post("/v1/tuning/jobs", headers=a, json={"name": "x", "training_data": toy_records(2),
                                                        "steps": "many"}).status_code == 400
    # Too long for max_model_len 256: the record shape is fine, tokenization (validating_files) fails.
    long = [{"prompt": "word " * 400, "completion": " ok"}]
    job = api.post("/v1/tuning/jobs", headers=a, json={"name": "long", "training_data": toy_records(2),
                                                         "validation_data": long, "init": "vocab", "steps": 2}).json()
    failed = wait_for_job(api, job["id"], a, ("failed", "succeeded"))
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_training_data"
    assert failed["error"]["param"] == "validation_data" and "line 1" in failed["error"]["message"]
    assert api.post("/v1/tuning/jobs", headers=a, json={"name": "x", "training_data": toy_records(2), "eval_every": 0,
                                                        "early_stopping_patience": 2}).status_code == 400


# ---- restart: a new manager on the same store resumes ---------------------------------------------
def _wait_record(manager, job_id, check, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = manager.get("acme", job_id)
        if check(rec):
            return rec
        time.sleep(0.01)
    raise AssertionError(f"timed out; last record status {rec['status']} step {rec['step']}")


def test_manager_restart_resumes_to_the_same_prompt(tiny_model, tokenizer, tmp_path):
    steps = 120
    ref = local_manager(tiny_model, tokenizer, tmp_path / "ref")
    assert isinstance(ref, JobHost)  # the runner's whole view of the manager that owns its job
    try:
        ref_id = submit_toy_job(ref, steps)
        reference = _wait_record(ref, ref_id, lambda r: r["status"] in ("succeeded", "failed"))
    finally:
        ref.close()
    assert reference["status"] == "succeeded"

    first = local_manager(tiny_model, tokenizer, tmp_path / "store")
    try:
        job_id = submit_toy_job(first, steps)
        _wait_record(first, job_id, lambda r: len(r["checkpoints"]) >= 2)
    finally:
        first.close()  # interrupts the run: the job stays "running" in the store
    stored = first.jobs.read("acme", job_id)
    assert stored["status"] == "running" and stored["checkpoints"], stored["status"]
    stopped_at = stored["checkpoints"][-1]["step"]
    assert stopped_at < steps

    second = local_manager(tiny_model, tokenizer, tmp_path / "store")
    try:
        done = _wait_record(second, job_id, lambda r: r["status"] in ("succeeded", "failed"))
        events = second.events("acme", job_id)
    finally:
        second.close()
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["sha256"] == reference["result"]["sha256"]  # bit-identical prompt
    assert done["runs"] == 2 and [p["step"] for p in done["loss_curve"]] == list(range(1, steps + 1))
    assert [p["loss"] for p in done["loss_curve"]] == [p["loss"] for p in reference["loss_curve"]]
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == list(range(1, steps + 1))
    assert any(e["message"].startswith(f"Resumed from the checkpoint at step {stopped_at}") for e in events)
    assert second.jobs.active() == []


# ---- CLI: softserve tune --resume ---------------------------------------------------------------------
def test_cli_tune_resume_equals_uninterrupted(tokenizer, tmp_path, tmp_path_factory, capsys):
    from tests.support.live_server import tiny_model_dir
    from safetensors.torch import load_file

    from softserve.cli import main

    model_dir = tiny_model_dir(tmp_path_factory, tokenizer)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in toy_records(6)))
    base = ["tune", "--data", str(train), "--name", "cli", "--model", str(model_dir), "--num-virtual-tokens", "3",
            "--init", "vocab", "--steps", "6", "--batch-size", "4", "--lr", "0.1", "--checkpoint-every", "2"]
    assert main(base + ["--out", str(tmp_path / "full")]) == 0
    ckpts = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000002.safetensors", "step-00000004.safetensors"]
    capsys.readouterr()
    # As if the run died after step 4: resume from that checkpoint into another directory.
    assert main(base + ["--out", str(tmp_path / "resumed"), "--checkpoint-dir", str(ckpts), "--resume"]) == 0
    out = capsys.readouterr()
    assert "resuming from the checkpoint at step 4" in out.err and "step 5/6" in out.out and "step 1/6" not in out.out
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")["prompt_embeddings"]
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(full, resumed)
    with pytest.raises(SystemExit, match="settings differ from the checkpoint's: learning_rate"):
        main([a if a != "0.1" else "0.2" for a in base] + ["--out", str(tmp_path / "x"), "--checkpoint-dir", str(ckpts), "--resume"])
    with pytest.raises(SystemExit, match="no checkpoint"):
        main(base + ["--out", str(tmp_path / "y"), "--resume"])


def test_a_reader_that_sees_the_final_status_also_sees_the_final_event(api):
    """Between applying a job's final status and persisting its record, the announcing event must
    stay readable: a poller that saw `succeeded` once read the events without "Job succeeded"."""
    a = api.h["a"]
    manager = api.app.state.service.tuning.get_manager()
    seen: list[tuple[str, str]] = []
    real_update = manager.jobs.update

    def update_and_look(tenant, job_id, merge):
        # Exactly the window: the local record has the new status, the store does not list the chunk yet.
        record = manager.get(tenant, job_id)
        messages = [e["message"] for e in manager.events(tenant, job_id) if e["type"] == "message"]
        seen.append((record["status"], messages[-1] if messages else ""))
        return real_update(tenant, job_id, merge)

    manager.jobs.update = update_and_look
    body = {"name": "win", "training_data": toy_records(4), "init": "vocab", "steps": 2, "batch_size": 2, "seed": 1}
    job = api.post("/v1/tuning/jobs", headers=a, json=body).json()
    done = wait_for_job(api, job["id"], a, ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded", done["error"]
    # The poller can see `succeeded` (the local record) before the tuning thread's final store update
    # has run: wait for that update, which must come, before judging what it saw.
    deadline = time.monotonic() + 30
    while not any(status == "succeeded" for status, _ in seen) and time.monotonic() < deadline:
        time.sleep(0.02)
    finals = [message for status, message in seen if status == "succeeded"]
    assert finals and all(m.startswith("Job succeeded") for m in finals), seen


def test_a_reader_during_the_final_flush_gets_every_event(tiny_model, tokenizer, tmp_path):
    """events() read the record, then the stored chunks, then the pending events: a final flush that
    landed in between (its chunk not in the record read, its events no longer pending, the job
    forgotten) dropped "Job succeeded" from the answer (seen as a flaky test_tuning_pack run). Here a
    reader starts in the final flush's window and the flush completes while it reads the store."""
    manager = local_manager(tiny_model, tokenizer, tmp_path / "store")
    real_update, real_read, real_finalize = manager.jobs.update, manager.jobs.read_events, manager._finalize
    reading, finalized = threading.Event(), threading.Event()
    answers: list[list[dict]] = []
    readers: list[threading.Thread] = []

    def read_events(tenant, job_id, chunks, next_seq):
        stored = real_read(tenant, job_id, chunks, next_seq)
        if threading.current_thread().name == "final-flush-reader":
            reading.set()
            finalized.wait(30)  # the flush and the job's removal from this replica land now
        return stored

    def update(tenant, job_id, merge):
        if manager.get(tenant, job_id)["status"] == "succeeded" and not readers:
            reader = threading.Thread(target=lambda: answers.append(manager.events(tenant, job_id)), name="final-flush-reader")
            reader.start()
            readers.append(reader)
            assert reading.wait(30)
        return real_update(tenant, job_id, merge)

    def finalize(tenant, job_id, finished_at):
        done = real_finalize(tenant, job_id, finished_at)
        finalized.set()
        return done

    manager.jobs.update, manager.jobs.read_events, manager._finalize = update, read_events, finalize
    try:
        job_id = submit_toy_job(manager, 2)
        _wait_record(manager, job_id, lambda r: r["status"] in ("succeeded", "failed", "cancelled"))
        assert finalized.wait(30) and readers, "the final flush never ran"  # the local record says succeeded first
        readers[0].join(30)
        final = manager.events("acme", job_id)
    finally:
        manager.close()
    assert final[-1]["message"].startswith("Job succeeded"), final[-1]
    assert [e["seq"] for e in answers[0]] == [e["seq"] for e in final]


def test_restarted_replica_takes_its_own_job_back_at_once(tiny_model, tokenizer, tmp_path):
    """A replica killed mid-job leaves a live lease in its own name; restarted with the same replica
    id it must resume the job at once, not after the (here 10 min) lease expires."""
    first = local_manager(tiny_model, tokenizer, tmp_path / "store", replica_id="pod-0", lease_seconds=600)
    try:
        job_id = submit_toy_job(first, 40)
        _wait_record(first, job_id, lambda r: r["status"] == "running" and r["step"] >= 1)
    finally:
        first.close()  # releases the lease; a kill -9 would not: take it again, as the dead run held it
    assert JobStore(first.store.backend, owner="pod-0", lease_seconds=600).acquire("acme", job_id) is not None
    assert first.jobs.lease_holder("acme", job_id) == "pod-0"

    other = local_manager(tiny_model, tokenizer, tmp_path / "store", replica_id="pod-1", lease_seconds=600)
    try:
        other.scan()  # another replica still respects the live lease
        time.sleep(0.3)
        assert other.jobs.read("acme", job_id)["runs"] == 1
    finally:
        other.close()

    second = local_manager(tiny_model, tokenizer, tmp_path / "store", replica_id="pod-0", lease_seconds=600)
    try:
        done = _wait_record(second, job_id, lambda r: r["status"] in ("succeeded", "failed"), timeout=60)
    finally:
        second.close()
    assert done["status"] == "succeeded", done["error"]
    assert done["runs"] == 2 and done["replica"] == "pod-0"
