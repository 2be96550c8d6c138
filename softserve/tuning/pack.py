"""Packed training: the jobs training at once on this replica share each forward/backward.

Each job keeps its own soft prompt P_j, optimizer, schedule, seed, data order and checkpoints (its
own `PromptTuner` loop in its own worker thread). Only the unit of work "forward + backward of one
micro-batch" is shared: a job's unit is handed to the `TrainingPack`, which runs the pending units
of all jobs as one batch through the frozen model:

    row of job j  = cat(P_j, embed(ids))  right padded to the longest row of the pack
    loss          = sum_j loss_sum_j / labelled_tokens_j          (one backward)

A row only attends to itself, so the loss of job j depends on P_j alone and d loss / d P_i is
exactly zero for i != j: each job's gradient reaches only its own P. Right padding keeps every real
token at the position it has when the job trains alone (positions count from 0 per row), and padded
positions are masked out. What can differ from training alone is float rounding: the pack's matrix
products have another shape (more rows, a longer padded length), and CPU kernels may block a
reduction differently for another shape. docs/tuning.md shows the measured agreement.

Serving keeps priority: a unit runs under the engine's `step_lock` like a solo unit, and while the
engine has work (`is_busy`) a unit takes pending jobs only up to the cost of the largest single job
unit among them (rows x padded length), so the lock is never held longer than one job's unit would
hold it. With the engine idle, all pending units go in one batch.

The gathering: a job inside `train_step` is "in step". The thread whose arrival completes the set
(every job in step has a unit pending) leads: it runs the batch and wakes the others. A job that is
elsewhere (evaluating, writing a checkpoint, between steps) is not waited for; `gather_s` bounds the
wait for one that is in step but slow to submit (its optimizer update, a throttle sleep).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from softserve.tuning.data import TokenizedExample

__all__ = ["PackEntry", "packed_loss_sums", "TrainingPack", "pad_token_id"]


def pad_token_id(tokenizer, eos_ids) -> int:
    """The id right padding uses (masked out; the same in solo and packed batches)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids or {0})


@dataclass
class PackEntry:
    """One job's micro-batch in a packed forward."""

    prompt: torch.Tensor  # [k, hidden] fp32; the leaf the job's gradient goes to
    rows: list[TokenizedExample]

    @property
    def length(self) -> int:
        return self.prompt.shape[0] + max(len(r.input_ids) for r in self.rows)

    @property
    def cost(self) -> int:
        return len(self.rows) * self.length


def _collate(rows: list[TokenizedExample], width: int, pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """ids, labels, mask of `rows`, right padded to `width` real-token columns (as in training with PEFT)."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return ids.to(device), labels.to(device), mask.to(device)


def packed_loss_sums(model, entries: list[PackEntry], *, pad_id: int, model_dtype: torch.dtype,
                     logits_to_keep: bool) -> list[tuple[torch.Tensor, int]]:
    """One forward over every entry's rows: per entry, the sum of token losses over its labelled
    positions (a tensor with a graph back to its prompt) and their count. With one entry this is the
    solo computation, op for op."""
    device = entries[0].prompt.device
    length = max(e.length for e in entries)
    xs, masks, labels_all = [], [], []
    for e in entries:
        b, k = len(e.rows), e.prompt.shape[0]
        ids, labels, mask = _collate(e.rows, length - k, pad_id, device)
        x = model.get_input_embeddings()(ids)
        p = e.prompt.to(model_dtype).unsqueeze(0).expand(b, -1, -1)
        xs.append(torch.cat([p, x], dim=1))
        masks.append(torch.cat([torch.ones((b, k), dtype=mask.dtype, device=device), mask], dim=1))
        labels_all.append(torch.cat([torch.full((b, k), -100, dtype=labels.dtype, device=device), labels], dim=1))
    x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=0)
    mask = masks[0] if len(masks) == 1 else torch.cat(masks, dim=0)
    labels = labels_all[0] if len(labels_all) == 1 else torch.cat(labels_all, dim=0)
    shift_labels = labels[:, 1:]
    if logits_to_keep:
        # Only positions that predict a labelled token go through the LM head (the vocabulary
        # projection is a large share of the compute on small models).
        keep = (shift_labels != -100).any(0).nonzero().squeeze(-1)
        logits = model(inputs_embeds=x, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
        shift_labels = shift_labels[:, keep]
    else:
        logits = model(inputs_embeds=x, attention_mask=mask, use_cache=False).logits[:, :-1]
    logits = logits.float()
    out = []
    start = 0
    for e in entries:
        n = len(e.rows)
        lg, lb = (logits, shift_labels) if len(entries) == 1 else (logits[start:start + n], shift_labels[start:start + n])
        loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100, reduction="sum")
        out.append((loss, int((lb != -100).sum())))
        start += n
    return out


@dataclass
class _Unit:
    entry: PackEntry
    denominator: int  # the job's labelled tokens in its whole step (token-mean over the step)
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    loss_sum: float | None = None
    error: BaseException | None = None
    held_s: float = 0.0  # how long the unit's batch held the step lock


class TrainingPack:
    """Shared forward/backward units for up to `max_jobs` jobs training at once (see the module doc)."""

    def __init__(self, model, *, step_lock, pad_id: int, is_busy: Callable[[], bool] = lambda: False,
                 gather_s: float = 1.0) -> None:
        import inspect

        self.model = model
        self.lock = step_lock
        self.pad_id = pad_id
        self.is_busy = is_busy
        self.gather_s = gather_s
        param = next(model.parameters())
        self.model_dtype = param.dtype
        self.logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._cond = threading.Condition()
        self._in_step = 0
        self._pending: list[_Unit] = []
        self._leading = False
        self.batches = 0  # packed units run (for tests and benchmarks)
        self.batch_sizes: list[int] = []  # jobs per unit, the last 1000

    @classmethod
    def for_model(cls, model, tokenizer, **kw) -> "TrainingPack":
        from softserve.engine.engine import eos_token_ids

        return cls(model, pad_id=pad_token_id(tokenizer, eos_token_ids(model, tokenizer)), **kw)

    # ---- membership ---------------------------------------------------------------------------
    def enter_step(self) -> None:
        with self._cond:
            self._in_step += 1

    def leave_step(self) -> None:
        with self._cond:
            self._in_step -= 1
            self._cond.notify_all()  # a leader may be waiting for this job's unit

    # ---- units --------------------------------------------------------------------------------
    def run_unit(self, entry: PackEntry, denominator: int) -> tuple[float, float]:
        """Forward + backward of one job's micro-batch, packed with the other jobs' pending units:
        accumulates d(loss_sum / denominator)/dP into `entry.prompt.grad`. Returns (loss_sum, seconds
        the unit's batch held the step lock)."""
        unit = _Unit(entry, denominator, time.monotonic())
        with self._cond:
            self._pending.append(unit)
            self._cond.notify_all()
            while not unit.done.is_set():
                batch = self._take_batch()
                if batch is None:
                    self._cond.wait(self._wait_s())
                    continue
                self._leading = True
                self._cond.release()
                try:
                    self._run_batch(batch)
                finally:
                    self._cond.acquire()
                    self._leading = False
                    self._cond.notify_all()
        if unit.error is not None:
            raise unit.error
        return unit.loss_sum, unit.held_s

    def _wait_s(self) -> float:
        if not self._pending:
            return self.gather_s
        return max(0.001, self._pending[0].arrived + self.gather_s - time.monotonic())

    def _take_batch(self) -> list[_Unit] | None:
        """Under the condition: the units to run now, or None (someone leads, or we wait for more)."""
        if self._leading or not self._pending:
            return None
        complete = len(self._pending) >= self._in_step
        if not complete and time.monotonic() - self._pending[0].arrived < self.gather_s:
            return None
        batch, cost = [], 0
        bound = max(u.entry.cost for u in self._pending) if self.is_busy() else None
        for unit in list(self._pending):
            if bound is not None and batch and cost + unit.entry.cost > bound:
                break
            batch.append(unit)
            cost += unit.entry.cost
        for unit in batch:
            self._pending.remove(unit)
        return batch

    def _run_batch(self, batch: list[_Unit]) -> None:
        t0 = time.perf_counter()
        try:
            with self.lock:
                t0 = time.perf_counter()
                self._forward_backward(batch)
        except Exception:
            if len(batch) == 1:
                batch[0].error = _current_error()
            else:  # one job's data broke the batch: run each alone, so only that job fails
                for unit in batch:
                    try:
                        with self.lock:
                            self._forward_backward([unit])
                    except Exception:
                        unit.error = _current_error()
        held = time.perf_counter() - t0
        self.batches += 1
        self.batch_sizes = (self.batch_sizes + [len(batch)])[-1000:]
        for unit in batch:
            unit.held_s = held
            unit.done.set()

    def _forward_backward(self, batch: list[_Unit]) -> None:
        saved = [None if u.entry.prompt.grad is None else u.entry.prompt.grad.clone() for u in batch]
        try:
            sums = packed_loss_sums(self.model, [u.entry for u in batch], pad_id=self.pad_id,
                                    model_dtype=self.model_dtype, logits_to_keep=self.logits_to_keep)
            total = None
            for unit, (loss_sum, _) in zip(batch, sums):
                term = loss_sum / unit.denominator
                total = term if total is None else total + term
            total.backward()
        except Exception:
            for unit, grad in zip(batch, saved):  # a half-done backward must not leave gradient behind
                unit.entry.prompt.grad = grad
            raise
        for unit, (loss_sum, _) in zip(batch, sums):
            unit.loss_sum = float(loss_sum.detach())


def _current_error() -> BaseException:
    import sys

    return sys.exc_info()[1]
