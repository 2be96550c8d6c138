"""The second architecture: a tiny random Gemma 3 (text), built from a config, served by the packed engine.

Gemma 3 differs from the Llama family where it matters to us: embeddings scaled inside the embedding
module, q/k norms, sliding-window layers beside full-attention ones (each with its own rotary base),
and (1 + weight) RMSNorms. The embedded GGUF we ship is Llama; no Gemma 3 GGUF can be fetched here, so
these tests stand in for "Gemma 3 still served exactly": fp32 engine == full recompute, and the bf16
engine on its CPU fast paths (packed and fused linears, the native attention kernel's bf16 path, which
head_dim 64 takes, over sliding-window and full layers; compiled too, slow) == the bf16 full
recompute of the same weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_packed_steps import engine_with
from tests.support.engine_utils import make_prompt, make_request, reference_greedy, run

HIDDEN = 64
CASES = [(list(range(100, 120)), True), (list(range(300, 303)), False), (list(range(500, 511)), True)]


def tiny_gemma3(vocab: int, dtype: torch.dtype = torch.float32, sliding: bool = True):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(3)
    layer_types = ["sliding_attention", "full_attention"] * 2 if sliding else ["full_attention"] * 4
    # untied LM head: with a tied one, a random model's greedy output just repeats its last input token
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                              sliding_window=6, layer_types=layer_types, initializer_range=0.3,
                              tie_word_embeddings=False, attn_implementation="eager")
    return Gemma3ForCausalLM(config).to(dtype).eval()


def _requests_and_references(model):
    prompt = make_prompt("g", 4, HIDDEN, 61)
    cases = [(ids, prompt if with_prompt else None) for ids, with_prompt in CASES]
    requests = [make_request(ids, soft_prompt=sp, max_tokens=8, ignore_eos=True) for ids, sp in cases]
    return requests, [reference_greedy(model, ids, sp, 8) for ids, sp in cases]


def test_fp32_engine_equals_full_recompute_and_the_window_matters(tokenizer):
    model = tiny_gemma3(len(tokenizer))
    requests, references = _requests_and_references(model)
    got = run(engine_with(model, tokenizer, max_prefill_tokens=7, max_model_len=256), requests)
    assert [got[r.request_id] for r in requests] == references
    assert len({tuple(ref) for ref in references}) == len(references)
    full = tiny_gemma3(len(tokenizer), sliding=False)
    full.load_state_dict(model.state_dict())
    assert reference_greedy(full, CASES[0][0], make_prompt("g", 4, HIDDEN, 61), 8) != references[0]


def _bf16_engine_equals_full_recompute(tokenizer, compiled: bool):
    model = tiny_gemma3(len(tokenizer), torch.bfloat16)
    requests, references = _requests_and_references(model)
    engine = engine_with(model, tokenizer, max_prefill_tokens=7, max_model_len=256)
    attention = model.model.layers[0].self_attn
    if getattr(attention.q_proj, "_softserve_packed", None) is None:
        pytest.skip("this torch build packs no bf16 linears")
    # fused: the siblings' weights are row slices of one concatenated weight
    assert attention.k_proj.weight.untyped_storage().data_ptr() == attention.q_proj.weight.untyped_storage().data_ptr()
    from softserve.engine import native_kernels

    assert engine.runner.native_kernels == native_kernels.load()  # where the kernels build, this runs them
    if compiled:
        engine.runner.use_compiled_forward(True)
        engine.runner.warm_up()
    got = run(engine, requests)
    assert [got[r.request_id] for r in requests] == references


def test_bf16_engine_on_its_fast_paths_equals_full_recompute(tokenizer):
    _bf16_engine_equals_full_recompute(tokenizer, compiled=False)


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_bf16_compiled_engine_equals_full_recompute(tokenizer):
    _bf16_engine_equals_full_recompute(tokenizer, compiled=True)
