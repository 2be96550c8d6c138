"""Prefix tuning (PEFT PREFIX_TUNING, P-tuning v2) on the resident frozen model.

What is learned is the keys and values of k virtual positions in every layer, PEFT's layout:

    kv [k, num_layers * 2 * kv_heads * head_dim]      columns: (layer, K|V) major, then head, then dim

either directly (`embedding.weight` is kv), or with `prefix_projection` through PEFT's MLP:

    kv = Linear(hidden_e -> width)(tanh(Linear(token_dim -> hidden_e)(E)))     E [k, token_dim]

where token_dim = kv_heads * head_dim (what PEFT uses for GQA models) and hidden_e =
`encoder_hidden_size` (default token_dim). Parameter names and init are PEFT's PrefixEncoder's
(nn.Embedding N(0, 1), nn.Linear's uniform(+-1/sqrt(fan_in))), drawn from a generator seeded by the
job's seed. What is saved and served is always kv (PEFT saves the *projected* tensor too).

The forward is PeftModelForCausalLM's: every row gets the prefix as `past_key_values`, the attention
mask has ones on the k prefix positions, real tokens sit at positions k..k+n-1, and only real tokens
carry labels. The model itself is never modified.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from softserve.tuning.data import TokenizedExample
from softserve.tuning.generate import _cache_kwarg, greedy_decode, left_padded

__all__ = ["PrefixEncoder", "PrefixShape", "prefix_shape", "prefix_loss_sum", "prefix_greedy_generate"]


class PrefixShape:
    """The served model's KV geometry (what one prefix row must match)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int) -> None:
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim

    @property
    def token_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def width(self) -> int:
        return self.num_layers * 2 * self.token_dim


def prefix_shape(model) -> PrefixShape:
    c = model.config.get_text_config()
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return PrefixShape(c.num_hidden_layers, kv_heads, head_dim)


class PrefixEncoder(torch.nn.Module):
    """PEFT's PrefixEncoder in training mode (fp32), with a seeded init. `forward()` -> kv [k, width]."""

    def __init__(self, k: int, shape: PrefixShape, *, projection: bool, encoder_hidden_size: int | None,
                 seed: int, device=None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.projection = projection
        if projection:
            hidden = encoder_hidden_size or shape.token_dim
            self.embedding = torch.nn.Embedding(k, shape.token_dim)
            self.transform = torch.nn.Sequential(torch.nn.Linear(shape.token_dim, hidden), torch.nn.Tanh(),
                                                 torch.nn.Linear(hidden, shape.width))
        else:
            self.embedding = torch.nn.Embedding(k, shape.width)
        with torch.no_grad():  # PEFT's defaults, from our generator (not the global RNG)
            self.embedding.weight.copy_(torch.randn(self.embedding.weight.shape, generator=gen))
            if projection:
                for layer in (self.transform[0], self.transform[2]):
                    bound = 1.0 / math.sqrt(layer.in_features)
                    for p in (layer.weight, layer.bias):
                        p.copy_(torch.rand(p.shape, generator=gen) * 2 * bound - bound)
        self.to(device=device, dtype=torch.float32)

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight  # [k, token_dim] with projection, else [k, width]
        return self.transform(weight) if self.projection else weight


def _cache(kv: torch.Tensor, batch: int, shape: PrefixShape, dtype: torch.dtype):
    """A DynamicCache holding the prefix for `batch` rows (as PeftModel.get_prompt builds it)."""
    from transformers import DynamicCache

    k = kv.shape[0]
    # [k, L*2, heads, hd] -> [L*2, heads, k, hd] -> per layer (K, V), each [batch, heads, k, hd]
    x = kv.to(dtype).view(k, shape.num_layers * 2, shape.kv_heads, shape.head_dim).permute(1, 2, 0, 3)
    x = x.unsqueeze(1).expand(-1, batch, -1, -1, -1)
    return DynamicCache([(x[2 * i], x[2 * i + 1]) for i in range(shape.num_layers)])


def prefix_loss_sum(model, kv: torch.Tensor, rows: list[TokenizedExample], shape: PrefixShape, *, pad_id: int,
                    model_dtype: torch.dtype, logits_to_keep: bool) -> tuple[torch.Tensor, int]:
    """Sum of token losses over labelled positions (graph back to kv) and their count."""
    from softserve.tuning.pack import _collate

    device = kv.device
    b, k = len(rows), kv.shape[0]
    ids, labels, mask = _collate(rows, max(len(r.input_ids) for r in rows), pad_id, device)
    mask = torch.cat([torch.ones((b, k), dtype=mask.dtype, device=device), mask], dim=1)
    kw = {_cache_kwarg(model): _cache(kv, b, shape, model_dtype)}
    shift_labels = labels[:, 1:]
    if logits_to_keep:  # only positions that predict a labelled token go through the LM head
        keep = (shift_labels != -100).any(0).nonzero().squeeze(-1)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=keep, **kw).logits
        shift_labels = shift_labels[:, keep]
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=True, **kw).logits[:, :-1]
    logits = logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    return loss, int((shift_labels != -100).sum())


@torch.no_grad()
def prefix_greedy_generate(model, kv: torch.Tensor, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int],
                           pad_id: int, shape: PrefixShape, lock=None) -> list[list[int]]:
    """Batched greedy decoding with the prefix as every row's KV at positions 0..k-1. Layout
    `[prefix, pad..., x]` with mask 0 on pads and positions counting real tokens, so each row computes
    what it computes alone (and what the serving engine computes). Cut after the first EOS (kept)."""
    lock = lock if lock is not None else contextlib.nullcontext()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n, k = len(prompts), kv.shape[0]
    ids, mask = left_padded(prompts, pad_id, device)
    mask = torch.cat([torch.ones((n, k), dtype=torch.long, device=device), mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, k:]
    with lock:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                    **{_cache_kwarg(model): _cache(kv.to(device), n, shape, dtype)})
    return greedy_decode(model, out, mask, pos[:, -1] + 1, max_new_tokens, eos_ids, lock)
