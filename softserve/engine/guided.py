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

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import llguidance
import llguidance.hf
import torch

from softserve.engine.grammar_limits import GrammarLimits, check_limits
from softserve.engine.grammar_sandbox import GrammarSandbox
from softserve.engine.grammar_worker import GuidedSpecError, new_matcher, run_with_stack
from softserve.engine.grammar_worker import grammar_for as _grammar_for
from softserve.engine.request import GuidedSpec, Request

log = logging.getLogger("softserve.guided")

__all__ = ["KINDS", "GuidedSpecError", "GuidedState", "CompiledGrammar", "GrammarCompiler", "grammar_for",
           "tokenizer_info", "validate", "attach_guided_state", "fill_bitmask", "advance_guided"]

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# The server compiles on a stack 32x the sandbox's (grammar_worker.SANDBOX_STACK_BYTES): a grammar that
# compiled there cannot overflow here. Only touched pages are ever backed by memory.
COMPILE_STACK_BYTES = 256 * 1024 * 1024

_tokenizer_infos: dict[int, llguidance.LLTokenizer] = {}
_tokenizer_lock = threading.Lock()


@dataclass
class GuidedState:
    matcher: llguidance.LLMatcher
    eos_ids: tuple[int, ...]  # the engine's stop tokens: the only choice once the grammar is complete
    vocab_size: int  # the tokenizer's; the model's logits may have a few padding columns more


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar compiled once (per request, or once for all requests while cached): every choice of
    every request gets a copy of this untouched matcher, which shares the compiled grammar."""

    template: llguidance.LLMatcher
    grammar_bytes: int

    def new_matcher(self) -> llguidance.LLMatcher:
        return self.template.deep_copy()


def grammar_for(spec: GuidedSpec) -> str:
    """The llguidance grammar for a spec; GuidedSpecError if it is not valid."""
    return _grammar_for(spec.kind, spec.value)


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


class GrammarCompiler:
    """Untrusted constraint -> CompiledGrammar, never on the engine thread, never able to crash us.

    In order: the cheap bounds (grammar_limits), the sandbox child (a crash or a hang there refuses
    the grammar), then the real compile on a large-stack thread. Results are cached by content, so a
    schema sent again (the common case: one schema, many requests) costs nothing.
    """

    def __init__(self, tokenizer, limits: GrammarLimits = GrammarLimits(), sandbox: GrammarSandbox | None = None,
                 cache_entries: int = 64) -> None:
        self.tokenizer, self.limits, self.sandbox = tokenizer, limits, sandbox
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(spec: GuidedSpec) -> str:
        return hashlib.sha256(f"{spec.kind}\0{spec.value}".encode("utf-8", "surrogatepass")).hexdigest()

    def cached(self, spec: GuidedSpec) -> CompiledGrammar | None:
        key = self._key(spec)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
            return found

    def compile(self, spec: GuidedSpec) -> CompiledGrammar:
        """Blocking (seconds for a big grammar; llguidance releases the GIL): call it from a worker thread."""
        found = self.cached(spec)
        if found is not None:
            return found
        check_limits(spec.kind, spec.value, self.limits)
        if self.sandbox is not None:
            grammar = self.sandbox.check(spec.kind, spec.value)
        else:
            grammar = run_with_stack(COMPILE_STACK_BYTES, grammar_for, spec)
        template = run_with_stack(COMPILE_STACK_BYTES, new_matcher, tokenizer_info(self.tokenizer), grammar)
        compiled = CompiledGrammar(template=template, grammar_bytes=len(grammar))
        with self._lock:
            self._cache[self._key(spec)] = compiled
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return compiled

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()


def validate(spec: GuidedSpec, tokenizer) -> None:
    """Compile a spec once (in-process, on a large stack): GuidedSpecError if it is not valid."""
    GrammarCompiler(tokenizer).compile(spec)


def attach_guided_state(request: Request, tokenizer, eos_ids) -> None:
    """Give a request with `sampling.guided` its own matcher (each of n choices has its own).

    A spec compiled by the service (spec.compiled) is only copied here: the engine thread never
    compiles what a client sent. Direct engine users get an in-process compile on a large stack.
    """
    spec = request.sampling.guided
    if spec is None or request.guided_state is not None:
        return
    compiled = cast("CompiledGrammar | None", spec.compiled)  # GuidedSpec cannot name this module's types
    if compiled is None:
        grammar = run_with_stack(COMPILE_STACK_BYTES, grammar_for, spec)
        matcher = run_with_stack(COMPILE_STACK_BYTES, new_matcher, tokenizer_info(tokenizer), grammar)
    else:
        matcher = compiled.new_matcher()
    request.guided_state = GuidedState(matcher=matcher, eos_ids=tuple(sorted(eos_ids)), vocab_size=len(tokenizer))


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
