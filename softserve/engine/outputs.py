"""What the engine hands out: the runner's per-step result to the scheduler, and per-request deltas
to callers. Plain Python (no torch), like request.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from softserve.engine.request import ErrorKind, FinishReason


@dataclass(frozen=True)
class RowLogprobs:
    """The runner's logprobs of one sampled token, ids only (the engine adds token text)."""

    chosen: float
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), best first


@dataclass(frozen=True)
class RunnerOutput:
    """What the model runner produced for `SchedulerOutput.scheduled`, in that order."""

    sampled_token_ids: list[int]
    logprobs: list[RowLogprobs | None] | None = None  # per row, opaque to the scheduler
    failed_rows: dict[int, str] = field(default_factory=dict)  # row index -> error (that row only)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]  # (token_id, token, logprob), best first


@dataclass(frozen=True)
class RequestOutput:
    """A delta: what happened to one request in one engine step."""

    request_id: str
    text: str  # new text since the previous delta (stop strings already cut)
    token_ids: tuple[int, ...]  # new token ids since the previous delta
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # in the first delta only
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_virtual_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None  # set when finish_reason is ERROR
