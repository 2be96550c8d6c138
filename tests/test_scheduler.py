"""Scheduler unit tests with fake runner outputs: no torch, no model."""

from __future__ import annotations

import pytest

from server.engine.config import SchedulerConfig
from server.engine.request import FinishReason, Request, SamplingParams
from server.engine.scheduler import QueueFullError, RunnerOutput, Scheduler

EOS = 2


def req(rid: str, n_prompt: int = 4, **sampling) -> Request:
    sampling.setdefault("temperature", 0.0)
    return Request(request_id=rid, prompt_ids=list(range(10, 10 + n_prompt)), sampling=SamplingParams(**sampling))


def fake_step(s: Scheduler, token: int = 7, overrides: dict[str, int] | None = None):
    out = s.schedule()
    tokens = [(overrides or {}).get(r.request_id, token) for r in out.scheduled]
    s.update(out, RunnerOutput(sampled_token_ids=tokens))
    s.drop_finished()
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


def test_prefill_token_budget_always_admits_one():
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_prefill_tokens=10), {EOS})
    s.add(req("big", n_prompt=50))
    s.add(req("small", n_prompt=3))
    out = s.schedule()
    assert [r.request_id for r in out.prefill] == ["big"]  # over budget but alone: admitted
    s.update(out, RunnerOutput([7]))
    assert [r.request_id for r in s.schedule().prefill] == ["small"]


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
    out = s.schedule()
    assert {r.request_id for r in out.finished} == {"a", "b"} and out.is_empty
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
