"""Packed multi-job training (softserve/tuning/pack.py): jobs that train at once share each
forward/backward, and each still trains exactly as it would alone.

"Exactly": losses and prompts of a packed job agree with its solo run to TOL (relative, or absolute
near 0): fp32 rounding of the pack's larger matrix products, not bit for bit (docs/tuning.md says
why); and each job's gradient reaches only its own P.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from tests.support.tuning import toy_data

from softserve.tuning.pack import PackEntry, TrainingPack, packed_loss_sums
from softserve.tuning.trainer import PromptTuner, TuningConfig

# fp32 rounding of the pack's other shapes, compounded over 6-12 AdamW steps: up to 1.3e-6 on an Intel
# AMX machine, 7.2e-6 on an AMD Zen 5 one (docs/tuning.md). A wrong mask or a gradient reaching another
# job's prompt shows at the first step, by orders of magnitude more.
TOL = 5e-5

# Three jobs of three tenants: different k, lr, schedule, batch/micro-batch, seeds and data.
CONFIGS = [
    TuningConfig(num_virtual_tokens=3, init="vocab", steps=8, batch_size=4, micro_batch_size=2, learning_rate=0.1,
                 seed=1),
    TuningConfig(num_virtual_tokens=5, init="random", steps=6, batch_size=3, learning_rate=0.03, seed=2,
                 lr_schedule="constant", warmup_steps=2),
    TuningConfig(num_virtual_tokens=2, init="vocab", steps=10, batch_size=2, learning_rate=0.3, seed=3,
                 max_grad_norm=None, weight_decay=0.01),
]


def _datasets(tokenizer):
    return [toy_data(tokenizer, 10), toy_data(tokenizer, 7, answer=lambda i: " maybe" if i % 3 else " never"),
            toy_data(tokenizer, 5, answer=lambda i: f" {i} and {i + 1}")]


def _pack(model, tokenizer) -> TrainingPack:
    return TrainingPack.for_model(model, tokenizer, step_lock=threading.Lock())


def _solo(model, tokenizer, data, cfg):
    return PromptTuner(model, tokenizer, data, None, cfg).run()


def _packed(model, tokenizer, jobs, pack, start_after=None):
    """Run PromptTuners in threads on one pack. `start_after[i] = (j, step)`: job i starts when job j
    has finished `step` steps (joins a running pack)."""
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    progress = {i: threading.Event() for i in range(len(jobs))}
    start_after = start_after or {}
    gates = {i: threading.Event() for i in range(len(jobs))}

    def report(i):
        def on_progress(info):
            for later, (j, step) in start_after.items():
                if j == i and info.step == step:
                    gates[later].set()
        return on_progress

    def run(i, data, cfg):
        try:
            if i in start_after:
                assert gates[i].wait(120), "the job to wait for never got there"
            results[i] = PromptTuner(model, tokenizer, data, None, cfg, pack=pack, on_progress=report(i)).run()
        except BaseException as exc:  # surfaced in the test thread
            errors.append(exc)
            for gate in gates.values():
                gate.set()
        finally:
            progress[i].set()

    threads = [threading.Thread(target=run, args=(i, data, cfg)) for i, (data, cfg) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return [results[i] for i in range(len(jobs))]


def _assert_same_run(packed, solo):
    assert [h.step for h in packed.history] == [h.step for h in solo.history]
    losses = torch.tensor([h.loss for h in packed.history], dtype=torch.float64)
    ref = torch.tensor([h.loss for h in solo.history], dtype=torch.float64)
    assert torch.allclose(losses, ref, rtol=TOL, atol=TOL), (losses - ref).abs().max()
    assert torch.allclose(packed.embeddings, solo.embeddings, rtol=TOL, atol=TOL), \
        (packed.embeddings - solo.embeddings).abs().max()
    assert packed.trained_tokens == solo.trained_tokens


def test_each_jobs_gradient_reaches_only_its_own_prompt(tiny_model, tokenizer):
    data = toy_data(tokenizer, 6)
    hidden = tiny_model.config.hidden_size
    prompts = [torch.randn(k, hidden, requires_grad=True) for k in (2, 4, 3)]
    entries = [PackEntry(p, data[2 * i:2 * i + 2]) for i, p in enumerate(prompts)]
    sums = packed_loss_sums(tiny_model, entries, pad_id=0, model_dtype=torch.float32, logits_to_keep=True)
    sums[1][0].backward()  # job 1's loss only
    assert prompts[1].grad is not None and prompts[1].grad.abs().sum() > 0
    for other in (prompts[0], prompts[2]):
        assert other.grad is None or torch.count_nonzero(other.grad) == 0
    # And each packed loss is the job's solo loss.
    for entry, (loss, count) in zip(entries, sums):
        solo, solo_count = packed_loss_sums(tiny_model, [entry], pad_id=0, model_dtype=torch.float32,
                                            logits_to_keep=True)[0]
        assert count == solo_count and abs(float(loss.detach()) - float(solo.detach())) <= TOL * max(1.0, abs(float(solo.detach())))


def test_a_pack_of_three_jobs_equals_three_solo_runs(tiny_model, tokenizer):
    datasets = _datasets(tokenizer)
    solo = [_solo(tiny_model, tokenizer, d, c) for d, c in zip(datasets, CONFIGS)]
    pack = _pack(tiny_model, tokenizer)
    packed = _packed(tiny_model, tokenizer, list(zip(datasets, CONFIGS)), pack)
    for p, s in zip(packed, solo):
        _assert_same_run(p, s)
    assert max(pack.batch_sizes) == 3, pack.batch_sizes  # the three really shared forwards
    # Units: job 0 has 2 micro-batches a step (16), job 1 one (6), job 2 one (10): packed, far fewer than 32.
    assert pack.batches < 32


def test_jobs_join_and_leave_a_running_pack(tiny_model, tokenizer):
    """Job 1 joins when job 0 is at step 2; job 2 joins when job 1 is at step 3 (job 1 leaves before
    job 0 does): every job still equals its solo run."""
    datasets = _datasets(tokenizer)
    solo = [_solo(tiny_model, tokenizer, d, c) for d, c in zip(datasets, CONFIGS)]
    pack = _pack(tiny_model, tokenizer)
    packed = _packed(tiny_model, tokenizer, list(zip(datasets, CONFIGS)), pack, start_after={1: (0, 2), 2: (1, 3)})
    for p, s in zip(packed, solo):
        _assert_same_run(p, s)
    assert 1 in pack.batch_sizes and max(pack.batch_sizes) >= 2, pack.batch_sizes


def test_while_serving_a_unit_costs_no_more_than_one_jobs_unit(tiny_model, tokenizer):
    """With the engine busy, a packed unit takes jobs only up to the largest single job unit's cost
    (rows x padded length), so the step lock is never held longer than for one job's unit alone."""
    datasets = _datasets(tokenizer)
    same = [dataclasses.replace(CONFIGS[1], seed=s, steps=3) for s in (1, 2, 3)]
    solo = [_solo(tiny_model, tokenizer, datasets[0], c) for c in same]
    pack = TrainingPack.for_model(tiny_model, tokenizer, step_lock=threading.Lock(), is_busy=lambda: True)
    costs = []
    run_batch = pack._run_batch

    def record_cost(batch):
        costs.append((sum(u.entry.cost for u in batch), [u.entry.cost for u in batch]))
        run_batch(batch)

    pack._run_batch = record_cost
    packed = _packed(tiny_model, tokenizer, [(datasets[0], c) for c in same], pack)
    for p, s in zip(packed, solo):
        _assert_same_run(p, s)
    largest_unit = max(c for _, units in costs for c in units)
    assert costs and all(total <= largest_unit for total, _ in costs), costs


def test_a_failing_job_fails_alone(tiny_model, tokenizer):
    """A unit that raises inside the packed forward fails only its own job; the other trains on."""
    datasets = _datasets(tokenizer)
    pack = _pack(tiny_model, tokenizer)
    good = _solo(tiny_model, tokenizer, datasets[0], CONFIGS[0])
    bad_data = [dataclasses.replace(ex, input_ids=[10 ** 9] + list(ex.input_ids[1:])) for ex in datasets[1]]
    out: dict[str, object] = {}

    def run(name, data, cfg):
        try:
            out[name] = PromptTuner(tiny_model, tokenizer, data, None, cfg, pack=pack).run()
        except Exception as exc:
            out[name] = exc

    threads = [threading.Thread(target=run, args=("good", datasets[0], CONFIGS[0])),
               threading.Thread(target=run, args=("bad", bad_data, CONFIGS[1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert isinstance(out["bad"], (IndexError, RuntimeError)), out["bad"]
    _assert_same_run(out["good"], good)


# ---- the manager: jobs of three tenants in one pack, with checkpoints, evals, early stopping, cancel --------
def _manager(model, tokenizer, root, **kw):
    from softserve.store.backends import LocalBackend
    from softserve.store.store import PromptStore
    from softserve.tuning.export import model_info
    from softserve.tuning.jobs import TuningManager

    store = PromptStore(LocalBackend(root), model_info(model, "tiny"), revalidate_seconds=0)
    return TuningManager(model, tokenizer, store, model_name="tiny", scan_seconds=0.05, **kw)


def _submit(manager, tenant: str, cfg: TuningConfig, records: list[dict], evals: list[dict] | None = None) -> str:
    import json

    from softserve.tuning.job import new_job_id
    from softserve.tuning.records import new_record

    record = new_record(job_id=new_job_id(), tenant=tenant, namespace=tenant, name="tuned", model="tiny", config=cfg,
                        checkpoint_every=3, auto=[], num_examples={"train": len(records), "validation": len(evals or [])},
                        training_file=None, validation_file=None, description=None, suffix=None, metadata=None)
    texts = {"train": "".join(json.dumps(r) + "\n" for r in records)}
    if evals:
        texts["validation"] = "".join(json.dumps(r) + "\n" for r in evals)
    return manager.submit(record, texts).id


def _wait_all(manager, ids: dict[str, str], timeout: float = 300.0) -> dict[str, dict]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = {t: manager.get(t, j) for t, j in ids.items()}
        if all(r["status"] in ("succeeded", "failed", "cancelled") for r in records.values()):
            return records
        time.sleep(0.02)
    raise AssertionError({t: (r["status"], r["step"]) for t, r in records.items()})


MANAGER_JOBS = {  # tenant -> config, answers; "core" stops early (an eval must beat the best by 100: none does)
    "acme": (dataclasses.replace(CONFIGS[0], steps=9, max_length=200), lambda i: " yes" if i % 2 else " no"),
    "beta": (dataclasses.replace(CONFIGS[1], steps=9, max_length=200), lambda i: " maybe" if i % 3 else " never"),
    "core": (dataclasses.replace(CONFIGS[2], steps=12, max_length=200, eval_every=2, early_stopping_patience=1,
                                 early_stopping_min_delta=100.0), lambda i: f" {i} and {i + 1}"),
}


def _run_jobs(model, tokenizer, root, pack_jobs: int):
    from tests.support.tuning import toy_records

    manager = _manager(model, tokenizer, root, pack_jobs=pack_jobs)
    try:
        ids = {t: _submit(manager, t, cfg, toy_records(8, answer=ans), toy_records(3, answer=ans))
               for t, (cfg, ans) in MANAGER_JOBS.items()}
        records = _wait_all(manager, ids)
        events = {t: manager.events(t, ids[t]) for t in ids}
        prompts = {t: manager.store.load_tensor(manager.store.resolve(t, "tuned")) for t in ids}
        return records, events, prompts, (manager.pack.batch_sizes if manager.pack else [])
    finally:
        manager.close()


def _close(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= TOL * max(1.0, abs(y)) + 1e-6 for x, y in zip(a, b)) and len(a) == len(b)  # + record rounding


def test_manager_packs_three_tenants_jobs_like_solo_runs(tiny_model, tokenizer, tmp_path):
    solo, solo_events, solo_prompts, _ = _run_jobs(tiny_model, tokenizer, tmp_path / "solo", pack_jobs=1)
    packed, packed_events, packed_prompts, sizes = _run_jobs(tiny_model, tokenizer, tmp_path / "packed", pack_jobs=3)
    for tenant in MANAGER_JOBS:
        s, p = solo[tenant], packed[tenant]
        assert p["status"] == s["status"] == "succeeded", (p["error"], s["error"])
        assert _close([x["loss"] for x in p["loss_curve"]], [x["loss"] for x in s["loss_curve"]]), \
            (tenant, p["loss_curve"], s["loss_curve"])
        assert _close([x["eval_loss"] for x in p["eval_curve"]], [x["eval_loss"] for x in s["eval_curve"]]), \
            (tenant, p["eval_curve"], s["eval_curve"])
        assert [c["step"] for c in p["checkpoints"]] == [c["step"] for c in s["checkpoints"]]
        assert p["stopped_early"] == s["stopped_early"] and p["result"]["step"] == s["result"]["step"]
        assert torch.allclose(packed_prompts[tenant], solo_prompts[tenant], rtol=TOL, atol=TOL), \
            (tenant, (packed_prompts[tenant] - solo_prompts[tenant]).abs().max())
        events = packed_events[tenant]
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert [e["type"] for e in events] == [e["type"] for e in solo_events[tenant]]
    assert packed["core"]["stopped_early"], "the early-stopping job did not stop early: make it"
    assert max(sizes) >= 2, sizes  # jobs really shared forwards (all three at once unless one was still validating)


# ---- kill -9 of a server mid-pack --------------------------------------------------------------------------
KILL_STEPS = 60
# The three jobs share k and one token length, so a job's operands have the same shapes whichever jobs
# share its batch: resumed == uninterrupted bit for bit on the CPUs measured (one torch thread, as the
# test server runs). With jobs of different lengths, AdamW amplifies the pack's rounding after a resume
# (1e-4 to 1.2e-3 relative by step 60 on an AMD Zen 5 CPU), which would hide a resume bug of that size.
LONG_TOL = 1e-6


def _equal_length_records(n: int, first: int) -> list[dict]:
    """Examples of one token length (SmolLM2 splits the two-digit number into two digits)."""
    return [{"prompt": f"Word: {first + i}\nLabel:", "completion": " yes" if i % 2 else " no"} for i in range(n)]


def _job_body(name: str, k: int, lr: float, seed: int) -> dict:
    return {"name": name, "training_data": _equal_length_records(12, 10), "validation_data": _equal_length_records(3, 40),
            "init": "vocab",
            "num_virtual_tokens": k, "steps": KILL_STEPS, "batch_size": 4, "micro_batch_size": 2, "learning_rate": lr,
            "seed": seed, "checkpoint_every": 10, "eval_every": 30}


def _http_wait(client, job_ids: list[str], check, timeout: float = 300.0) -> list[dict]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [client.get(f"/v1/tuning/jobs/{j}").json() for j in job_ids]
        if all(check(j) for j in jobs):
            return jobs
        time.sleep(0.05)
    raise AssertionError([(j["status"], j["step"]) for j in jobs])


def _finished(job: dict) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


@pytest.mark.process
def test_kill9_mid_pack_every_job_resumes_and_finishes_as_uninterrupted(tmp_path, tmp_path_factory, tokenizer):
    from tests.support.live_server import LiveServer, tiny_model_dir

    model = tiny_model_dir(tmp_path_factory, tokenizer)
    args = ["--tuning-pack-jobs", "3", "--max-tuning-jobs-per-tenant", "3", "--tuning-replica-id", "pod-0",
            "--tuning-lease-seconds", "600",
            "--tuning-scan-seconds", "0.3", "--max-model-len", "256", "--log-level", "warning"]
    bodies = [_job_body("a", 3, 0.1, 1), _job_body("b", 3, 0.03, 2), _job_body("c", 3, 0.3, 3)]
    store = tmp_path / "store"
    with LiveServer(tmp_path / "ref", model=model, extra_args=args, log_dir=tmp_path) as server, server.client() as c:
        ids = [c.post("/v1/tuning/jobs", json=b).json()["id"] for b in bodies]
        reference = _http_wait(c, ids, _finished)
    with LiveServer(store, model=model, extra_args=args, log_dir=tmp_path) as server, server.client() as c:
        ids = [c.post("/v1/tuning/jobs", json=b).json()["id"] for b in bodies]
        running = _http_wait(c, ids, lambda j: j["step"] >= 25 or _finished(j))
        server.kill9()
    assert not any(_finished(j) for j in running), "a job finished before the kill; raise KILL_STEPS"
    # The lease (600 s) is still live in pod-0's name: the restarted pod-0 must take all three back at once.
    with LiveServer(store, model=model, extra_args=args, log_dir=tmp_path) as server, server.client() as c:
        done = _http_wait(c, ids, _finished, timeout=240)
        events = [c.get(f"/v1/tuning/jobs/{j}/events", params={"limit": 1000, "order": "asc"}).json()["data"]
                  for j in ids]
    for ref, job, evs in zip(reference, done, events):
        assert ref["status"] == job["status"] == "succeeded", (ref["error"], job["error"])
        assert job["resumed"] == 1 and job["step"] == KILL_STEPS
        got, want = [p["loss"] for p in job["loss_curve"]], [p["loss"] for p in ref["loss_curve"]]
        gap = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(got, want))
        assert len(got) == len(want) and gap <= LONG_TOL, gap
        assert [p["step"] for p in job["loss_curve"]] == list(range(1, KILL_STEPS + 1))
        assert [e["data"]["step"] for e in evs if e["type"] == "metrics"] == list(range(1, KILL_STEPS + 1))
        assert sum(e["message"].startswith("Resumed from the checkpoint") for e in evs) == 1
