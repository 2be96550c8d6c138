"""Work around a CPU performance cliff in `F.scaled_dot_product_attention(..., enable_gqa=True)`.

transformers' SDPA path asks torch for native GQA whenever the attention mask can be dropped (e.g. a
batch of one row with no padding). On CPU torch 2.13 that kernel is ~100x slower than the alternatives
(measured: 13-27 ms vs 0.1 ms per call for a 1-token decode against 100 cached positions), which made
single-request decode attention-bound. With native GQA off, transformers packs the query heads of
each KV group (decode) or repeats KV heads (prefill) instead — the same math, fast kernels.
"""

from __future__ import annotations

import functools

_patched = False


def avoid_native_gqa_on_cpu() -> None:
    global _patched
    if _patched:
        return
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:  # a transformers without this module has no such path
        return
    original = sdpa_attention.use_gqa_in_sdpa

    @functools.wraps(original)
    def use_gqa_in_sdpa(attention_mask, key, *args, **kwargs):
        if key.device.type == "cpu":
            return False
        return original(attention_mask, key, *args, **kwargs)

    sdpa_attention.use_gqa_in_sdpa = use_gqa_in_sdpa
    _patched = True
