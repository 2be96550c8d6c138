"""Prompt logprobs and max_tokens=0 in the engine: equal to log-softmax of PEFT's forward (fp32, atol 1e-4)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tests.support.engine_utils import make_engine, make_request
from softserve.engine.request import SoftPrompt, SoftPromptRef

TEXTS = ["The capital of France is Paris", "1, 2, 3, 4, 5", "Hello", "A much longer prompt about the sea and the sky"]


@pytest.fixture(scope="module")
def peft_prompts(tiny_model):
    """Two PEFT prompt-tuning models (k = 3, 6) over the tiny model, and the same prompts as SoftPrompts."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    out = {}
    for seed, k in ((0, 3), (1, 6)):
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k, prompt_tuning_init=PromptTuningInit.RANDOM)
        peft_model = get_peft_model(tiny_model, config).eval()
        weight = peft_model.prompt_encoder["default"].embedding.weight
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))
        emb = weight.detach().clone()
        sha = hashlib.sha256(emb.numpy().tobytes()).hexdigest()
        out[k] = (peft_model, SoftPrompt(SoftPromptRef(f"pt{k}", "v", sha, k), emb))
    return out


@torch.inference_mode()
def peft_prompt_logprobs(peft_model, ids: list[int]) -> torch.Tensor:
    """[n - 1, vocab]: log-softmax of PEFT's forward at the positions that predict prompt tokens 1..n-1."""
    logits = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0]
    logits = logits[-len(ids):]  # PEFT's causal-LM forward returns the virtual positions' logits first
    return torch.log_softmax(logits[:-1].float(), dim=-1)


@torch.inference_mode()
def plain_prompt_logprobs(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


@pytest.mark.parametrize("max_prefill_tokens", [4096, 4], ids=["whole-prompts", "chunked-prefill"])
def test_prompt_logprobs_equal_peft_forward_in_a_mixed_batch(tiny_model, tokenizer, peft_prompts, max_prefill_tokens):
    """With a budget of 4 tokens per step every prompt is scored over several steps (chunked prefill)."""
    engine = make_engine(tiny_model, tokenizer, max_prefill_tokens=max_prefill_tokens)
    cases = []
    for i, text in enumerate(TEXTS):
        ids = tokenizer(text).input_ids
        for k in (None, 3, 6):
            soft = peft_prompts[k][1] if k else None
            max_tokens = (0, 2, 5)[(i + (k or 0)) % 3]
            cases.append((make_request(ids, soft_prompt=soft, max_tokens=max_tokens, prompt_logprobs=3), k))
        # A row that does not ask, in the same prefill: no prompt logprobs, generation unchanged.
        cases.append((make_request(ids, max_tokens=3), "none"))
    outputs = engine.generate_sync([r for r, _ in cases])
    checked = 0
    for request, k in cases:
        outs = outputs[request.request_id]
        if k == "none":
            assert all(o.prompt_logprobs is None for o in outs)
            continue
        assert [o.prompt_logprobs is not None for o in outs] == [True] + [False] * (len(outs) - 1)
        got = outs[0].prompt_logprobs
        ids = request.prompt_ids
        assert len(got) == len(ids) and got[0] is None
        ref = plain_prompt_logprobs(tiny_model, ids) if k is None else peft_prompt_logprobs(peft_prompts[k][0], ids)
        for j, entry in enumerate(got[1:]):
            assert entry.token_id == ids[j + 1]
            assert entry.token == tokenizer.decode([ids[j + 1]])
            assert entry.logprob == pytest.approx(float(ref[j, ids[j + 1]]), abs=1e-4)
            top_lp, top_ids = ref[j].topk(3)
            assert [t for t, _, _ in entry.top] == top_ids.tolist()
            assert [lp for _, _, lp in entry.top] == pytest.approx(top_lp.tolist(), abs=1e-4)
            checked += 1
        tokens = [t for o in outs for t in o.token_ids]
        assert len(tokens) == request.sampling.max_tokens or outs[-1].finish_reason.value == "stop"
        assert outs[-1].num_output_tokens == len(tokens)
    assert checked > 30


def test_max_tokens_zero_finishes_without_a_token_and_frees_the_row(tiny_model, tokenizer):
    engine = make_engine(tiny_model, tokenizer, max_batch_size=2)
    score = make_request(tokenizer(TEXTS[0]).input_ids, max_tokens=0, prompt_logprobs=0)
    plain = make_request(tokenizer(TEXTS[1]).input_ids, max_tokens=0)
    later = make_request(tokenizer(TEXTS[2]).input_ids, max_tokens=4)
    outs = engine.generate_sync([score, plain, later])
    for request in (score, plain):
        (only,) = outs[request.request_id]
        assert only.finished and only.finish_reason.value == "length"
        assert only.token_ids == () and only.text == "" and only.num_output_tokens == 0
    assert outs[score.request_id][0].prompt_logprobs[1].top == ()
    assert outs[plain.request_id][0].prompt_logprobs is None
    assert len([t for o in outs[later.request_id] for t in o.token_ids]) == 4
    assert not engine.has_unfinished() and engine.num_running == 0
