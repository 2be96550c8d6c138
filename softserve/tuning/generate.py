"""Batched greedy decoding with a soft prompt, for the trainer's exact-match evaluation."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["greedy_generate"]


def _cache_kwarg(model) -> str:
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`[pad..., x]` per row: the ids and a mask with 0 on the pads (every row ends at the same column)."""
    n, longest = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((n, longest), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p, device=device)
        mask[i, longest - len(p):] = 1
    return ids, mask


def greedy_decode(model, out, mask: torch.Tensor, next_pos: torch.Tensor, max_new_tokens: int, eos_ids: set[int],
                  lock) -> list[list[int]]:
    """The greedy loop after the prompt's forward `out`: argmax, then one token per row per step through
    the KV cache (`mask` grows by a column a step, `next_pos` [n] is each row's next position). A row's
    ids are cut after its first EOS (kept); the loop ends when every row has one or at max_new_tokens."""
    kw = _cache_kwarg(model)
    n = mask.shape[0]
    cache = _out_cache(out)
    logits = out.logits[:, -1]
    outs: list[list[int]] = [[] for _ in range(n)]
    done = [False] * n
    for step in range(max_new_tokens):
        tokens = logits.float().argmax(-1)
        for i in range(n):
            if not done[i]:
                t = int(tokens[i])
                outs[i].append(t)
                if t in eos_ids:
                    done[i] = True
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long, device=mask.device)], dim=1)
        with lock:
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                        use_cache=True, **{kw: cache})
        cache = _out_cache(out)
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    return outs


@torch.no_grad()
def greedy_generate(
    model,
    prompt: torch.Tensor | None,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    lock=None,
) -> list[list[int]]:
    """Batched greedy decoding of `[P, x]` per row (KV cache). Layout `[P, pad..., x]`: mask 0 on
    pads and positions counting real tokens, so each row computes what it computes alone. Generated
    ids are cut after the first EOS (which is kept)."""
    lock = lock if lock is not None else contextlib.nullcontext()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = len(prompts)
    ids, mask = left_padded(prompts, pad_id, device)
    x = model.get_input_embeddings()(ids)
    if prompt is not None:
        k = prompt.shape[0]
        x = torch.cat([prompt.to(device=device, dtype=dtype).unsqueeze(0).expand(n, -1, -1), x], dim=1)
        mask = torch.cat([torch.ones((n, k), dtype=torch.long, device=device), mask], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with lock:
        out = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, use_cache=True)
    return greedy_decode(model, out, mask, pos[:, -1] + 1, max_new_tokens, eos_ids, lock)
