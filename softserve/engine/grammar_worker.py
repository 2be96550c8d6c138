"""Building and checking llguidance grammars, and the sandbox process that checks untrusted ones.

llguidance recurses on the native stack while it compiles a grammar; a deep enough grammar (a long
`$ref` chain, thousands of chained Lark rules) overflows it and the process dies with SIGSEGV, which
no `try` can catch. So every new grammar is first compiled here, in a child process
(`python -m softserve.engine.grammar_worker`), on a thread with a SMALL stack. Only a grammar that
compiled there is compiled again in the server, on a thread with a stack many times larger
(softserve/engine/guided.py): the recursion depth depends only on the grammar, so what fit in the
small stack fits in the large one, and a grammar that crashes kills only the child.

This module imports llguidance and the standard library only (no torch): the child starts in
about a second.

Protocol (one JSON object per line): the parent sends the tokenizer first
(`{"tokenizer": <tokenizer.json text>, "n_vocab": int, "eos": int | null, "stack_bytes": int}`), the
child answers `{"ready": true}`; then each job `{"kind": str, "value": str}` is answered
`{"grammar": str}` or `{"error": str}`.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import TYPE_CHECKING

import llguidance

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact JSON (no optional whitespace): a model cannot spend its whole budget on spaces.
JSON_DEFAULTS: JsonCompileOptions = {"whitespace_flexible": False}
SANDBOX_STACK_BYTES = 8 * 1024 * 1024  # the child's compile stack; the server's is COMPILE_STACK_BYTES (guided.py)


class GuidedSpecError(ValueError):
    """The constraint is not a valid grammar (the API turns this into a 400 invalid_grammar)."""


def grammar_for(kind: str, value: str) -> str:
    """The llguidance grammar for a constraint; GuidedSpecError if it is not valid."""
    try:
        if kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(value, defaults=JSON_DEFAULTS)
        elif kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_DEFAULTS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            choices = json.loads(value)
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise GuidedSpecError("choices must be a non-empty list of non-empty strings")
            # JSON string literals are valid Lark string literals (same escapes).
            grammar = llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
        elif kind == "grammar":
            grammar = llguidance.LLMatcher.grammar_from_lark(value)
        else:
            raise GuidedSpecError(f"unknown constraint kind {kind!r}")
    except GuidedSpecError:
        raise
    except Exception as exc:  # llguidance raises ValueError/RuntimeError for malformed input
        raise GuidedSpecError(str(exc)) from exc
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GuidedSpecError(error.strip().splitlines()[0])
    return grammar


def new_matcher(tokenizer_info: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    """Compile a grammar (llguidance drops the GIL while it does); GuidedSpecError if it fails."""
    try:
        matcher = llguidance.LLMatcher(tokenizer_info, grammar)
    except Exception as exc:  # whatever the library raises, a bad constraint stays a ValueError
        raise GuidedSpecError(str(exc)) from exc
    if matcher.is_error():
        raise GuidedSpecError(matcher.get_error())
    return matcher


def run_with_stack(stack_bytes: int, fn, *args):
    """fn(*args) on a fresh thread with exactly this stack size; returns its result or raises its error."""
    result: dict = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    with _stack_size_lock:
        previous = threading.stack_size(stack_bytes)
        try:
            thread = threading.Thread(target=target, name="grammar-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


_stack_size_lock = threading.Lock()  # threading.stack_size is process-wide: set, start, restore


def _check(tokenizer_info: llguidance.LLTokenizer, kind: str, value: str) -> str:
    grammar = grammar_for(kind, value)
    new_matcher(tokenizer_info, grammar)
    return grammar


def _serve(stdin, stdout) -> None:
    hello = json.loads(stdin.readline())
    eos = hello.get("eos")
    tokenizer_info = llguidance.LLTokenizer(hello["tokenizer"], n_vocab=hello["n_vocab"], eos_token=eos)
    stack_bytes = int(hello.get("stack_bytes") or SANDBOX_STACK_BYTES)
    stdout.write(json.dumps({"ready": True}) + "\n")
    stdout.flush()
    for line in stdin:
        job = json.loads(line)
        try:
            reply = {"grammar": run_with_stack(stack_bytes, _check, tokenizer_info, job["kind"], job["value"])}
        except GuidedSpecError as exc:
            reply = {"error": str(exc) or "invalid grammar"}
        except Exception as exc:  # an unexpected library error is still this grammar's fault
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
