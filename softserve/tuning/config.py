"""What one tuning run is asked to do (`TuningConfig`): its defaults are the defaults of `softserve tune`
and of the tuning-jobs API. No torch here, so building the CLI parser or the API schema stays cheap."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TuningConfig", "INIT_METHODS", "LR_SCHEDULES", "RESULT_PROMPTS", "METHODS", "MAX_ENCODER_HIDDEN",
           "default_init", "default_result_prompt"]

INIT_METHODS = ("text", "random", "vocab")
METHODS = ("prompt", "prefix")  # PEFT PROMPT_TUNING | PREFIX_TUNING
MAX_ENCODER_HIDDEN = 65536  # the store refuses larger encoder_hidden_size in uploaded configs too
LR_SCHEDULES = ("linear", "constant")
RESULT_PROMPTS = ("last", "best")


@dataclass(frozen=True)
class TuningConfig:
    method: str = "prompt"  # prompt (P [k, hidden] before the input) | prefix (every layer's KV at k positions)
    prefix_projection: bool = False  # prefix only: learn E [k, kv_dim] and PEFT's 2-layer MLP instead of the KV
    encoder_hidden_size: int | None = None  # prefix_projection's MLP width (default: kv_heads * head_dim, as PEFT)
    num_virtual_tokens: int = 8
    init: str = "text"  # text | random | vocab
    init_text: str | None = None
    steps: int = 100
    learning_rate: float = 3e-2
    batch_size: int = 8
    micro_batch_size: int | None = None  # gradient accumulation unit (and lock-holding unit); None = batch_size
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "linear"  # linear (decay to 0 after warm-up) | constant
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at the end only (when there is eval data)
    eval_at_start: bool = False
    eval_batch_size: int = 16
    eval_max_new_tokens: int | None = None  # default: longest eval target + 4 tokens
    max_length: int = 1024  # real tokens per example
    early_stopping_patience: int = 0  # stop after this many evals without eval-loss improvement (0: off)
    early_stopping_min_delta: float = 0.0  # an eval improves when eval_loss < best - min_delta
    result_prompt: str = "last"  # last | best (the prompt of the lowest eval loss seen)

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.method == "prefix" and self.init != "random":
            raise ValueError("method 'prefix' starts from PEFT's random init: init must be 'random' (no init_text)")
        if self.method != "prefix" and (self.prefix_projection or self.encoder_hidden_size is not None):
            raise ValueError("prefix_projection and encoder_hidden_size need method 'prefix'")
        if self.encoder_hidden_size is not None:
            if not self.prefix_projection:
                raise ValueError("encoder_hidden_size needs prefix_projection")
            if not 1 <= self.encoder_hidden_size <= MAX_ENCODER_HIDDEN:
                raise ValueError(f"encoder_hidden_size must be between 1 and {MAX_ENCODER_HIDDEN}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {list(INIT_METHODS)}, got {self.init!r}")
        if self.init == "text" and not (self.init_text and self.init_text.strip()):
            raise ValueError("init 'text' needs init_text")
        for name in ("num_virtual_tokens", "steps", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError("learning_rate must be a positive number")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}")
        if self.warmup_steps < 0 or self.eval_every < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, eval_every and weight_decay must be >= 0")
        if self.early_stopping_patience < 0 or self.early_stopping_min_delta < 0:
            raise ValueError("early_stopping_patience and early_stopping_min_delta must be >= 0")
        if self.early_stopping_patience and not self.eval_every:
            raise ValueError("early stopping needs eval_every > 0 (and validation data)")
        if self.result_prompt not in RESULT_PROMPTS:
            raise ValueError(f"result_prompt must be one of {list(RESULT_PROMPTS)}")


def default_init(init: str | None, init_text: str | None, method: str = "prompt") -> str:
    """`init` when given, else random for prefix tuning (PEFT's only init there), else text when there
    is an init_text, else vocab."""
    return init or ("random" if method == "prefix" else "text" if init_text else "vocab")


def default_result_prompt(result_prompt: str | None, early_stopping_patience: int) -> str:
    """`result_prompt` when given, else best with early stopping, else last."""
    return result_prompt or ("best" if early_stopping_patience else "last")
