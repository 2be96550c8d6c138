"""Prompt logprobs (scoring): log P(prompt token j | soft prompt, tokens < j) from the prefill's logits.

Position semantics follow vLLM's `prompt_logprobs`: one entry per real prompt token, `None` for the
first (nothing of the request precedes it that we report on), and the soft prompt's virtual tokens
have no entries at all (they are embeddings, not tokens). The logprobs are those of the raw model
distribution (no temperature, top-k/p or grammar mask), fp32 log-softmax as PEFT's forward gives.

In the packed batch a row's prompt may be split over several steps (chunked prefill); every step
adds the logits of the prompt positions it computed for rows that ask, and nothing for other rows.
Cost: (scored positions) x vocab floats in that step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from softserve.engine.request import Request

PromptLogprob = tuple[int, float, tuple[tuple[int, float], ...]]  # (token_id, logprob, top (id, logprob))


@dataclass(frozen=True)
class PromptLogitsSpan:
    """Consecutive prompt positions of one row whose logits this step keeps."""

    request: Request
    first_target: int  # index in prompt_ids of the token the first kept position predicts
    num_positions: int


def scored_positions(request: Request, begin: int, end: int) -> range:
    """Positions in [begin, end) whose logits predict a prompt token (position p predicts token p + 1)."""
    if request.sampling.prompt_logprobs is None:
        return range(0)
    k, n = request.num_virtual_tokens, len(request.prompt_ids)
    return range(max(begin, k), min(end, k + n - 1))


def start_prompt_logprobs(request: Request) -> None:
    """At admission: the first real token has no entry (nothing of the request precedes it)."""
    if request.sampling.prompt_logprobs is not None:
        request.prompt_logprobs = [None]


def record_prompt_logprobs(spans: list[PromptLogitsSpan], logits: torch.Tensor) -> None:
    """Append each span's entries to its request. logits: [sum of num_positions, vocab], in span order."""
    offset = 0
    for span in spans:
        request = span.request
        rows = logits[offset : offset + span.num_positions]
        offset += span.num_positions
        logprobs = torch.log_softmax(rows.float(), dim=-1)  # [positions, vocab]
        targets_list = request.prompt_ids[span.first_target : span.first_target + span.num_positions]
        targets = torch.tensor(targets_list, device=logprobs.device)
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        top_n = request.sampling.prompt_logprobs
        if top_n > 0:
            top_lps, top_ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
            tops = [tuple(zip(ids, lps)) for ids, lps in zip(top_ids.tolist(), top_lps.tolist())]
        else:
            tops = [()] * span.num_positions
        request.prompt_logprobs.extend((tok, lp, top) for tok, lp, top in zip(targets_list, chosen, tops))
