"""The parent side of the grammar sandbox: a few child processes (grammar_worker.py) that compile
untrusted grammars first, so that a grammar which crashes or hangs the grammar library costs one
child, never the server.

A child that dies while compiling (SIGSEGV on a deep grammar) or runs past the time limit is
replaced; the grammar that did it is refused as invalid (the same input would do it again).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from softserve.engine.grammar_worker import SANDBOX_STACK_BYTES, GuidedSpecError

log = logging.getLogger("softserve.guided")

_START_TIMEOUT_S = 120.0  # python + llguidance + the vocabulary: about a second; generous for a loaded host


class SandboxUnavailable(RuntimeError):
    """No child could be started (the API answers 503): a problem of the server, not of the grammar."""


def tokenizer_json(tokenizer) -> str:
    """The HF fast tokenizer as tokenizer.json text, as llguidance.hf.from_tokenizer sends it to Rust."""
    backend = copy.copy(tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


@dataclass(frozen=True)
class TokenizerSpec:
    """What a child needs to build the same llguidance tokenizer as the server."""

    json_text: str
    n_vocab: int
    eos: int | None

    @classmethod
    def of(cls, tokenizer) -> "TokenizerSpec":
        return cls(tokenizer_json(tokenizer), len(tokenizer), tokenizer.eos_token_id)


class _Child:
    def __init__(self, tokenizer: TokenizerSpec, stack_bytes: int) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "softserve.engine.grammar_worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True,  # a Ctrl-C in the server's terminal is the server's to handle
        )
        hello = {"tokenizer": tokenizer.json_text, "n_vocab": tokenizer.n_vocab, "eos": tokenizer.eos,
                 "stack_bytes": stack_bytes}
        try:
            self._send(hello)
            reply = self._receive(_START_TIMEOUT_S)
        except (OSError, TimeoutError, EOFError) as exc:
            self.kill()
            raise SandboxUnavailable(f"the grammar sandbox did not start: {exc}") from exc
        if not reply.get("ready"):
            self.kill()
            raise SandboxUnavailable(f"the grammar sandbox did not start: {reply}")

    def _send(self, message: dict) -> None:
        assert self.proc.stdin is not None  # started with stdin=PIPE
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def _receive(self, timeout_s: float) -> dict:
        assert self.proc.stdout is not None  # started with stdout=PIPE
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"no answer within {timeout_s:g} s")
        line = self.proc.stdout.readline()  # the child writes whole lines and flushes
        if not line:
            raise EOFError(self._death())
        return json.loads(line)

    def _death(self) -> str:
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        if code < 0:
            try:
                return f"it was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"it was killed by signal {-code}"
        return f"it exited with status {code}"

    def compile(self, kind: str, value: str, timeout_s: float) -> str:
        try:
            self._send({"kind": kind, "value": value})
            reply = self._receive(timeout_s)
        except BrokenPipeError as exc:
            raise EOFError(self._death()) from exc
        if "error" in reply:
            raise GuidedSpecError(reply["error"])
        return reply["grammar"]

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by our own child's PID
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass


class GrammarSandbox:
    """check(kind, value) -> the grammar text, compiled once in a child; blocking, thread-safe.

    At most `workers` compiles run at once; callers wait for a free child. Children start lazily
    and are reused; one that crashed or hung is replaced by the next caller.
    """

    def __init__(self, tokenizer: TokenizerSpec, *, workers: int = 1, timeout_s: float = 10.0,
                 stack_bytes: int = SANDBOX_STACK_BYTES) -> None:
        self.tokenizer, self.timeout_s, self.stack_bytes = tokenizer, timeout_s, stack_bytes
        self._slots: queue.Queue[_Child | None] = queue.Queue()
        for _ in range(workers):
            self._slots.put(None)  # None: a slot whose child is not started yet
        self._all: list[_Child] = []
        self._lock = threading.Lock()
        self._closed = False
        self.crashes = 0  # children lost to a grammar (crash or time limit), for tests and metrics

    def check(self, kind: str, value: str) -> str:
        if self._closed:
            raise SandboxUnavailable("the grammar sandbox is closed")
        child = self._slots.get()
        try:
            if child is None or not child.alive:
                child = self._start()
            started = time.monotonic()
            try:
                return child.compile(kind, value, self.timeout_s)
            except EOFError as exc:
                self.crashes += 1
                log.warning("a grammar crashed the grammar sandbox (%s); refused, child replaced", exc)
                self._forget(child)
                child = None
                raise GuidedSpecError(f"the grammar crashed the grammar compiler ({exc}); simplify it") from exc
            except TimeoutError as exc:
                self.crashes += 1
                log.warning("a grammar ran past %.1f s in the grammar sandbox; refused, child replaced",
                            time.monotonic() - started)
                self._forget(child)
                child = None
                raise GuidedSpecError(f"the grammar took longer than {self.timeout_s:g} s to compile "
                                      "(--guided-compile-timeout); simplify it") from exc
        finally:
            self._slots.put(child)

    def _start(self) -> _Child:
        child = _Child(self.tokenizer, self.stack_bytes)
        with self._lock:
            self._all.append(child)
        return child

    def _forget(self, child: _Child) -> None:
        child.kill()
        with self._lock:
            if child in self._all:
                self._all.remove(child)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            children, self._all = self._all, []
        for child in children:
            child.kill()
