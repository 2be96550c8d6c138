"""Prompt tuning on the resident frozen model: only P [k, hidden] (fp32) is learned.

    inputs_embeds = cat(P, embed(ids))      right padding, attention mask 1 on P and real tokens
    loss          = token-mean cross entropy over labels != -100 (labels of P are -100), as PEFT

With `method="prefix"` (PEFT PREFIX_TUNING) the learned tensor is every layer's KV at k positions
(softserve/tuning/prefix.py), the rest of the loop (data order, AdamW, schedule, clipping, evals,
checkpoints) is the same. Prefix jobs always train alone: a pack's rows share one `inputs_embeds`
forward, a prefix row needs its own `past_key_values` of its own length, so it is not packed.

The model is never modified: its weights keep `requires_grad=False`, it stays in eval mode (the
serving engine runs the same object), no `.grad` is ever created on it. Autograd only tracks the
path back to P.

Sharing the model with the serving engine: every unit of work (one micro-batch forward+backward,
one optimizer update, one eval forward) runs while holding `step_lock`, the lock the engine thread
takes around each `engine.step()`, so a training forward never interleaves with a serving forward.
Between units the trainer calls `yield_fn` (default: sleep(0)), which lets a waiting engine step
in and can throttle training while requests are being served.

Deterministic for a seed: init, data order and all math (same shapes, same order) are fixed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from softserve.tuning.config import TuningConfig
from softserve.tuning.data import TokenizedExample
from softserve.tuning.generate import greedy_generate
from softserve.tuning.init import init_prompt
from softserve.tuning.pack import PackEntry, TrainingPack, packed_loss_sums, pad_token_id
from softserve.tuning.prefix import PrefixEncoder, prefix_greedy_generate, prefix_loss_sum, prefix_shape

log = logging.getLogger("softserve.tuning")

__all__ = ["TuningConfig", "StepInfo", "TuningResult", "TuningCancelled", "PromptTuner", "greedy_generate"]


class TuningCancelled(Exception):
    pass


@dataclass(frozen=True)
class StepInfo:
    step: int
    total_steps: int
    loss: float | None  # training loss of this step (None for an eval-only report at step 0)
    learning_rate: float
    elapsed_s: float
    eta_s: float | None
    tokens: int  # real tokens processed so far (prompt + target, no virtual tokens)
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    is_best: bool = False  # this eval is the lowest eval loss so far
    stopping: bool = False  # early stopping ends the run after this step

    def line(self) -> str:
        parts = [f"step {self.step}/{self.total_steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.eval_loss is not None:
            parts.append(f"eval_loss {self.eval_loss:.4f}")
        if self.eval_accuracy is not None:
            parts.append(f"eval_acc {self.eval_accuracy:.3f}")
        parts.append(f"lr {self.learning_rate:.2e}")
        parts.append(f"{self.elapsed_s:.0f}s")
        if self.eta_s is not None:
            parts.append(f"ETA {_fmt_eta(self.eta_s)}")
        return "  ".join(parts)


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


@dataclass
class TuningResult:
    embeddings: torch.Tensor  # [k, hidden] float32, CPU; prefix: [k, layers * 2 * kv_heads * head_dim]
    history: list[StepInfo] = field(default_factory=list)
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    steps_done: int = 0  # < config.steps when early stopping ended the run
    best_step: int | None = None  # step of the lowest eval loss (None without periodic evals)
    best_eval_loss: float | None = None
    stopped_early: bool = False


class PromptTuner:
    def __init__(
        self,
        model,
        tokenizer,
        train: list[TokenizedExample],
        eval: list[TokenizedExample] | None = None,
        config: TuningConfig = TuningConfig(),
        *,
        step_lock=None,
        on_progress: Callable[[StepInfo], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        yield_fn: Callable[[float], None] | None = None,
        initial_prompt: torch.Tensor | None = None,
        pack: TrainingPack | None = None,
    ) -> None:
        config.validate()
        if not train:
            raise ValueError("no training examples")
        self.model = model
        self.tokenizer = tokenizer
        self.train_data = train
        self.eval_data = eval or []
        self.config = config
        self.lock = step_lock if step_lock is not None else contextlib.nullcontext()
        self.on_progress = on_progress
        self.should_stop = should_stop or (lambda: False)
        self.yield_fn = yield_fn or (lambda _busy_s: time.sleep(0))
        param = next(model.parameters())
        self.device, self.model_dtype = param.device, param.dtype
        from softserve.engine.engine import eos_token_ids

        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)
        k = config.num_virtual_tokens
        self.prefix = config.method == "prefix"
        # None: this job trains alone (its units are its own forwards). Prefix jobs always do (module doc).
        self.pack = None if self.prefix else pack
        self.encoder: PrefixEncoder | None = None
        if self.prefix:
            if initial_prompt is not None:
                raise ValueError("initial_prompt is for prompt tuning")
            self.shape = prefix_shape(model)
            self.encoder = PrefixEncoder(k, self.shape, projection=config.prefix_projection,
                                         encoder_hidden_size=config.encoder_hidden_size, seed=config.seed,
                                         device=self.device)
            # PEFT's names (embedding.weight, transform.0.weight, ...): checkpoint keys and optimizer order
            self.params = dict(self.encoder.named_parameters())
        else:
            if initial_prompt is None:
                initial_prompt = init_prompt(model, tokenizer, k, config.init, config.init_text, seed=config.seed)
            self.prompt = torch.nn.Parameter(initial_prompt.detach().to(self.device, torch.float32).clone())
            self.params = {"prompt": self.prompt}
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=config.learning_rate, weight_decay=config.weight_decay,
            betas=(0.9, 0.999), eps=1e-8
        )
        import inspect

        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.micro = min(config.micro_batch_size or config.batch_size, config.batch_size)
        self._gen = torch.Generator().manual_seed(config.seed)
        self._order: list[int] = []
        self.steps_done = 0
        self.tokens = 0
        self.train_time = 0.0
        self.last_eval: tuple[float | None, float | None] = (None, None)
        self.best_prompt: torch.Tensor | None = None
        self.best_step: int | None = None
        self.best_eval_loss: float | None = None
        self.bad_evals = 0

    # ---- data ---------------------------------------------------------------------------------
    def _next_batch(self) -> list[TokenizedExample]:
        batch = []
        while len(batch) < self.config.batch_size:
            if not self._order:
                self._order = torch.randperm(len(self.train_data), generator=self._gen).tolist()
            batch.append(self.train_data[self._order.pop(0)])
        return batch

    # ---- math ---------------------------------------------------------------------------------
    def trainable(self) -> torch.Tensor:
        """What the forward uses, with its graph back to the parameters: P, or the prefix KV."""
        return self.encoder() if self.encoder is not None else self.prompt

    @torch.no_grad()
    def servable(self) -> torch.Tensor:
        """The tensor a PEFT adapter file holds and the engine serves (fp32, CPU)."""
        return self.trainable().detach().to("cpu", torch.float32).clone()

    def _loss_sum(self, prompt: torch.Tensor, rows: list[TokenizedExample]) -> tuple[torch.Tensor, int]:
        """Sum of token losses over labelled positions, and their count (a pack of one)."""
        if self.prefix:
            return prefix_loss_sum(self.model, prompt, rows, self.shape, pad_id=self.pad_id,
                                   model_dtype=self.model_dtype, logits_to_keep=self._logits_to_keep)
        return packed_loss_sums(self.model, [PackEntry(prompt, rows)], pad_id=self.pad_id,
                                model_dtype=self.model_dtype, logits_to_keep=self._logits_to_keep)[0]

    def _lr_at(self, step: int) -> float:
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return c.learning_rate * (step + 1) / c.warmup_steps
        if c.lr_schedule == "constant":
            return c.learning_rate
        span = max(1, c.steps - c.warmup_steps)
        return c.learning_rate * max(0.0, (c.steps - step) / span)

    def _unit(self, fn):
        """Run one unit of work under the step lock, then yield to the engine."""
        if self.should_stop():
            raise TuningCancelled()
        t0 = time.perf_counter()
        with self.lock:
            result = fn()
        self.yield_fn(time.perf_counter() - t0)
        return result

    def train_step(self, step: int) -> tuple[float, int]:
        if self.pack is None:
            return self._train_step(step)
        self.pack.enter_step()  # from here until the update, the pack waits for this job's units
        try:
            return self._train_step(step)
        finally:
            self.pack.leave_step()

    def _train_step(self, step: int) -> tuple[float, int]:
        batch = self._next_batch()
        # P comes first (k >= 1), so every labelled real token is predicted from some position.
        total_labelled = max(1, sum(sum(1 for x in r.labels if x != -100) for r in batch))
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        tokens = 0
        for start in range(0, len(batch), self.micro):
            rows = batch[start:start + self.micro]
            if self.pack is not None:  # the unit runs batched with the other jobs' pending units
                if self.should_stop():
                    raise TuningCancelled()
                loss_sum, held_s = self.pack.run_unit(PackEntry(self.prompt, rows), total_labelled)
                self.yield_fn(held_s)
                loss_total += loss_sum
            else:
                def fwd_bwd(rows=rows):
                    loss_sum, _ = self._loss_sum(self.trainable(), rows)
                    (loss_sum / total_labelled).backward()
                    return float(loss_sum.detach())

                loss_total += self._unit(fwd_bwd)
            tokens += sum(len(r.input_ids) for r in rows)
        lr = self._lr_at(step)

        def update():
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.max_grad_norm)
            self.optimizer.step()

        self._unit(update)
        return loss_total / total_labelled, tokens

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, prompt: torch.Tensor | None = None) -> tuple[float, float]:
        """(token-mean eval loss, exact-match accuracy of greedy decoding)."""
        prompt = (self.trainable() if prompt is None else prompt).detach()
        data = self.eval_data
        bs = self.config.eval_batch_size
        loss_sum, count = 0.0, 0
        for start in range(0, len(data), bs):
            rows = data[start:start + bs]
            s, c = self._unit(lambda rows=rows: self._loss_sum(prompt, rows))
            loss_sum, count = loss_sum + float(s), count + c
        max_new = self.config.eval_max_new_tokens or (max(r.num_target_tokens for r in data) + 4)
        correct = 0
        for start in range(0, len(data), bs):
            rows = data[start:start + bs]
            if self.should_stop():
                raise TuningCancelled()
            lock = _YieldingLock(self.lock, self.yield_fn)
            if self.prefix:
                outs = prefix_greedy_generate(self.model, prompt, [r.prompt_ids for r in rows], max_new, self.eos_ids,
                                              self.pad_id, self.shape, lock=lock)
            else:
                outs = greedy_generate(self.model, prompt, [r.prompt_ids for r in rows], max_new, self.eos_ids,
                                       self.pad_id, lock=lock)
            for r, o in zip(rows, outs):
                correct += int(exact_match(self.tokenizer.decode(o, skip_special_tokens=True), r.target))
        return loss_sum / max(1, count), correct / len(data)

    # ---- state (resume) ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Everything the loop needs to continue exactly where it is, between two steps: P, AdamW's
        moments and step, the data-order RNG and the rest of the current epoch's order, the best
        prompt so far. Tensors (safetensors) + JSON-able metadata, never pickle.

        "prompt" is always the servable tensor (for prefix tuning with projection: the projected KV,
        what PEFT saves); prefix jobs also keep every parameter ("param.<PEFT name>", the MLP's too)
        and its AdamW moments ("adam.<PEFT name>.exp_avg", ...)."""
        tensors = {"prompt": self.servable(),
                   "rng_state": self._gen.get_state().clone(),
                   "order": torch.tensor(self._order + [-1], dtype=torch.int64)}  # -1: never empty
        for pname, param in self.params.items():
            key = "adam." if not self.prefix else f"adam.{pname}."  # prompt tuning: the original key names
            if self.prefix:
                tensors[f"param.{pname}"] = param.detach().to("cpu", torch.float32).clone()
            opt = self.optimizer.state.get(param, {})
            for name in ("exp_avg", "exp_avg_sq", "step"):
                if name in opt:
                    tensors[f"{key}{name}"] = torch.as_tensor(opt[name]).detach().to("cpu").clone().reshape(-1)
        if self.best_prompt is not None:
            tensors["best_prompt"] = self.best_prompt.clone()
        meta = {"step": self.steps_done, "tokens": self.tokens, "train_time_s": self.train_time,
                "best_step": self.best_step, "best_eval_loss": self.best_eval_loss, "bad_evals": self.bad_evals,
                "eval_loss": self.last_eval[0], "eval_accuracy": self.last_eval[1],
                "num_virtual_tokens": self.config.num_virtual_tokens, "seed": self.config.seed,
                "method": self.config.method, "prefix_projection": self.config.prefix_projection}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        same = (meta.get("method", "prompt"), bool(meta.get("prefix_projection"))) == \
            (self.config.method, self.config.prefix_projection)
        if (not same or tuple(tensors["prompt"].shape) != tuple(self.servable().shape)
                or meta.get("seed") != self.config.seed):
            raise ValueError("checkpoint does not match this job's method / prompt shape / seed")
        for pname, param in self.params.items():
            source = tensors[f"param.{pname}"] if self.prefix else tensors["prompt"]
            if tuple(source.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint's {pname} has shape {tuple(source.shape)}, expected {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(source.to(self.device, torch.float32))
            key = "adam." if not self.prefix else f"adam.{pname}."
            if f"{key}exp_avg" in tensors:
                self.optimizer.state[param] = {
                    "step": tensors[f"{key}step"].reshape(()).clone(),
                    "exp_avg": tensors[f"{key}exp_avg"].reshape(param.shape).to(self.device).clone(),
                    "exp_avg_sq": tensors[f"{key}exp_avg_sq"].reshape(param.shape).to(self.device).clone(),
                }
        self._gen.set_state(tensors["rng_state"].clone())
        self._order = [int(i) for i in tensors["order"].tolist()[:-1]]
        self.best_prompt = tensors["best_prompt"].clone() if "best_prompt" in tensors else None
        self.steps_done, self.tokens, self.train_time = int(meta["step"]), int(meta["tokens"]), float(meta["train_time_s"])
        self.best_step, self.best_eval_loss = meta.get("best_step"), meta.get("best_eval_loss")
        self.bad_evals = int(meta.get("bad_evals") or 0)
        self.last_eval = (meta.get("eval_loss"), meta.get("eval_accuracy"))

    def _track_best(self, eval_loss: float) -> bool:
        """Record an eval; True when it is the best so far."""
        c = self.config
        if self.best_eval_loss is None or eval_loss < self.best_eval_loss - c.early_stopping_min_delta:
            self.best_eval_loss, self.best_step, self.bad_evals = eval_loss, self.steps_done, 0
            self.best_prompt = self.servable()
            return True
        self.bad_evals += 1
        return False

    # ---- loop ---------------------------------------------------------------------------------
    def run(self) -> TuningResult:
        """Train from `self.steps_done` (0, or where `load_state` put it) to `config.steps`, or
        until early stopping. Bit-identical to an uninterrupted run for the same seed and threads."""
        c = self.config
        history: list[StepInfo] = []
        t_start = time.perf_counter()
        elapsed0 = self.train_time
        stopped_early = False
        if self.eval_data and c.eval_at_start and self.steps_done == 0:
            ev = self.evaluate()
            self.last_eval = ev
            info = StepInfo(0, c.steps, None, self._lr_at(0), time.perf_counter() - t_start, None, 0, *ev)
            history.append(info)
            if self.on_progress:
                self.on_progress(info)
        while self.steps_done < c.steps:
            step = self.steps_done
            t0 = time.perf_counter()
            loss, n = self.train_step(step)
            self.train_time += time.perf_counter() - t0
            self.tokens += n
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss} at step {step + 1}; lower the learning rate")
            self.steps_done = done = step + 1
            ev_loss = ev_acc = None
            is_best = False
            if self.eval_data and ((c.eval_every and done % c.eval_every == 0) or done == c.steps):
                ev_loss, ev_acc = self.evaluate()
                self.last_eval = (ev_loss, ev_acc)
                if c.eval_every:
                    is_best = self._track_best(ev_loss)
                    stopped_early = bool(c.early_stopping_patience) and self.bad_evals >= c.early_stopping_patience
            eta = None if stopped_early else self.train_time / done * (c.steps - done)
            info = StepInfo(done, c.steps, loss, self._lr_at(step), elapsed0 + time.perf_counter() - t_start, eta,
                            self.tokens, ev_loss, ev_acc, is_best=is_best, stopping=stopped_early)
            history.append(info)
            if self.on_progress:
                self.on_progress(info)
            if stopped_early:
                log.info("early stopping at step %d: no eval-loss improvement in %d evals (best %.4f at step %s)",
                         done, self.bad_evals, self.best_eval_loss, self.best_step)
                break
        use_best = c.result_prompt == "best" and self.best_prompt is not None
        final = self.best_prompt if use_best else self.servable()
        return TuningResult(
            embeddings=final.clone(), history=history, eval_loss=self.last_eval[0], eval_accuracy=self.last_eval[1],
            trained_tokens=self.tokens, elapsed_s=elapsed0 + time.perf_counter() - t_start,
            steps_done=self.steps_done, best_step=self.best_step, best_eval_loss=self.best_eval_loss,
            stopped_early=stopped_early,
        )


class _YieldingLock:
    """The step lock, plus a yield to the engine after each release (for decode loops)."""

    def __init__(self, lock, yield_fn) -> None:
        self._lock, self._yield = lock, yield_fn
        self._t0 = 0.0

    def __enter__(self):
        self._lock.__enter__()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._lock.__exit__(*exc)
        self._yield(time.perf_counter() - self._t0)
        return False


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


def exact_match(generated: str, target: str) -> bool:
    """Whitespace-normalised equality (leading/trailing whitespace and runs of spaces ignored)."""
    return normalize_answer(generated) == normalize_answer(target)
