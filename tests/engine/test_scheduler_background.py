"""Background (Batch API) rows in the scheduler: the capacity interactive traffic leaves. Fake runner
outputs: no torch, no model (softserve/engine/scheduler.py, "Background rows")."""

from __future__ import annotations

import pytest

from softserve.engine.config import SchedulerConfig
from softserve.engine.outputs import RunnerOutput
from softserve.engine.request import ErrorKind, Request, SamplingParams, SoftPrompt, SoftPromptRef
from softserve.engine.scheduler import QueueFullError, Scheduler

EOS = 2


def req(rid: str, n_prompt: int = 4, **sampling) -> Request:
    sampling.setdefault("temperature", 0.0)
    return Request(request_id=rid, prompt_ids=list(range(10, 10 + n_prompt)), sampling=SamplingParams(**sampling))


def bg(rid: str, tenant: str = "default", **sampling) -> Request:
    r = req(rid, **sampling)
    r.tenant, r.background = tenant, True
    return r


def fake_step(s: Scheduler, now: float | None = None):
    out = s.schedule(now)
    s.update(out, RunnerOutput(sampled_token_ids=[7] * len(out.scheduled)))
    s.take_finished()
    return out


def rows_of(out) -> list[tuple[str, int]]:
    return [(row.request.request_id, row.num_tokens) for row in out.rows]


def test_idle_engine_gives_background_rows_every_row_and_interactive_ones_never_wait_for_them():
    s = Scheduler(SchedulerConfig(max_batch_size=3, max_background_tokens=1, background_grace_s=5), {EOS})
    for i in range(5):
        s.add(bg(f"bg{i}", max_tokens=3))
    out = fake_step(s, now=0)
    assert rows_of(out) == [("bg0", 4), ("bg1", 4), ("bg2", 4)]  # idle server: batch rows fill it
    s.add(req("live", max_tokens=3))
    out = fake_step(s, now=1)
    # Every row is a batch row, yet the interactive request is admitted at once: batch rows pause
    # instead of holding a row. Their decode tokens ride in the rows it leaves free (oldest first).
    assert rows_of(out) == [("live", 4), ("bg0", 1), ("bg1", 1)]
    assert len(s.running) == 4  # 3 batch rows + 1 interactive: max_batch_size counts interactive rows for it
    assert s.running[2].paused_since == 1  # bg2
    out = fake_step(s, now=2)
    assert rows_of(out) == [("live", 1), ("bg0", 1), ("bg1", 1)]  # bg0, bg1 finish and free their rows
    assert s.num_background_waiting == 2  # no free row: no new batch row
    out = fake_step(s, now=3)  # bg2 rides again; one row is left and the prompt cap (1) admits bg3's first token
    assert rows_of(out) == [("live", 1), ("bg2", 1), ("bg3", 1)]


def test_background_decode_rows_ride_up_to_the_free_rows_while_interactive_work_is_present():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_background_tokens=3, background_hold_s=0, background_grace_s=0), {EOS})
    for i in range(4):
        s.add(bg(f"bg{i}", n_prompt=6, max_tokens=20))
    fake_step(s, now=0)  # all four admitted and prefilled: decoding from now on
    s.add(req("live", n_prompt=5, max_tokens=4))
    steps = [fake_step(s, now=1 + i) for i in range(4)]
    for out in steps:  # 4 rows: the interactive one and 3 batch rows; the youngest batch row pauses
        assert rows_of(out) == [("live", 5 if out is steps[0] else 1), ("bg0", 1), ("bg1", 1), ("bg2", 1)]
    assert {r.request_id: r.num_output_tokens for r in s.running if r.background} == {"bg0": 5, "bg1": 5, "bg2": 5, "bg3": 1}
    # live finished in its 4 steps, exactly as on an idle engine; with no grace, every batch row runs again.
    live = steps[-1].scheduled[0]
    assert live.is_finished and live.finished_step - live.first_scheduled_step + 1 == 4
    assert [rid for rid, _ in rows_of(fake_step(s, now=10))] == ["bg0", "bg1", "bg2", "bg3"]


def test_background_prompt_tokens_share_the_cap_and_the_grace_keeps_it_after_interactive_work_left():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_background_tokens=4, background_hold_s=0, background_grace_s=0.5,
                                  max_background_step_tokens=6), {EOS})
    s.add(req("live", n_prompt=3, max_tokens=1))
    s.add(bg("bg0", n_prompt=20, max_tokens=1))
    out = fake_step(s, now=100.0)
    assert rows_of(out) == [("live", 3), ("bg0", 4)]  # the batch row takes what is left, under the cap
    out = fake_step(s, now=100.2)  # live finished, but only 0.2 s ago: still at most 4 tokens
    assert rows_of(out) == [("bg0", 4)]
    out = fake_step(s, now=100.4)
    assert rows_of(out) == [("bg0", 4)]
    # The grace is over: a batch-only step, bounded by max_background_step_tokens (6) instead.
    assert [rows_of(fake_step(s, now=t)) for t in (100.6, 100.7)] == [[("bg0", 6)], [("bg0", 2)]]


def test_a_step_of_batch_rows_only_is_bounded_and_interactive_steps_are_not():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=100, max_background_step_tokens=10,
                                  background_grace_s=0), {EOS})
    for i in range(3):
        s.add(bg(f"bg{i}", n_prompt=8, max_tokens=5))
    assert rows_of(fake_step(s, now=0)) == [("bg0", 8), ("bg1", 2)]
    # decode tokens count too, and go first: bg0 decodes, bg1 continues, bg2 is admitted with the rest
    assert rows_of(fake_step(s, now=1)) == [("bg0", 1), ("bg1", 6), ("bg2", 3)]
    assert rows_of(fake_step(s, now=2)) == [("bg0", 1), ("bg1", 1), ("bg2", 5)]
    s.add(req("live", n_prompt=40, max_tokens=1))
    out = fake_step(s, now=3)  # interactive work present: its prompt goes whole, batch decodes ride
    assert rows_of(out) == [("live", 40), ("bg0", 1), ("bg1", 1), ("bg2", 1)]


def test_a_zero_prompt_cap_lets_only_batch_decodes_run_beside_interactive_work():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_background_tokens=0, background_hold_s=0, background_grace_s=0), {EOS})
    s.add(bg("dec", max_tokens=9))
    fake_step(s, now=0)
    s.add(bg("pre", n_prompt=30, max_tokens=9))
    s.add(req("live", n_prompt=5, max_tokens=3))
    assert rows_of(fake_step(s, now=1)) == [("live", 5), ("dec", 1)]  # no batch prompt token, no admission
    assert rows_of(fake_step(s, now=2)) == [("live", 1), ("dec", 1)]
    fake_step(s, now=3)  # live finishes
    assert rows_of(fake_step(s, now=4)) == [("dec", 1), ("pre", 30)]


def test_the_batch_row_computing_a_prompt_kv_an_interactive_request_waits_for_runs_uncapped():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_background_tokens=0, max_background_step_tokens=3,
                                  background_grace_s=0), {EOS},
                  prefix_lookup=lambda r: "kv" if r.request_id == "live" else None)  # bg files it in the cache
    prompt = SoftPrompt(SoftPromptRef(name="p", version="v", sha256="sha", num_virtual_tokens=8), embeddings=None)
    row, live = bg("bg", max_tokens=2), req("live", max_tokens=2)
    row.soft_prompt = live.soft_prompt = prompt
    s.add(row)
    assert rows_of(fake_step(s, now=0)) == [("bg", 3)]  # a short batch-only step: 3 of its 8 virtual tokens
    s.add(live)  # same prompt: it waits one step for bg to finish the prompt's KV, never on the cap of 0
    assert rows_of(fake_step(s, now=1)) == [("bg", 9)]
    assert rows_of(fake_step(s, now=2)) == [("live", 4), ("bg", 1)]  # a cache hit: its 4 prompt tokens


def test_batch_rows_holding_the_kv_pool_an_interactive_request_waits_for_run_uncapped():
    s = Scheduler(SchedulerConfig(max_batch_size=2, kv_cache_tokens=20, max_background_tokens=1,
                                  background_grace_s=0), {EOS})
    batch = [bg(f"bg{i}", n_prompt=4, max_tokens=4) for i in range(2)]  # reserve 7 slots each
    for r in batch:
        s.add(r)
    fake_step(s, now=0)
    s.add(req("small", n_prompt=2, max_tokens=2))  # 3 slots: fits beside them
    assert rows_of(fake_step(s, now=1)) == [("small", 2), ("bg0", 1)]  # one free row: bg1 pauses
    s.add(req("big", n_prompt=6, max_tokens=6))  # 11 slots: only once the batch rows free theirs
    out = fake_step(s, now=2)
    assert [rid for rid, _ in rows_of(out)] == ["small", "bg0", "bg1"]  # uncapped: they finish sooner
    assert s.num_waiting == 1 and s.num_background_waiting == 0
    big = s.waiting["default"][0]
    for step in range(3, 6):
        fake_step(s, now=step)
    assert all(r.is_finished for r in batch) and big.first_scheduled_step == max(r.finished_step for r in batch) + 1


def test_a_paused_batch_rows_timeout_stops_counting_while_it_is_paused():
    s = Scheduler(SchedulerConfig(max_batch_size=1, request_timeout_s=5, background_hold_s=0, background_grace_s=0), {EOS})
    row = bg("bg", max_tokens=100)
    s.add(row)
    fake_step(s, now=0)  # admitted at 0: its timeout counts from here
    for t in range(1, 21):  # one interactive request a second takes the only row: bg pauses for 20 s
        live = req(f"live{t}", max_tokens=1)
        live.arrival_time = t
        s.add(live)
        assert rows_of(fake_step(s, now=t)) == [(f"live{t}", 4)]
    assert not row.is_finished and row.paused_since == 1
    assert rows_of(fake_step(s, now=21)) == [("bg", 1)]  # it ran 1 s before the pause and 0 s since
    assert row.paused_since is None
    s.expire(now=24.5)
    assert not row.is_finished
    s.expire(now=25.5)  # 1 + 4.5 s of running: past the 5 s timeout
    assert row.is_finished and row.error_kind == ErrorKind.TIMEOUT


def test_background_rows_honour_priority_within_their_tenant_only():
    s = Scheduler(SchedulerConfig(max_batch_size=1), {EOS})
    first, urgent, other = bg("first", max_tokens=1), bg("urgent", max_tokens=1), bg("other", tenant="t2", max_tokens=1)
    urgent.priority = -1
    other.priority = -1000
    for r in (first, urgent, other):
        s.add(r)
    order = [fake_step(s).prefill[0].request_id for _ in range(3)]
    assert order.index("urgent") < order.index("first")  # its own tenant's rows: priority decides
    assert order[0] == "urgent"  # between tenants the fair-share counters decide, not other's -1000


def test_background_rows_wait_while_interactive_ones_wait_and_are_outside_the_queue_limit():
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_queue=2, background_hold_s=0, background_grace_s=0), {EOS})
    for i in range(10):  # their runner bounds them: not refused by --max-queue
        s.add(bg(f"bg{i}", max_tokens=1))
    s.add(req("a", max_tokens=1))
    s.add(req("b", max_tokens=1))
    with pytest.raises(QueueFullError):  # the interactive queue is still limited
        s.add(req("c", max_tokens=1))
    out = fake_step(s)
    assert [r.request_id for r in out.prefill] == ["a", "b"]
    out = fake_step(s)
    assert [r.request_id for r in out.prefill] == ["bg0", "bg1"]


def test_interactive_prefill_chunks_go_before_background_ones():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=10), {EOS})
    s.add(bg("bg", n_prompt=30))
    fake_step(s)  # bg has 10 of its 30 prompt tokens
    s.add(req("live", n_prompt=25))
    fake_step(s)  # live admitted with the whole budget
    out = s.schedule()
    assert [(row.request.request_id, row.num_tokens) for row in out.rows] == [("live", 10)]


def test_background_rows_are_shared_fairly_between_tenants():
    s = Scheduler(SchedulerConfig(max_batch_size=2), {EOS})
    for i in range(6):
        s.add(bg(f"a{i}", tenant="a", max_tokens=1))
    for i in range(2):
        s.add(bg(f"b{i}", tenant="b", max_tokens=1))
    admitted = []
    for _ in range(3):
        admitted.append(sorted(r.tenant for r in fake_step(s).prefill))
    assert admitted[0] == ["a", "b"] and admitted[1] == ["a", "b"]  # b's small batch is not stuck behind a's


def test_waiting_background_rows_do_not_time_out():
    s = Scheduler(SchedulerConfig(max_batch_size=1, request_timeout_s=5, background_hold_s=0), {EOS})
    s.add(req("live", max_tokens=50))
    s.add(bg("bg", max_tokens=1))
    fake_step(s)
    s.expire(now=10**9)
    live = s.running[0] if s.running else None
    assert live is None  # the running interactive one timed out
    assert s.num_background_waiting == 1
    # Once admitted, its timeout counts from its admission, not from when it was queued.
    out = s.schedule(now=10**9)
    assert [r.request_id for r in out.prefill] == ["bg"]
    s.expire(now=10**9 + 4)
    assert [r.request_id for r in s.running] == ["bg"]
    s.expire(now=10**9 + 6)
    assert s.running == []


def test_the_hold_keeps_batch_only_steps_off_for_a_moment_after_interactive_work_left():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_background_tokens=2, background_grace_s=0,
                                  background_hold_s=0.05), {EOS})
    s.add(bg("bg0", n_prompt=20, max_tokens=2))
    s.add(req("live", n_prompt=3, max_tokens=1))
    assert rows_of(fake_step(s, now=10.0)) == [("live", 3), ("bg0", 2)]  # live finishes in this step
    assert s.idle_seconds(now=10.0) == 0.0  # (asked only after an empty step)
    # The first schedule without interactive work: the hold starts; no batch row runs, and the engine
    # may wait (for a request) until it ends instead of scheduling again.
    assert rows_of(fake_step(s, now=10.01)) == []
    assert s.idle_seconds(now=10.02) == pytest.approx(0.04)
    # A request that arrives during the hold finds the engine free: a step of its own.
    s.add(req("next", n_prompt=3, max_tokens=2))
    assert rows_of(fake_step(s, now=10.03)) == [("next", 3), ("bg0", 2)]
    assert s.idle_seconds(now=10.03) == 0.0  # interactive work present: never wait
    # next decodes: beside interactive decodes only, a batch prompt chunk is one token (no prefill group)
    assert rows_of(fake_step(s, now=10.08)) == [("next", 1), ("bg0", 1)]
    assert rows_of(fake_step(s, now=10.09)) == []  # next finished: held again, from here
    assert rows_of(fake_step(s, now=10.13)) == []
    # The hold is over (no grace here): a batch-only step, bounded by max_background_step_tokens.
    assert rows_of(fake_step(s, now=10.15)) == [("bg0", 15)]
    assert s.idle_seconds(now=10.15) == 0.0


def test_an_empty_step_under_the_grace_of_a_zero_cap_waits_for_the_grace_not_a_spin():
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_background_tokens=0, background_grace_s=0.5,
                                  background_hold_s=0.05), {EOS})
    s.add(bg("bg0", n_prompt=20, max_tokens=2))
    s.add(req("live", n_prompt=3, max_tokens=1))
    assert rows_of(fake_step(s, now=0.0)) == [("live", 3)]  # a cap of 0: no batch prompt token beside it
    assert rows_of(fake_step(s, now=0.01)) == []  # the hold
    assert s.idle_seconds(now=0.01) == pytest.approx(0.05)
    assert rows_of(fake_step(s, now=0.07)) == []  # the hold is over; the grace still caps bg0 at 0 tokens
    assert s.idle_seconds(now=0.07) == pytest.approx(0.43)  # the grace counts from the last step live was in
    assert rows_of(fake_step(s, now=0.5)) == [("bg0", 20)]


def test_beside_interactive_decodes_only_batch_prompt_chunks_are_one_token_each():
    """A batch prompt chunk of 2+ tokens would open a prefill group (a second attention call per layer)
    in a step that otherwise only decodes; one-token chunks join the decode group. In a step that
    already computes interactive prompt tokens, the cap applies as a whole."""
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_background_tokens=4, background_hold_s=0, background_grace_s=0), {EOS})
    s.add(bg("dec", n_prompt=4, max_tokens=20))
    fake_step(s, now=0)  # a batch row, prefilled: it decodes from now on
    for i in range(3):
        s.add(bg(f"pre{i}", n_prompt=10, max_tokens=2))
    s.add(req("live", n_prompt=5, max_tokens=4))
    # live's prompt opens a prefill group anyway: the batch prompt tokens share the cap (4) in one chunk
    assert rows_of(fake_step(s, now=1)) == [("live", 5), ("dec", 1), ("pre0", 4)]
    # live decodes: pre0 continues and pre1, pre2 are admitted, a token each, under the cap of 4 tokens
    assert rows_of(fake_step(s, now=2)) == [("live", 1), ("dec", 1), ("pre0", 1), ("pre1", 1), ("pre2", 1)]
    assert rows_of(fake_step(s, now=3)) == [("live", 1), ("dec", 1), ("pre0", 1), ("pre1", 1), ("pre2", 1)]
    s.add(req("live2", n_prompt=3, max_tokens=2))  # a new prompt: the step computes prompt tokens again
    assert rows_of(fake_step(s, now=4)) == [("live", 1), ("live2", 3), ("dec", 1), ("pre0", 4)]


def test_batch_prompt_work_still_advances_under_unending_interactive_decodes():
    """No starvation: with interactive rows decoding every step (never a prompt token), batch rows are
    admitted, prefilled a token a step, and finish, and no step holds a chunk of more than one token."""
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_background_tokens=2, background_hold_s=0, background_grace_s=0), {EOS})
    for i in range(2):
        s.add(req(f"live{i}", n_prompt=3, max_tokens=1000))
    fake_step(s, now=0)  # both admitted; they decode from here on
    batch = [bg(f"bg{i}", n_prompt=6, max_tokens=2) for i in range(3)]
    for r in batch:
        s.add(r)
    for t in range(1, 40):
        out = fake_step(s, now=t)
        assert [row.num_tokens for row in out.rows] == [1] * len(out.rows)
        prompt_rows = [row for row in out.rows if all(row.request is not d for d in out.decode)]
        assert len(prompt_rows) <= 2 and all(row.request.background for row in prompt_rows)  # the cap
    assert all(r.is_finished for r in batch)
    assert all(not r.is_finished for r in s.running)  # the interactive rows decoded throughout
