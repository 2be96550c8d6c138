"""Prompt logprobs (scoring): log P(prompt token j | soft prompt, tokens < j) from the prefill's logits.

Position semantics follow vLLM's `prompt_logprobs`: one entry per real prompt token, `None` for the
first (nothing of the request precedes it that we report on), and the soft prompt's virtual tokens
have no entries at all (they are embeddings, not tokens). The logprobs are those of the raw model
distribution (no temperature, top-k/p or grammar mask), fp32 log-softmax as PEFT's forward gives.

The packed forward keeps logits at the scored positions of the rows that ask (besides each sampling
row's last token); rows that do not ask cost nothing. Cost: prompt length x vocab floats per asking row.
"""

from __future__ import annotations

import torch

from server.engine.request import Request

PromptLogprob = tuple[int, float, tuple[tuple[int, float], ...]]  # (token_id, logprob, top (id, logprob))


def start_prompt_logprobs(admitted: list[Request]) -> None:
    """At admission: a row that asks gets its (first-token) entry before any chunk is scored."""
    for request in admitted:
        if request.sampling.prompt_logprobs is not None:
            request.prompt_logprobs = [None]


def prompt_score_span(request: Request, begin: int, end: int) -> range:
    """Positions in begin..end-1 (of [virtual | prompt | generated]) whose logits predict a prompt token.

    Position k + j (k virtual tokens) predicts prompt token j + 1, so the span is the chunk's part of
    k .. k + n - 2. Empty for rows that do not ask.
    """
    if request.sampling.prompt_logprobs is None:
        return range(0)
    k, n = request.num_virtual_tokens, len(request.prompt_ids)
    return range(max(begin, k), min(end, k + n - 1))


def record_prompt_logprobs(spans: list[tuple[Request, range]], logits: torch.Tensor) -> None:
    """Append each span's prompt logprobs to its request. logits: [sum of span lengths, vocab], spans in order.

    Chunked prefill scores a prompt over several steps; chunks arrive in order, so appending keeps
    entry j for prompt token j.
    """
    at = 0
    for request, span in spans:
        rows = logits[at : at + len(span)]  # [len(span), vocab]
        at += len(span)
        k, top_n = request.num_virtual_tokens, request.sampling.prompt_logprobs
        targets = [request.prompt_ids[p - k + 1] for p in span]
        logprobs = torch.log_softmax(rows.float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
        if top_n > 0:
            top_lps, top_ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
            tops = [tuple(zip(ids, lps)) for ids, lps in zip(top_ids.tolist(), top_lps.tolist())]
        else:
            tops = [()] * len(span)
        entries = request.prompt_logprobs if request.prompt_logprobs is not None else [None]
        entries.extend((tok, lp, top) for tok, lp, top in zip(targets, chosen, tops))
        request.prompt_logprobs = entries
