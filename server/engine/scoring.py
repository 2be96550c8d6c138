"""Prompt logprobs (scoring): log P(prompt token j | soft prompt, tokens < j) from the prefill's logits.

Position semantics follow vLLM's `prompt_logprobs`: one entry per real prompt token, `None` for the
first (nothing of the request precedes it that we report on), and the soft prompt's virtual tokens
have no entries at all (they are embeddings, not tokens). The logprobs are those of the raw model
distribution (no temperature, top-k/p or grammar mask), fp32 log-softmax as PEFT's forward gives.

The prefill keeps the full [rows, positions, vocab] logits only when some row in it asks; rows that
do not ask are not scored. Cost: rows x max prompt length x vocab floats for that one forward.
"""

from __future__ import annotations

import torch

from server.engine.request import Request

PromptLogprob = tuple[int, float, tuple[tuple[int, float], ...]]  # (token_id, logprob, top (id, logprob))


def prompt_logits_to_keep(requests: list[Request]) -> int:
    """`logits_to_keep` for a prefill: 0 (all positions) if any row wants prompt logprobs, else 1."""
    return 0 if any(r.sampling.prompt_logprobs is not None for r in requests) else 1


def record_prompt_logprobs(requests: list[Request], logits: torch.Tensor) -> None:
    """Store each asking row's prompt logprobs on its request. logits: [rows, positions, vocab].

    Rows are left-padded: row i's n_i prompt tokens occupy its last n_i positions.
    """
    for i, request in enumerate(requests):
        top_n = request.sampling.prompt_logprobs
        if top_n is None:
            continue
        n = len(request.prompt_ids)
        entries: list[PromptLogprob | None] = [None]
        if n > 1:
            # Position j's logits predict token j + 1.
            logprobs = torch.log_softmax(logits[i, -n:-1, :].float(), dim=-1)  # [n - 1, vocab]
            targets = torch.tensor(request.prompt_ids[1:], device=logprobs.device)
            chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
            if top_n > 0:
                top_lps, top_ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
                tops = [tuple(zip(ids, lps)) for ids, lps in zip(top_ids.tolist(), top_lps.tolist())]
            else:
                tops = [()] * (n - 1)
            entries += [(tok, lp, top) for tok, lp, top in zip(request.prompt_ids[1:], chosen, tops)]
        request.prompt_logprobs = entries
