"""Guided decoding: per-request grammar state (llguidance) and the batched token mask.

Why llguidance: it compiles a grammar in about a millisecond (each request may bring its own JSON
schema; outlines-core builds a full regex index first, 115 ms for a 4-field schema and far more for
larger ones), handles recursive grammars (any JSON object, Lark) that regex-based indexes cannot,
computes a mask in ~50 us mean on SmolLM2's 49k vocabulary, and is a 3 MB wheel with no dependencies
(xgrammar pulls triton, 286 MB). Numbers: bench/guided_backends.py.

Flow per step: `fill_bitmask` asks every constrained row's matcher for its allowed tokens (on the
host, packed 32 per int32); the sampler unpacks the bits on the device and masks the logits; after
sampling, `advance_guided` feeds each row's token to its matcher. No device->host copy per row.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

import llguidance
import llguidance.hf
import torch

from softserve.engine.request import GuidedSpec, Request

log = logging.getLogger("softserve.guided")

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# Compact JSON (no optional whitespace): a model cannot spend its whole budget on spaces.
_JSON_DEFAULTS = {"whitespace_flexible": False}

_tokenizer_infos: dict[int, llguidance.LLTokenizer] = {}
_tokenizer_lock = threading.Lock()


class GuidedSpecError(ValueError):
    """The constraint is not a valid grammar (the API turns this into a 400)."""


@dataclass
class GuidedState:
    matcher: llguidance.LLMatcher
    eos_ids: tuple[int, ...]  # the engine's stop tokens: the only choice once the grammar is complete
    vocab_size: int  # the tokenizer's; the model's logits may have a few padding columns more


def grammar_for(spec: GuidedSpec) -> str:
    """The llguidance grammar for a spec; GuidedSpecError if it is not valid."""
    try:
        if spec.kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=_JSON_DEFAULTS)
        elif spec.kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_DEFAULTS)
        elif spec.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec.value)
        elif spec.kind == "choice":
            choices = json.loads(spec.value)
            if not choices or not all(isinstance(c, str) and c for c in choices):
                raise GuidedSpecError("choices must be a non-empty list of non-empty strings")
            # JSON string literals are valid Lark string literals (same escapes).
            grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        elif spec.kind == "grammar":
            grammar = llguidance.LLMatcher.grammar_from_lark(spec.value)
        else:
            raise GuidedSpecError(f"unknown constraint kind {spec.kind!r}")
    except GuidedSpecError:
        raise
    except Exception as exc:  # llguidance raises ValueError/RuntimeError for malformed input
        raise GuidedSpecError(str(exc)) from exc
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GuidedSpecError(error.strip().splitlines()[0])
    return grammar


def tokenizer_info(tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of the vocabulary (~1 s to build; cached per tokenizer object).

    Its end token is the tokenizer's EOS, which the engine always treats as a stop token.
    """
    with _tokenizer_lock:
        info = _tokenizer_infos.get(id(tokenizer))
        if info is None:
            info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))
            _tokenizer_infos[id(tokenizer)] = info
        return info


def validate(spec: GuidedSpec, tokenizer) -> None:
    """Check a spec at the edge (and warm the tokenizer cache off the engine thread)."""
    _new_matcher(spec, tokenizer)


def _new_matcher(spec: GuidedSpec, tokenizer) -> llguidance.LLMatcher:
    grammar = grammar_for(spec)
    try:
        matcher = llguidance.LLMatcher(tokenizer_info(tokenizer), grammar)
    except Exception as exc:  # whatever the library raises, a bad constraint stays a ValueError
        raise GuidedSpecError(str(exc)) from exc
    if matcher.is_error():
        raise GuidedSpecError(matcher.get_error())
    return matcher


def attach_guided_state(request: Request, tokenizer, eos_ids) -> None:
    """Give a request with `sampling.guided` its own matcher (each of n choices has its own)."""
    spec = request.sampling.guided
    if spec is None or request.guided_state is not None:
        return
    eos = tuple(sorted(eos_ids))
    matcher = _new_matcher(spec, tokenizer)
    request.guided_state = GuidedState(matcher=matcher, eos_ids=eos, vocab_size=len(tokenizer))


def fill_bitmask(states: list[GuidedState]) -> torch.Tensor:
    """[len(states), ceil(vocab/32)] int32 on the host: bit j of word w allows token 32*w + j."""
    vocab_size = states[0].vocab_size
    words = (vocab_size + 31) // 32
    bitmask = torch.zeros(len(states), words, dtype=torch.int32)
    for row, state in enumerate(states):
        matcher = state.matcher
        if matcher.is_stopped() or matcher.is_error():
            # Complete (or broken): only a stop token may follow, so the request ends now.
            for token in state.eos_ids:
                if token < vocab_size:
                    bitmask[row, token // 32] |= _bit(token % 32)
            continue
        view = bitmask[row]
        matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())
    return bitmask


def _bit(j: int) -> int:
    return (1 << j) if j < 31 else -(1 << 31)  # int32 two's complement for the top bit


def advance_guided(requests: list[Request], token_ids: list[int]) -> None:
    """Feed each constrained row its sampled token (the mask guaranteed it is allowed)."""
    for request, token_id in zip(requests, token_ids):
        state = request.guided_state
        if state is None or state.matcher.is_stopped() or state.matcher.is_error():
            continue
        if not state.matcher.consume_token(token_id):
            log.warning("grammar rejected token %d for %s: %s", token_id, request.request_id,
                        state.matcher.get_error())
