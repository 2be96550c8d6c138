"""Packed engine steps on the tiny random model: one forward per step, chunked prefill, inline prompt KV, KV pool.

Every check compares token ids with `reference_greedy` (full recompute of [P, prompt, generated], no
cache, no batching) and/or the same request run alone.
"""

from __future__ import annotations

import pytest

from tests.support.engine_utils import make_prompt, make_request, reference_greedy, run
from softserve.engine.config import EngineConfig, SchedulerConfig
from softserve.engine.engine import LLMEngine
from softserve.engine.kv_cache import KVPool

HIDDEN = 64


def engine_with(model, tokenizer, kv_cache_tokens: int | None = None, **sched) -> LLMEngine:
    kv_bytes = 0
    if kv_cache_tokens is not None:
        kv_bytes = kv_cache_tokens * KVPool.bytes_per_token(2, 2, 16, next(model.parameters()).dtype)
    return LLMEngine(model, tokenizer, EngineConfig(scheduler=SchedulerConfig(**sched), kv_cache_bytes=kv_bytes, model_id="t"))


class ForwardCounter:
    """Counts real calls of the model (a forward hook), independent of the runner's own counter."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def close(self):
        self._handle.remove()


def test_one_forward_per_step_with_decode_new_rows_and_cold_prompts_together(tiny_model, tokenizer):
    engine = engine_with(tiny_model, tokenizer)
    counter = ForwardCounter(tiny_model)
    try:
        cold_a, cold_b = make_prompt("cold-a", 7, HIDDEN, 31), make_prompt("cold-b", 3, HIDDEN, 32)
        early = make_request(range(100, 106), max_tokens=10, ignore_eos=True)
        engine.add_request(early)
        first = engine.step()  # early is decoding from now on
        late = [
            make_request(range(200, 209), soft_prompt=cold_a, max_tokens=6, ignore_eos=True),
            make_request(range(300, 304), soft_prompt=cold_b, max_tokens=6, ignore_eos=True),
            make_request(range(400, 412), max_tokens=6, ignore_eos=True),
        ]
        for request in late:
            engine.add_request(request)
        sched_before = engine.scheduler.step_count
        got = {r.request_id: [] for r in late}
        got[early.request_id] = [t for out in first for t in out.token_ids]
        steps_with_everything = 0
        original = engine.runner.run

        def spy(sched):
            nonlocal steps_with_everything
            if sched.decode and sched.prefill and any(row.computes_prefix for row in sched.rows):
                steps_with_everything += 1
            return original(sched)

        engine.runner.run = spy
        while engine.has_unfinished():
            for out in engine.step():
                got[out.request_id].extend(out.token_ids)
        assert steps_with_everything == 1  # the step after the arrivals held all three kinds of work
        assert counter.calls == engine.steps_run == engine.runner.forward_passes
        assert engine.steps_run == engine.scheduler.step_count - sched_before + 1
        assert got[early.request_id] == reference_greedy(tiny_model, list(early.prompt_ids), None, 10)
        for request in late:
            assert got[request.request_id] == reference_greedy(
                tiny_model, list(request.prompt_ids), request.soft_prompt, 6)
        assert len(engine.prefix_cache) == 2  # both cold prompts were filed from that same forward
    finally:
        counter.close()


def test_chunked_prefill_of_a_long_prompt_equals_reference_and_solo(tiny_model, tokenizer):
    prompt = make_prompt("long", 12, HIDDEN, 41)
    ids = list(range(1000, 1045))
    decoding = make_request(range(50, 54), max_tokens=30, ignore_eos=True)
    engine = engine_with(tiny_model, tokenizer, max_prefill_tokens=8)
    engine.add_request(decoding)
    first = engine.step()
    long = make_request(ids, soft_prompt=prompt, max_tokens=5, ignore_eos=True)
    engine.add_request(long)
    chunks = []
    original = engine.runner.run

    def spy(sched):
        chunks.extend((row.start, row.num_tokens) for row in sched.rows if row.request is long and row.start < 57)
        return original(sched)

    engine.runner.run = spy
    got = {decoding.request_id: [t for out in first for t in out.token_ids], long.request_id: []}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
    # 12 virtual + 45 prompt tokens = 57 positions, eight per step while the other row keeps decoding.
    assert chunks == [(8 * i, 8) for i in range(7)] + [(56, 1)]
    expected = reference_greedy(tiny_model, ids, prompt, 5)
    assert got[long.request_id] == expected
    solo = run(engine_with(tiny_model, tokenizer), [make_request(ids, soft_prompt=prompt, max_tokens=5, ignore_eos=True)])
    assert list(solo.values())[0] == expected
    assert got[decoding.request_id] == reference_greedy(tiny_model, list(decoding.prompt_ids), None, 30)


def test_64_concurrent_requests_16_prompts_equal_solo_and_reference(tiny_model, tokenizer):
    ks = [1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 64]
    prompts = [make_prompt(f"p{k}", k, HIDDEN, 500 + k) for k in ks] + [None]  # 16: fifteen prompts and none
    specs = [(list(range(600 + 7 * i, 600 + 7 * i + 2 + i % 11)), prompts[i % 16], 3 + i % 5) for i in range(64)]
    requests = [make_request(ids, soft_prompt=sp, max_tokens=m, ignore_eos=True) for ids, sp, m in specs]
    batched = run(engine_with(tiny_model, tokenizer, max_batch_size=64), requests)
    for request, (ids, sp, m) in zip(requests, specs):
        reference = reference_greedy(tiny_model, ids, sp, m)
        assert batched[request.request_id] == reference, (request.request_id, sp and sp.ref.name)
    for request, (ids, sp, m) in list(zip(requests, specs))[::7]:
        solo = run(engine_with(tiny_model, tokenizer), [make_request(ids, soft_prompt=sp, max_tokens=m, ignore_eos=True)])
        assert list(solo.values())[0] == batched[request.request_id]


def test_pool_too_small_for_all_requests_queues_them_and_all_finish(tiny_model, tokenizer):
    """64 requests of 1,500 tokens against a pool of 8,000 token slots: admission waits, nothing fails."""
    engine = engine_with(tiny_model, tokenizer, kv_cache_tokens=8000, max_batch_size=64, max_queue=100)
    requests = [make_request([(31 * i + j) % 40000 + 100 for j in range(1500)], max_tokens=3, ignore_eos=True)
                for i in range(64)]
    for request in requests:
        engine.add_request(request)
    most_running = 0
    got = {r.request_id: [] for r in requests}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.token_ids)
            assert out.error is None
        most_running = max(most_running, engine.num_running)
        assert engine.scheduler.kv.used_tokens <= 8000
    assert most_running == 8000 // 1502  # 5 rows fit at a time
    assert all(r.finish_reason.value == "length" and len(got[r.request_id]) == 3 for r in requests)
    for request in requests[:2] + requests[-1:]:
        assert got[request.request_id] == reference_greedy(tiny_model, list(request.prompt_ids), None, 3)


def test_engine_refuses_a_pool_smaller_than_one_request(tiny_model, tokenizer):
    with pytest.raises(ValueError, match="KV pool holds"):
        engine_with(tiny_model, tokenizer, kv_cache_tokens=100, max_model_len=512)


def test_prefix_tuning_rows_equal_peft_in_a_mixed_batch(tiny_model, tokenizer, tmp_path):
    """PEFT PREFIX_TUNING (P-tuning v2) rows next to prompt-tuned and plain rows, each == PEFT's own forward."""
    import copy

    import torch
    from peft import PeftModel, PrefixTuningConfig, get_peft_model
    from safetensors.torch import load_file

    from softserve.engine.request import SoftPrompt, SoftPromptRef

    base = copy.deepcopy(tiny_model)
    adapters = {}
    for k, seed in ((5, 1), (11, 2)):
        peft_model = get_peft_model(copy.deepcopy(tiny_model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k))
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            weight = peft_model.prompt_encoder["default"].embedding.weight
            weight.copy_(torch.randn(weight.shape, generator=gen))
        peft_model.save_pretrained(tmp_path / f"prefix{k}")
        tensor = load_file(tmp_path / f"prefix{k}" / "adapter_model.safetensors")["prompt_embeddings"]
        adapters[k] = SoftPrompt(SoftPromptRef(f"prefix{k}", "v", f"sha-prefix{k}", k), tensor, kind="prefix_tuning")

    @torch.inference_mode()
    def peft_greedy(k: int, ids: list[int], max_tokens: int) -> list[int]:
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / f"prefix{k}").eval()
        ids, out = list(ids), []
        for _ in range(max_tokens):
            logits = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
            out.append(int(logits[0, -1].argmax()))
            ids.append(out[-1])
        return out

    tuned = make_prompt("tuned", 6, HIDDEN, 77)
    cases = [(adapters[5], list(range(100, 108))), (tuned, list(range(200, 205))), (None, list(range(300, 311))),
             (adapters[11], list(range(400, 403))), (adapters[5], list(range(500, 513)))]
    requests = [make_request(ids, soft_prompt=sp, max_tokens=7, ignore_eos=True) for sp, ids in cases]
    got = run(engine_with(tiny_model, tokenizer, max_prefill_tokens=9), requests)
    for request, (sp, ids) in zip(requests, cases):
        if sp is not None and sp.is_prefix:
            expected = peft_greedy(sp.ref.num_virtual_tokens, ids, 7)
        else:
            expected = reference_greedy(tiny_model, ids, sp, 7)
        assert got[request.request_id] == expected, sp and sp.ref.name
    assert len({tuple(got[r.request_id]) for r in requests}) == len(requests)  # the prefixes do change the output


def test_wrong_prompt_shape_is_refused_at_add_not_in_the_batch(tiny_model, tokenizer):
    import torch

    from softserve.engine.request import SoftPrompt, SoftPromptRef

    engine = engine_with(tiny_model, tokenizer)
    bad = SoftPrompt(SoftPromptRef("bad", "v", "sha-bad", 4), torch.zeros(4, 63), kind="prefix_tuning")
    with pytest.raises(ValueError, match="expected"):
        engine.add_request(make_request([1, 2, 3], soft_prompt=bad))
    assert not engine.has_unfinished()


def test_sliding_window_model_equals_its_own_full_recompute(tokenizer):
    """A Mistral-style model with a 6-token sliding window: packed attention applies the window too."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(1)
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=6, initializer_range=0.3)
    model = MistralForCausalLM(config).eval()
    prompt = make_prompt("sw", 4, HIDDEN, 61)
    cases = [(list(range(100, 120)), prompt), (list(range(300, 303)), None), (list(range(500, 511)), prompt)]
    requests = [make_request(ids, soft_prompt=sp, max_tokens=8, ignore_eos=True) for ids, sp in cases]
    got = run(engine_with(model, tokenizer, max_prefill_tokens=7, max_model_len=256), requests)
    for request, (ids, sp) in zip(requests, cases):
        assert got[request.request_id] == reference_greedy(model, ids, sp, 8)
    no_window = MistralForCausalLM(MistralConfig(**{**config.to_dict(), "sliding_window": None})).eval()
    no_window.load_state_dict(model.state_dict())
    assert reference_greedy(no_window, cases[0][0], prompt, 8) != got[requests[0].request_id]  # the window matters
