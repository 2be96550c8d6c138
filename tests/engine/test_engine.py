"""Engine behaviour on a tiny random model: batch invariance, continuous batching, sampling, caches."""

from __future__ import annotations

import pytest
import torch

from tests.support.engine_utils import make_engine, make_prompt, make_request, reference_greedy, run
from softserve.engine.request import FinishReason

HIDDEN = 64


def _mixed_specs():
    """8 requests, 4 prompts of different lengths, one with no prompt, different input lengths."""
    p = [make_prompt("a", 4, HIDDEN, 1), make_prompt("b", 9, HIDDEN, 2), make_prompt("c", 1, HIDDEN, 3),
         make_prompt("d", 16, HIDDEN, 4)]
    return [
        (list(range(100, 110)), p[0]), (list(range(200, 203)), p[1]), (list(range(300, 320)), None),
        ([5], p[2]), (list(range(400, 407)), p[3]), (list(range(500, 512)), p[0]),
        (list(range(600, 602)), p[1]), (list(range(700, 730)), p[3]),
    ]


def test_mixed_batch_equals_solo_and_reference(tiny_model, tokenizer):
    specs = _mixed_specs()
    requests = [make_request(ids, soft_prompt=sp, max_tokens=12, ignore_eos=True) for ids, sp in specs]
    batched = run(make_engine(tiny_model, tokenizer), requests)
    for request, (ids, sp) in zip(requests, specs):
        solo = run(make_engine(tiny_model, tokenizer), [make_request(ids, soft_prompt=sp, max_tokens=12, ignore_eos=True)])
        reference = reference_greedy(tiny_model, ids, sp, 12)
        assert batched[request.request_id] == list(solo.values())[0] == reference


def test_requests_joining_and_leaving_mid_flight_keep_their_outputs(tiny_model, tokenizer):
    """Continuous batching: rows join at different steps and leave at different steps."""
    specs = _mixed_specs()
    engine = make_engine(tiny_model, tokenizer, max_batch_size=4)
    requests = [make_request(ids, soft_prompt=sp, max_tokens=4 + 3 * i, ignore_eos=True) for i, (ids, sp) in enumerate(specs)]
    got: dict[str, list[int]] = {r.request_id: [] for r in requests}
    pending = list(requests)
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % 2 == 0:
            engine.add_request(pending.pop(0))  # one arrival every other step
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
        step += 1
    for request, (ids, sp) in zip(requests, specs):
        assert got[request.request_id] == reference_greedy(tiny_model, ids, sp, request.sampling.max_tokens)


def test_long_request_does_not_delay_later_short_one(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    long = make_request(range(10, 20), max_tokens=60, ignore_eos=True)
    engine.add_request(long)
    for _ in range(5):
        engine.step()
    short = make_request(range(30, 33), max_tokens=3, ignore_eos=True)
    engine.add_request(short)
    while not short.is_finished:
        engine.step()
    assert short.first_scheduled_step == long.first_scheduled_step + 5  # admitted at the very next step
    assert short.finished_step - short.first_scheduled_step + 1 == 3  # one token per step, no waiting
    assert not long.is_finished and engine.num_running == 1  # the short one left; the long one goes on


def test_seeded_sampling_is_independent_of_batch_mates(tiny_model, tokenizer):
    sp = make_prompt("s", 6, HIDDEN, 9)
    kwargs = dict(soft_prompt=sp, max_tokens=15, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = run(make_engine(tiny_model, tokenizer), [make_request(range(40, 48), **kwargs)])
    mates = [make_request(range(i, i + 5 + i % 7), temperature=1.0, max_tokens=9, ignore_eos=True) for i in range(60, 66)]
    target = make_request(range(40, 48), **kwargs)
    crowded = run(make_engine(tiny_model, tokenizer), mates[:3] + [target] + mates[3:])
    assert crowded[target.request_id] == list(alone.values())[0]
    other_seed = run(make_engine(tiny_model, tokenizer), [make_request(range(40, 48), **{**kwargs, "seed": 99})])
    assert list(other_seed.values())[0] != crowded[target.request_id]


def test_top_k_1_and_tiny_top_p_are_greedy(tiny_model, tokenizer):
    greedy = reference_greedy(tiny_model, list(range(7, 15)), None, 8)
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
        out = run(make_engine(tiny_model, tokenizer), [make_request(range(7, 15), temperature=1.5, seed=3, max_tokens=8, ignore_eos=True, **kwargs)])
        assert list(out.values())[0] == greedy


def test_stop_string_is_cut_and_not_emitted(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    full = engine.generate_sync([make_request(range(100, 110), max_tokens=20, ignore_eos=True)])
    text = "".join(o.text for o in list(full.values())[0])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    outs = list(engine.generate_sync([make_request(range(100, 110), max_tokens=20, ignore_eos=True, stop=(stop,))]).values())[0]
    assert "".join(o.text for o in outs) == cut
    assert outs[-1].finished and outs[-1].finish_reason == FinishReason.STOP


def test_logprobs_match_reference_log_softmax(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    sp = make_prompt("l", 3, HIDDEN, 5)
    outs = list(engine.generate_sync([make_request(range(20, 26), soft_prompt=sp, max_tokens=1, logprobs=3)]).values())[0]
    item = outs[0].logprobs[0]
    with torch.inference_mode():
        x = torch.cat([sp.embeddings.unsqueeze(0), tiny_model.get_input_embeddings()(torch.tensor([list(range(20, 26))]))], 1)
        ref = torch.log_softmax(tiny_model(inputs_embeds=x).logits[0, -1].float(), -1)
    top = ref.topk(3)
    assert [t[0] for t in item.top] == top.indices.tolist()
    assert abs(item.logprob - ref[item.token_id].item()) < 1e-4
    assert item.token_id == top.indices[0].item()


def test_abort_frees_the_row_at_once_and_reports_it_at_the_next_step(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    a = make_request(range(10, 15), max_tokens=50, ignore_eos=True)
    b = make_request(range(20, 25), max_tokens=50, ignore_eos=True)
    engine.add_request(a)
    engine.add_request(b)
    engine.step()
    engine.step()
    kv = engine.scheduler.kv
    used_by_two = kv.used_tokens
    assert engine.num_running == 2 and kv.owns(a.request_id) and kv.owns(b.request_id)
    assert a.generator is not None and a.detok is not None  # its state lives on the request
    assert engine.abort_request(a.request_id)
    assert engine.num_running == 1 and not kv.owns(a.request_id) and kv.owns(b.request_id)
    assert kv.used_tokens == used_by_two - a.kv_reservation
    outs = engine.step()
    assert [o.finish_reason for o in outs if o.request_id == a.request_id] == [FinishReason.ABORT]  # reported once
    assert a.generator is None and a.detok is None and b.generator is not None and b.detok is not None
    assert [o.request_id for o in engine.step()] == [b.request_id] and not engine.abort_request(a.request_id)


def test_prefix_cache_is_keyed_by_content_not_name(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    v1 = make_prompt("same-name", 5, HIDDEN, 11)
    v2 = make_prompt("same-name", 5, HIDDEN, 12)  # same name and length, different content
    ids = list(range(50, 58))
    out1 = run(engine, [make_request(ids, soft_prompt=v1, max_tokens=6, ignore_eos=True)])
    out2 = run(engine, [make_request(ids, soft_prompt=v2, max_tokens=6, ignore_eos=True)])
    out1_again = run(engine, [make_request(ids, soft_prompt=v1, max_tokens=6, ignore_eos=True)])
    assert list(out2.values())[0] == reference_greedy(tiny_model, ids, v2, 6)
    assert list(out1_again.values())[0] == list(out1.values())[0] == reference_greedy(tiny_model, ids, v1, 6)
    cache = engine.prefix_cache
    assert len(cache) == 2 and cache.misses == 2 and cache.hits == 1


def test_prefix_cache_respects_byte_budget(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer)
    engine.prefix_cache.budget_bytes = 3 * 8 * 2 * 2 * 16 * 4 * 2  # room for ~3 prompts of k=8 (2 layers, 2 heads, 16 dim)
    for seed in range(6):
        run(engine, [make_request([5, 6, 7], soft_prompt=make_prompt(f"p{seed}", 8, HIDDEN, 100 + seed), max_tokens=1)])
        assert engine.prefix_cache.bytes <= engine.prefix_cache.budget_bytes
    assert engine.prefix_cache.evictions > 0


def test_failed_step_fails_its_requests_and_engine_keeps_serving(tiny_model, tokenizer, monkeypatch):
    engine = make_engine(tiny_model, tokenizer)
    bad = make_request(range(10, 15), max_tokens=5)
    original = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda sched: (_ for _ in ()).throw(RuntimeError("boom")))
    outs = list(engine.generate_sync([bad]).values())[0]
    assert outs[-1].finish_reason == FinishReason.ERROR and "RuntimeError" in outs[-1].error
    monkeypatch.setattr(engine.runner, "run", original)
    good = run(engine, [make_request(range(10, 15), max_tokens=5, ignore_eos=True)])
    assert list(good.values())[0] == reference_greedy(tiny_model, list(range(10, 15)), None, 5)


def test_sampling_error_fails_only_that_request(tiny_model, tokenizer, monkeypatch):
    import softserve.engine.model_runner as runner_module

    real_sample = runner_module.sample

    def flaky_sample(logits, params, generators, banned):
        if any(p.top_k == 777 for p in params):
            raise FloatingPointError("bad corner case")
        return real_sample(logits, params, generators, banned)

    monkeypatch.setattr(runner_module, "sample", flaky_sample)
    engine = make_engine(tiny_model, tokenizer)
    bad = make_request(range(10, 16), max_tokens=6, temperature=0.7, top_k=777, seed=1)
    good = [make_request(range(20 + i, 26 + i), max_tokens=6, ignore_eos=True) for i in range(3)]
    outs = engine.generate_sync(good[:1] + [bad] + good[1:])
    assert outs[bad.request_id][-1].finish_reason == FinishReason.ERROR
    for g in good:
        assert [t for o in outs[g.request_id] for t in o.token_ids] == reference_greedy(tiny_model, list(g.prompt_ids), None, 6)


@pytest.mark.parametrize("policy, pauses", [
    (dict(max_batch_size=5, max_background_tokens=1, max_prefill_tokens=40), True),  # few free rows
    # a cap of 4: whole chunks beside interactive prompt tokens, one-token chunks beside interactive decodes
    (dict(max_batch_size=8, max_background_tokens=4, max_prefill_tokens=40), False),
    # tiny batch-only steps; no batch prompt tokens beside interactive rows, except for the row computing
    # the prompt KV an interactive request waits for (with a cap of 0 it would wait forever otherwise)
    # the batch-only steps are 3 tokens: one prefilling row at a time, so nothing pauses mid-prefill
    (dict(max_batch_size=8, max_background_tokens=0, max_background_step_tokens=3), False),
])
def test_paused_batch_rows_keep_their_kv_and_outputs(tiny_model, tokenizer, policy, pauses):
    """Batch (background) rows held back while interactive ones run (a prompt-token cap, few free rows)
    and in short batch-only steps, so they pause mid-prefill and mid-decode, keeping their KV: every
    output is still the reference's. The rows-per-step figure counts only the rows in the step."""
    specs = _mixed_specs()
    engine = make_engine(tiny_model, tokenizer, background_grace_s=0, background_hold_s=0, **policy)
    batch = [make_request(ids, soft_prompt=sp, max_tokens=6, ignore_eos=True) for ids, sp in specs[:4]]
    live = [make_request(ids, soft_prompt=sp, max_tokens=10, ignore_eos=True) for ids, sp in specs[4:]]
    for request in batch:
        request.background = True
        engine.add_request(request)
    got: dict[str, list[int]] = {r.request_id: [] for r in batch + live}
    paused_prefill = paused_decode = 0
    for step in range(400):
        if step == 1:
            for request in live:
                engine.add_request(request)
        outputs = engine.step()
        for out in outputs:
            got[out.request_id].extend(out.token_ids)
        paused = [r for r in engine.scheduler.running if r.paused_since is not None]
        # the step's rows were running when it was scheduled, paused ones not among them
        assert engine.last_step_rows + len(paused) <= engine.num_running + sum(out.finished for out in outputs)
        paused_decode += any(r.num_output_tokens > 0 for r in paused)
        paused_prefill += any(r.num_output_tokens == 0 and r.num_computed_tokens > 0 for r in paused)
        if not engine.has_unfinished():
            break
    assert (paused_prefill > 0 and paused_decode > 0) == pauses and all(r.is_finished for r in batch + live)
    for request, (ids, sp) in zip(batch + live, specs):
        assert got[request.request_id] == reference_greedy(tiny_model, ids, sp, request.sampling.max_tokens)


def test_the_engine_thread_waits_out_the_hold_instead_of_spinning_through_empty_steps(tiny_model, tokenizer):
    """After interactive work leaves, batch rows are held back (--background-hold-seconds): the engine
    thread sleeps on its command queue until the hold ends, then runs them; their tokens are the
    reference's. Without the wait it scheduled empty steps in a loop (thousands in 0.3 s)."""
    import asyncio

    from softserve.engine.async_engine import AsyncEngine

    engine = make_engine(tiny_model, tokenizer, max_background_tokens=0, background_grace_s=0, background_hold_s=0.3)
    live = make_request(range(10, 16), max_tokens=3, ignore_eos=True)
    row = make_request(range(20, 27), max_tokens=3, ignore_eos=True)
    row.background = True
    loop_engine = AsyncEngine(engine)
    loop_engine.start()

    async def tokens(request) -> list[int]:
        return [t for out in [o async for o in loop_engine.generate(request)] for t in out.token_ids]

    async def main():
        return await asyncio.gather(tokens(live), tokens(row))

    try:
        got_live, got_row = asyncio.run(main())
    finally:
        loop_engine.stop()
    assert got_live == reference_greedy(tiny_model, list(live.prompt_ids), None, 3)
    assert got_row == reference_greedy(tiny_model, list(row.prompt_ids), None, 3)
    assert row.first_scheduled_step > live.finished_step  # a cap of 0: the batch row waited for live and the hold
    assert engine.scheduler.step_count - engine.steps_run <= 3  # empty schedules: the hold's, not a spin
