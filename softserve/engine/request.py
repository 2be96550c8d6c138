"""The one object that carries a request from HTTP to finish, plus its sampling params and deltas.

Plain Python on purpose (no torch import): the scheduler and its unit tests only ever see these.
The soft prompt's tensor and the sampling generator ride along as opaque handles the model runner
understands. The deltas a request produces are in outputs.py.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from softserve.engine.detokenizer import DetokState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or max_model_len reached
    ABORT = "abort"  # client went away / cancelled
    ERROR = "error"  # this request failed inside the engine; RequestOutput.error_kind says why


class ErrorKind(str, enum.Enum):
    """Why a request finished with FinishReason.ERROR: callers branch on this, never on message text."""

    TIMEOUT = "timeout"  # older than request_timeout_s
    QUEUE_FULL = "queue_full"  # lost a race with the admission check (another request took the last place)
    REJECTED = "rejected"  # the engine refused it at add (e.g. it could never fit the KV pool)
    ENGINE_ERROR = "engine_error"  # its step (or its postprocessing) raised
    ENGINE_DEAD = "engine_dead"  # the engine loop itself died


@dataclass(frozen=True)
class GuidedSpec:
    """A structured-output constraint the generated text must match (enforced in softserve/engine/guided.py)."""

    kind: str  # "json_schema" | "json_object" | "regex" | "choice" | "grammar" (Lark)
    value: str = ""  # the JSON schema as JSON text, the regex, the Lark grammar, or the choices as a JSON list
    # guided.CompiledGrammar, set by the service after a safe compile; None: the engine compiles it itself
    compiled: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-N alternatives per generated token; None = off
    skip_special_tokens: bool = True
    guided: GuidedSpec | None = None
    # Top-N alternatives per prompt position (vLLM's prompt_logprobs); the first real token has none.
    prompt_logprobs: int | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 1e-5

    @property
    def effective_top_k(self) -> int:
        return self.top_k if self.top_k > 0 else 0


@dataclass(frozen=True)
class SoftPromptRef:
    """What a request knows about its soft prompt: enough to log, to key caches and to count tokens."""

    name: str
    version: str
    sha256: str  # content hash: the only key any cache may use
    num_virtual_tokens: int


@dataclass(frozen=True)
class SoftPrompt:
    """The tensor behind a request's prompt. Two kinds, served in the same batch:

    - prompt tuning / P-tuning: `embeddings` [num_virtual_tokens, hidden], prepended to the input
      embeddings; its KV is computed by the model (once per content hash, then cached).
    - prefix tuning (P-tuning v2): `embeddings` is PEFT's `[num_virtual_tokens, layers * 2 * kv_heads *
      head_dim]`: the keys and values of every layer, used as the row's KV at positions 0..k-1 as is.
    """

    ref: SoftPromptRef
    embeddings: Any  # torch.Tensor on the model's device and dtype; shape as above
    kind: str = "prompt_tuning"  # or "prefix_tuning"

    @property
    def is_prefix(self) -> bool:
        return self.kind == "prefix_tuning"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    soft_prompt: SoftPrompt | None = None
    tenant: str = "default"
    arrival_time: float = field(default_factory=time.monotonic)
    # Called exactly once when the request leaves the engine (release prompt-cache pins, metrics).
    on_finish: Callable[["Request"], None] | None = None
    # Per-request engine state lives here, as nano-vllm keeps it on its Sequence: no side maps keyed
    # by request id. The engine drops the heavy parts when the request leaves it (`release_state`).
    detok: DetokState | None = None  # incremental detokenizer and stop strings (the engine sets it at add)
    generator: Any = None  # torch.Generator of its seeded sampling (the runner sets it at admission)
    guided_state: Any = None  # grammar matcher for sampling.guided (softserve/engine/guided.py)
    # Set by the prefill when sampling.prompt_logprobs is set: per prompt position, None or
    # (token_id, logprob, ((top_id, top_logprob), ...)).
    prompt_logprobs: list | None = None
    # Scheduling class (softserve/engine/scheduler.py): `priority` orders a tenant's own waiting requests
    # (lower first, as in vLLM); `background` rows (Batch API lines) only take capacity that no
    # interactive request is waiting for.
    priority: int = 0
    background: bool = False
    # When the scheduler paused this running background row (None: not paused): its timeout clock stops.
    paused_since: float | None = None

    status: RequestStatus = RequestStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    # Step counters, used by tests to prove scheduling properties without wall-clock timing.
    first_scheduled_step: int | None = None
    finished_step: int | None = None
    # KV bookkeeping. The request's sequence is [virtual tokens | prompt | generated];
    # positions 0..num_computed_tokens-1 have their KV in the pool extent starting at kv_offset.
    num_computed_tokens: int = 0
    kv_offset: int | None = None
    cached_prefix: Any = None  # the prompt's cached KV (opaque to the scheduler), copied in at admission

    @property
    def num_virtual_tokens(self) -> int:
        return self.soft_prompt.ref.num_virtual_tokens if self.soft_prompt else 0

    @property
    def prompt_sha256(self) -> str | None:
        return self.soft_prompt.ref.sha256 if self.soft_prompt else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def total_len(self) -> int:
        """Every position this request occupies in the KV cache: virtual + prompt + generated."""
        return self.num_virtual_tokens + len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known positions whose KV is not in the pool yet (1 for a decoding row: its last sampled token)."""
        return self.total_len - self.num_computed_tokens

    @property
    def kv_reservation(self) -> int:
        """Pool slots this request can ever need: every position but the last sampled token's."""
        return self.num_virtual_tokens + len(self.prompt_ids) + max(self.sampling.max_tokens - 1, 0)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def mark_finished(self, reason: FinishReason, step: int | None = None, error: str | None = None,
                      error_kind: ErrorKind | None = None) -> bool:
        """The state change only; called by `Scheduler.finish`, the one place a request finishes
        (which also takes it out of the queues and frees its KV). False if it had finished already."""
        if self.is_finished:
            return False
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.error_kind = error_kind if reason == FinishReason.ERROR else None
        if reason == FinishReason.ERROR and error_kind is None:
            self.error_kind = ErrorKind.ENGINE_ERROR
        self.finished_step = step
        return True

    def release_state(self) -> None:
        """The request left the engine: drop what only a running request needs."""
        self.detok = None
        self.generator = None
        self.guided_state = None
