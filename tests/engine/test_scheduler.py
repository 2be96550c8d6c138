"""Scheduler unit tests with fake runner outputs: no torch, no model."""

from __future__ import annotations

import pytest

from softserve.engine.config import SchedulerConfig
from softserve.engine.request import ErrorKind, FinishReason, Request, SamplingParams
from softserve.engine.outputs import RunnerOutput
from softserve.engine.scheduler import QueueFullError, Scheduler

EOS = 2


def req(rid: str, n_prompt: int = 4, **sampling) -> Request:
    sampling.setdefault("temperature", 0.0)
    return Request(request_id=rid, prompt_ids=list(range(10, 10 + n_prompt)), sampling=SamplingParams(**sampling))


def fake_step(s: Scheduler, token: int = 7, overrides: dict[str, int] | None = None, now: float | None = None):
    out = s.schedule(now)
    tokens = [(overrides or {}).get(r.request_id, token) for r in out.scheduled]
    s.update(out, RunnerOutput(sampled_token_ids=tokens))
    s.take_finished()
    return out


def test_new_request_joins_next_step_and_short_one_leaves_first():
    s = Scheduler(SchedulerConfig(max_batch_size=8), {EOS})
    long = req("long", max_tokens=50)
    s.add(long)
    for _ in range(3):
        fake_step(s)
    short = req("short", max_tokens=2)
    s.add(short)
    out = fake_step(s)
    assert [r.request_id for r in out.prefill] == ["short"]
    assert [r.request_id for r in out.decode] == ["long"]
    fake_step(s)
    assert short.is_finished and short.finish_reason == FinishReason.LENGTH
    assert short.finished_step - short.first_scheduled_step + 1 == 2  # exactly its own tokens, no waiting
    assert not long.is_finished and [r.request_id for r in s.running] == ["long"]


def test_batch_size_limit_admits_waiting_when_a_row_frees():
    s = Scheduler(SchedulerConfig(max_batch_size=2), {EOS})
    a, b, c = req("a", max_tokens=1), req("b", max_tokens=5), req("c", max_tokens=5)
    for r in (a, b, c):
        s.add(r)
    out = fake_step(s)
    assert [r.request_id for r in out.prefill] == ["a", "b"] and s.num_waiting == 1
    out = fake_step(s)  # a finished last step, so c takes its row now
    assert [r.request_id for r in out.prefill] == ["c"]
    assert c.first_scheduled_step == a.finished_step + 1


def test_long_prompt_is_chunked_under_the_token_budget():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=10), {EOS})
    running = req("running", n_prompt=2, max_tokens=50)
    s.add(running)
    fake_step(s)
    s.add(req("big", n_prompt=25))
    s.add(req("small", n_prompt=3))
    chunks = []
    for _ in range(3):
        out = s.schedule()
        chunks.append({row.request.request_id: (row.start, row.num_tokens, row.samples) for row in out.rows})
        s.update(out, RunnerOutput([7] * len(out.scheduled)))
    # The decode row runs every step outside the budget; big's prompt goes 10 + 10 + 5 and samples at the end;
    # small waits until the budget has room, then is admitted and prefilled whole in the same step.
    assert chunks[0] == {"running": (2, 1, True), "big": (0, 10, False)}
    assert chunks[1] == {"running": (3, 1, True), "big": (10, 10, False)}
    assert chunks[2] == {"running": (4, 1, True), "big": (20, 5, True), "small": (0, 3, True)}


def test_full_kv_pool_makes_admission_wait_and_finishing_frees_it():
    s = Scheduler(SchedulerConfig(max_batch_size=8, kv_cache_tokens=20), {EOS})
    a, b, c = req("a", n_prompt=4, max_tokens=7), req("b", n_prompt=4, max_tokens=7), req("c", n_prompt=4, max_tokens=3)
    for r in (a, b, c):
        s.add(r)  # each reserves prompt + max_tokens - 1 = 10 or 6 slots
    out = fake_step(s)
    assert [r.request_id for r in out.prefill] == ["a", "b"] and s.kv.free_tokens == 0
    while not a.is_finished:
        assert c.first_scheduled_step is None  # no slot for c while a and b hold the pool
        fake_step(s)
    out = fake_step(s)
    assert out.prefill == [c] and not s.kv.owns("a") and s.kv.owns("c")
    with pytest.raises(ValueError, match="KV slots"):
        s.add(req("huge", n_prompt=15, max_tokens=10))  # could never fit: refused at once, not queued forever


def _prompted(rid: str, sha: str, k: int = 4, **sampling) -> Request:
    from softserve.engine.request import SoftPrompt, SoftPromptRef

    r = req(rid, **sampling)
    r.soft_prompt = SoftPrompt(SoftPromptRef(name="p", version="v", sha256=sha, num_virtual_tokens=k), embeddings=None)
    return r


def test_cold_prompt_is_computed_once_and_others_wait_for_the_cache():
    cached: set[str] = set()
    s = Scheduler(SchedulerConfig(max_batch_size=8), {EOS}, prefix_lookup=lambda r: "kv" if r.prompt_sha256 in cached else None)
    first, second, other = _prompted("first", "x"), _prompted("second", "x"), _prompted("other", "y", k=2)
    for r in (first, second, other):
        s.add(r)
    out = s.schedule()
    rows = {row.request.request_id: row for row in out.rows}
    assert set(rows) == {"first"}  # second shares first's cold prompt: it waits (other is behind it in FIFO)
    assert rows["first"].computes_prefix and (rows["first"].start, rows["first"].num_tokens) == (0, 4 + 4)
    s.update(out, RunnerOutput([7]))
    cached.add("x")  # the runner filed the prompt's KV during that forward
    out = s.schedule()
    rows = {row.request.request_id: row for row in out.rows}
    assert (rows["second"].start, rows["second"].num_tokens, rows["second"].computes_prefix) == (4, 4, False)
    assert rows["other"].computes_prefix and (rows["other"].start, rows["other"].num_tokens) == (0, 2 + 4)


def test_eos_stops_unless_ignored_and_min_tokens():
    s = Scheduler(SchedulerConfig(), {EOS})
    plain, ignoring, min3 = req("p", max_tokens=10), req("i", max_tokens=3, ignore_eos=True), req("m", max_tokens=10, min_tokens=3)
    for r in (plain, ignoring, min3):
        s.add(r)
    fake_step(s, token=EOS)
    assert plain.finish_reason == FinishReason.STOP
    assert not ignoring.is_finished and not min3.is_finished  # min_tokens=3: EOS at token 1 does not stop
    fake_step(s, token=EOS)
    fake_step(s, token=EOS)
    assert ignoring.finish_reason == FinishReason.LENGTH and ignoring.num_output_tokens == 3
    assert min3.finish_reason == FinishReason.STOP and min3.num_output_tokens == 3


def test_stop_token_ids_and_max_model_len():
    s = Scheduler(SchedulerConfig(max_model_len=8), {EOS})
    a = req("a", n_prompt=4, max_tokens=100)
    b = req("b", n_prompt=2, max_tokens=100, stop_token_ids=(99,))
    s.add(a)
    s.add(b)
    fake_step(s, overrides={"b": 99})
    assert b.finish_reason == FinishReason.STOP
    for _ in range(3):
        fake_step(s)
    assert a.finish_reason == FinishReason.LENGTH and a.total_len == 8


def test_abort_removes_from_waiting_and_running():
    s = Scheduler(SchedulerConfig(max_batch_size=1), {EOS})
    a, b = req("a", max_tokens=10), req("b", max_tokens=10)
    s.add(a)
    s.add(b)
    fake_step(s)
    assert s.abort("b") is b and b.finish_reason == FinishReason.ABORT and s.num_waiting == 0
    assert s.abort("a") is a and s.num_running == 0
    assert [r.request_id for r in s.take_finished()] == ["b", "a"] and s.take_finished() == []
    assert s.schedule().is_empty and not s.has_unfinished()
    assert s.abort("missing") is None


def test_queue_limit():
    s = Scheduler(SchedulerConfig(max_queue=2), {EOS})
    s.add(req("a"))
    s.add(req("b"))
    with pytest.raises(QueueFullError):
        s.add(req("c"))


def test_runner_output_must_match_schedule():
    s = Scheduler(SchedulerConfig(), {EOS})
    s.add(req("a"))
    out = s.schedule()
    with pytest.raises(AssertionError):
        s.update(out, RunnerOutput([1, 2]))


def _tenant_req(rid: str, tenant: str, arrival: float, max_tokens: int = 20) -> Request:
    r = req(rid, max_tokens=max_tokens)
    r.tenant = tenant
    r.arrival_time = arrival
    return r


def test_flooding_tenant_does_not_starve_a_light_one():
    """Tenant A floods 50 requests into 8 rows; B's single request takes the first row that frees up."""
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_queue=1000), {EOS})
    for i in range(50):
        s.add(_tenant_req(f"a{i}", "A", arrival=i, max_tokens=5 + i % 7))
    for _ in range(3):
        fake_step(s)
    b = _tenant_req("b", "B", arrival=100, max_tokens=5)
    s.add(b)
    steps = 0
    while b.first_scheduled_step is None:
        out = fake_step(s)
        steps += 1
        freed = len(out.prefill)
    assert steps <= 3  # the shortest A request in the batch has at most 2 tokens left after 3 steps
    assert freed >= 1 and out.prefill[0] is b  # B is first in line when a row frees
    assert s.num_waiting_for("A") > 30  # although A queued long before B


def test_vtc_shares_rows_between_two_busy_tenants():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_queue=1000), {EOS})
    for i in range(40):
        s.add(_tenant_req(f"a{i}", "A", arrival=i, max_tokens=4))
    for i in range(40):
        s.add(_tenant_req(f"b{i}", "B", arrival=100 + i, max_tokens=4))
    admitted = {"A": 0, "B": 0}
    for _ in range(30):
        for r in fake_step(s).prefill:
            admitted[r.tenant] += 1
    assert admitted["A"] > 5 and abs(admitted["A"] - admitted["B"]) <= 2  # FIFO would give A everything


def test_idle_tenant_cannot_bank_credit():
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_queue=1000), {EOS})
    for i in range(10):
        s.add(_tenant_req(f"a{i}", "A", arrival=i, max_tokens=3))
    for _ in range(12):
        fake_step(s)
    s.add(_tenant_req("b0", "B", arrival=50))
    assert s.tenant_counters["B"] == min(s.tenant_counters[t] for t in ("A",))  # lifted, not zero


def test_per_tenant_queue_limit():
    s = Scheduler(SchedulerConfig(max_queue=100, max_queue_per_tenant=2), {EOS})
    s.add(_tenant_req("a0", "A", 0))
    s.add(_tenant_req("a1", "A", 1))
    with pytest.raises(QueueFullError, match="tenant"):
        s.add(_tenant_req("a2", "A", 2))
    s.add(_tenant_req("b0", "B", 3))  # other tenants are unaffected


def test_request_timeout_fails_waiting_and_running():
    s = Scheduler(SchedulerConfig(max_batch_size=1, request_timeout_s=10), {EOS})
    running, waiting = _tenant_req("r", "A", arrival=0.0), _tenant_req("w", "A", arrival=5.0)
    s.add(running)
    s.add(waiting)
    out = s.schedule(now=1.0)
    s.update(out, RunnerOutput([7]))
    out = s.schedule(now=11.0)  # r is 11 s old: timed out; w (6 s) takes its row
    assert running.finish_reason == FinishReason.ERROR and "timed out" in running.error
    assert running.error_kind == ErrorKind.TIMEOUT  # callers branch on the kind, never on the text
    assert s.take_finished() == [running] and out.prefill == [waiting]


# ---- priorities (background rows: test_scheduler_background.py) ------------------------------------
def test_priority_orders_a_tenants_own_queue_but_not_other_tenants():
    s = Scheduler(SchedulerConfig(max_batch_size=1), {EOS})
    first, urgent, later = req("first", max_tokens=1), req("urgent", max_tokens=1), req("later", max_tokens=1)
    urgent.priority = -5
    later.priority = 3
    for r in (later, first, urgent):
        s.add(r)
    order = [fake_step(s).prefill[0].request_id for _ in range(3)]
    assert order == ["urgent", "first", "later"]
    # Across tenants the fair-share counters decide: a tenant's priority does not jump another tenant.
    s = Scheduler(SchedulerConfig(max_batch_size=1), {EOS})
    x = req("x", max_tokens=1)
    y = req("y", max_tokens=1)
    y.tenant, y.priority = "other", -100
    s.add(x)
    s.add(y)
    assert fake_step(s).prefill[0].request_id == "x"


def test_every_way_of_finishing_goes_through_finish_once():
    """EOS, length, a stop string (the engine calls finish), abort, a failed row and a timeout: each
    request leaves the batch and its KV at once and is handed to the engine exactly once."""
    s = Scheduler(SchedulerConfig(max_batch_size=8, kv_cache_tokens=512, request_timeout_s=100), {EOS})
    eos, length, stop_string, aborted, failed, late = (
        req("eos"), req("length", max_tokens=1), req("stop-string"), req("aborted"), req("failed"), req("late"))
    for r in (eos, length, stop_string, aborted, failed, late):
        s.add(r)
    late.arrival_time -= 1000  # times out at the first schedule
    out = s.schedule()
    assert late.error_kind == ErrorKind.TIMEOUT and [r.request_id for r in s.take_finished()] == ["late"]
    index = {r.request_id: i for i, r in enumerate(out.scheduled)}
    tokens = [EOS if r is eos else 7 for r in out.scheduled]
    stepped = s.update(out, RunnerOutput(tokens, failed_rows={index["failed"]: "sampling failed"}))
    assert {r.request_id for _, r in stepped} == {"eos", "length", "stop-string", "aborted"}  # not the failed row
    assert s.finish(stop_string, FinishReason.STOP)  # what the engine does when its detokenizer hits a stop
    assert s.abort("aborted") is aborted
    assert not s.finish(eos, FinishReason.ABORT) and eos.finish_reason == FinishReason.STOP  # first reason wins
    finished = s.take_finished()
    assert [r.request_id for r in finished] == ["eos", "length", "failed", "stop-string", "aborted"]
    assert [r.finish_reason for r in finished] == [FinishReason.STOP, FinishReason.LENGTH, FinishReason.ERROR,
                                                   FinishReason.STOP, FinishReason.ABORT]
    assert s.running == [] and s.kv.used_tokens == 0 and not s.has_unfinished()
