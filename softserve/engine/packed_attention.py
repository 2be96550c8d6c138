"""Attention over a packed (varlen) batch with KV in the pool: how one forward serves every row.

We keep the HF model code and swap only its attention function (transformers' `AttentionInterface`,
the hook vLLM-style engines use). The runner calls the model once per step on a packed batch
`[1, total_tokens]`: per-token positions (each row counts from 0 in its own sequence), no attention
mask, and `softserve_batch=PackedBatch(...)`, which transformers passes down to every attention
call. There, per layer:

1. the new tokens' K/V (already rotated by the model) are written into the pool at their slots;
2. each row's queries attend to that row's slice of the pool: `[kv_start, kv_start + kv_len)`.

Rows never see each other and no pad token is ever computed. Without `softserve_batch` (tuning,
reference forwards, PEFT) the function is plain SDPA, so the same model object serves both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from softserve.engine.cpu_attention import avoid_native_gqa_on_cpu
from softserve.engine.kv_cache import KVPool

ATTENTION_NAME = "softserve_packed"
BATCH_KWARG = "softserve_batch"
# A 4-D mask makes transformers skip building one (we need none): it is passed through untouched.
NO_MASK = torch.empty(1, 1, 0, 0, dtype=torch.bool)


@dataclass(frozen=True)
class PackedRow:
    q_start: int  # first index of the row's tokens on the packed axis
    q_len: int  # tokens the row computes this step
    kv_start: int  # pool slot of the row's position 0
    kv_len: int  # positions the row's last query sees (everything computed so far, this step included)
    mask: torch.Tensor | None  # [q_len, kv_len] bool, causal with offset; None for a 1-token row


@dataclass(frozen=True)
class PackedBatch:
    pool: KVPool
    write_slots: torch.Tensor  # [total_tokens] int64: the pool slot each packed token's K/V goes to
    rows: tuple[PackedRow, ...]


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """[q_len, kv_len]: query i (at position kv_len - q_len + i) sees keys 0..kv_len - q_len + i."""
    if q_len == 1:
        return None
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device).unsqueeze(1)  # [q_len, 1]
    cols = torch.arange(kv_len, device=device).unsqueeze(0)  # [1, kv_len]
    return cols <= rows + offset


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    batch: PackedBatch | None = kwargs.pop(BATCH_KWARG, None)
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit softcapping is not supported by the packed engine")
    sliding_window = kwargs.get("sliding_window")
    keys, values = batch.pool.layer(module.layer_idx)  # each [kv_heads, capacity, head_dim]
    keys.index_copy_(1, batch.write_slots, key[0])  # key: [1, kv_heads, total_tokens, head_dim]
    values.index_copy_(1, batch.write_slots, value[0])

    _, q_heads, total, head_dim = query.shape  # [1, q_heads, total_tokens, head_dim]
    kv_heads = keys.shape[0]
    groups = q_heads // kv_heads
    tokens_first = query[0].transpose(0, 1).contiguous()  # [total_tokens, q_heads, head_dim]: one copy
    outputs = []
    for row in batch.rows:
        n = row.q_len
        kv_from, mask = row.kv_start, row.mask
        kv_to = row.kv_start + row.kv_len
        if sliding_window is not None and row.kv_len > sliding_window:
            if n == 1:
                kv_from = kv_to - sliding_window
            else:
                cols = torch.arange(row.kv_len, device=query.device).unsqueeze(0)
                rows = torch.arange(n, device=query.device).unsqueeze(1) + (row.kv_len - n)
                mask = mask & (cols > rows - sliding_window)
        # 4-D inputs: torch's fused CPU kernel takes only those (3-D falls back to the ~2x slower math path).
        k = keys[None, :, kv_from:kv_to]  # [1, kv_heads, kv_len, head_dim], a view of the pool
        v = values[None, :, kv_from:kv_to]
        # The query heads of one KV group ride on the sequence axis ([kv_heads, groups * n, head_dim]),
        # so grouped-query attention needs no copy of K/V (the CPU path of native GQA is very slow).
        if n == 1:  # decode: a view, no mask (the one query sees every key of its row)
            q = tokens_first[row.q_start].view(1, kv_heads, groups, head_dim)
            o = F.scaled_dot_product_attention(q, k, v, scale=scaling)  # [1, kv_heads, groups, head_dim]
            outputs.append(o.view(1, q_heads, head_dim))
            continue
        q = tokens_first[row.q_start : row.q_start + n].view(n, kv_heads, groups, head_dim)
        q = q.permute(1, 2, 0, 3).reshape(1, kv_heads, groups * n, head_dim)
        if groups > 1:
            mask = mask.repeat(groups, 1)  # [groups * n, kv_len]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [1, kv_heads, groups * n, head_dim]
        outputs.append(o.view(kv_heads, groups, n, head_dim).permute(2, 0, 1, 3).reshape(n, q_heads, head_dim))
    return torch.cat(outputs).unsqueeze(0), None  # [1, total_tokens, q_heads, head_dim]


def install(model) -> None:
    """Route the model's attention through `packed_attention_forward` (plain SDPA without a batch)."""
    avoid_native_gqa_on_cpu()
    AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
