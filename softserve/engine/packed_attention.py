"""Attention over a packed (varlen) batch with KV in the pool: how one forward serves every row.

We keep the HF model code and swap only its attention function (transformers' `AttentionInterface`,
the hook vLLM-style engines use). The runner calls the model once per step on a packed batch
`[1, total_tokens]`: per-token positions (each row counts from 0 in its own sequence), no attention
mask, and `softserve_batch=PackedBatch(...)`, which transformers passes down to every attention
call. There, per layer:

1. the new tokens' K/V (already rotated by the model) are written into the pool at their slots;
2. each row's queries attend to that row's slice of the pool: `[kv_start, kv_start + kv_len)`.

Step 2 runs batched (`batched_attention`). On CPU with the native kernels (native_kernels.py), ONE
kernel call per layer attends every query of the step over its own row's slots of the pool, read in
place: decode rows and prefill rows of up to `NATIVE_PREFILL_MAX_KV` positions (a prefill row's
query i sees its row's first `kv_len - q_len + i + 1` positions); longer prefill rows keep one SDPA
call beside it. Without the kernels, the rows are split into a decode group (one query each) and a
prefill group (several), and each group is ONE `scaled_dot_product_attention` call per layer over its
rows' KV gathered from the pool into a padded `[rows, kv_heads, max_kv_len, head_dim]` with a
boolean mask. The extents, gather indices and masks (`AttentionPlan`) are built once per step and
shared by every layer. `reference_attention` is the per-row loop it replaced (one SDPA per row per layer):
the tests hold the batched path equal to it, and `PackedBatch.plan=None` selects it.

Rows never see each other and no pad token's output is ever used. Without `softserve_batch` (tuning,
reference forwards, PEFT) the function is plain SDPA, so the same model object serves both.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from softserve.engine import native_kernels
from softserve.engine.cpu_attention import avoid_native_gqa_on_cpu
from softserve.engine.kv_cache import KVPool

ATTENTION_NAME = "softserve_packed"
BATCH_KWARG = "softserve_batch"
# Passed by the compiled forward when our kernels are on: its graph calls their C++ attention op
# (csrc/step_attention.cpp) instead of the Python one. A kwarg, so the choice is a constant of the trace.
NATIVE_OP_KWARG = "softserve_native_op"
# A 4-D mask makes transformers skip building one (we need none): it is passed through untouched.
NO_MASK = torch.empty(1, 1, 0, 0, dtype=torch.bool)


@dataclass(frozen=True)
class PackedRow:
    q_start: int  # first index of the row's tokens on the packed axis
    q_len: int  # tokens the row computes this step
    kv_start: int  # pool slot of the row's position 0
    kv_len: int  # positions the row's last query sees (everything computed so far, this step included)


@dataclass
class RowGroup:
    """Rows attended in one SDPA call: queries and KV padded to the group's longest, indices on the device.

    Padding never produces NaN: a padded key slot repeats the row's last written slot (masked out), and a
    padded query repeats the row's last query (its output is dropped).
    """

    num_rows: int
    max_q: int
    max_kv: int
    token_index: torch.Tensor  # [rows * max_q] packed index of each (row, query); pads repeat the row's last
    kv_index: torch.Tensor  # [rows * max_kv] pool slot of each (row, key); pads repeat the row's last
    query_pos: torch.Tensor  # [rows, max_q] each query's position in its row's sequence
    valid: torch.Tensor | None  # [rows * max_q] flat indices of the real queries; None when there is no pad
    dense: bool  # every query sees every key of its padded row: no mask needed (without a sliding window)
    only_row_kv: tuple[int, int] | None  # a group of one row: its (kv_start, kv_len), read as a view (no gather)
    in_order: bool  # one query per row, rows first on the packed axis in order: the queries are a view (no gather)
    # decode rows only: each row's (kv_start, kv_len) [rows] int64 on the CPU, for the kernel that reads the
    # pool in place (native_kernels.py); None: the gather + SDPA path
    native_extents: tuple[torch.Tensor, torch.Tensor] | None = None
    _masks: dict = field(default_factory=dict)  # (sliding_window, groups) -> [rows, 1, groups * max_q, max_kv]

    @classmethod
    def build(cls, rows: list[PackedRow], device, native: bool = False) -> RowGroup:
        max_q = max(r.q_len for r in rows)
        max_kv = max(r.kv_len for r in rows)
        q_start = torch.tensor([r.q_start for r in rows]).unsqueeze(1)
        q_len = torch.tensor([r.q_len for r in rows]).unsqueeze(1)
        kv_start = torch.tensor([r.kv_start for r in rows]).unsqueeze(1)
        kv_len = torch.tensor([r.kv_len for r in rows]).unsqueeze(1)
        i = torch.arange(max_q).unsqueeze(0)  # [1, max_q]
        j = torch.arange(max_kv).unsqueeze(0)  # [1, max_kv]
        token_index = q_start + torch.minimum(i, q_len - 1)  # [rows, max_q]
        query_pos = torch.minimum(kv_len - q_len + i, kv_len - 1)  # causal: query i of a row sits at kv_len - q_len + i
        kv_index = kv_start + torch.minimum(j, kv_len - 1)  # [rows, max_kv]
        valid_mask = (i < q_len).flatten()
        valid = None if bool(valid_mask.all()) else valid_mask.nonzero().squeeze(1)
        dense = max_q == 1 and all(r.kv_len == max_kv for r in rows)

        def to_device(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=True)

        only_row_kv = (rows[0].kv_start, rows[0].kv_len) if len(rows) == 1 else None
        in_order = max_q == 1 and all(r.q_start == n for n, r in enumerate(rows))
        extents = (kv_start.squeeze(1), kv_len.squeeze(1)) if native and max_q == 1 else None
        return cls(len(rows), max_q, max_kv, to_device(token_index.flatten()), to_device(kv_index.flatten()),
                   to_device(query_pos), None if valid is None else to_device(valid), dense, only_row_kv, in_order,
                   extents)

    def mask(self, sliding_window: int | None, groups: int) -> torch.Tensor | None:
        """[rows, 1, groups * max_q, max_kv] bool (query heads of a KV group ride on the query axis), built once per step."""
        if self.dense and (sliding_window is None or self.max_kv <= sliding_window):
            return None
        key = (sliding_window, groups)
        mask = self._masks.get(key)
        if mask is None:
            cols = torch.arange(self.max_kv, device=self.query_pos.device)
            pos = self.query_pos.unsqueeze(2)  # [rows, max_q, 1]
            mask = cols <= pos
            if sliding_window is not None:
                mask = mask & (cols > pos - sliding_window)
            mask = mask.repeat(1, groups, 1).unsqueeze(1)  # [rows, 1, groups * max_q, max_kv]
            self._masks[key] = mask
        return mask


# Prefill rows go through the C++ kernel (one query at a time, each over its causal extent of the pool)
# only up to this many positions; longer ones keep the gather + one SDPA call, whose blocked kernel
# re-reads K/V less. Measured by bench/native_attention.py (bf16, SmolLM2's shape, 2 threads): beside
# 13 decode rows, 3 rows of 40 new tokens over 104 positions are 1.31x faster in the kernel, a 256-token
# prompt 1.10x; a 512-token prompt is 0.87x, a 1024-token one 0.72x.
NATIVE_PREFILL_MAX_KV = 256


def token_extents(rows, skip=()) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each packed token's (kv_start, kv_len) [total_tokens] int64: query i of a row sees its row's
    first kv_len - q_len + i + 1 positions (causal); the tokens of the rows in `skip` get kv_len 0 (the
    kernel leaves them to the caller). None where the rows do not tile the packed axis."""
    total = sum(r.q_len for r in rows)
    # Python lists, one tensor each at the end: per-row tensor ops cost more host time than the whole loop.
    starts, lengths, covered = [0] * total, [0] * total, [False] * total
    for r in rows:
        end = r.q_start + r.q_len
        if end > total:
            return None
        covered[r.q_start : end] = [True] * r.q_len
        if r in skip:
            continue
        starts[r.q_start : end] = [r.kv_start] * r.q_len
        lengths[r.q_start : end] = range(r.kv_len - r.q_len + 1, r.kv_len + 1)
    if not all(covered):
        return None
    return torch.tensor(starts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)


@dataclass
class AttentionPlan:
    """The step's rows split into a decode group (one query each) and a prefill group (several). On the
    native path (CPU), one call of the C++ kernel attends every token (`native_tokens`), but those of
    prefill rows over NATIVE_PREFILL_MAX_KV positions, which stay in `prefill` (gather + one SDPA)."""

    decode: RowGroup | None
    prefill: RowGroup | None
    identity: bool  # only decode rows, in packed order: the decode output IS the layer output
    # every packed token's (kv_start, kv_len) for the one native call per layer (kv_len 0: a `prefill` row's)
    native_tokens: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def build(cls, rows: tuple[PackedRow, ...], device, native_decode: bool = False) -> AttentionPlan:
        """native_decode: the C++ kernel attends the decode rows and the prefill rows of at most
        NATIVE_PREFILL_MAX_KV positions, all in one call per layer (CPU only; native_kernels.py)."""
        decode = [r for r in rows if r.q_len == 1]
        prefill = [r for r in rows if r.q_len > 1]
        identity = not prefill and all(r.q_start == n for n, r in enumerate(decode))
        if native_decode:
            long_rows = [r for r in prefill if r.kv_len > NATIVE_PREFILL_MAX_KV]
            extents = token_extents(rows, skip=set(long_rows))
            if extents is not None:
                return cls(None, RowGroup.build(long_rows, device) if long_rows else None, False, extents)
        return cls(RowGroup.build(decode, device, native_decode) if decode else None,
                   RowGroup.build(prefill, device) if prefill else None, identity)


@dataclass(frozen=True)
class PaddedTokens:
    """A step padded to fixed shapes for a CUDA graph (cuda_graphs.py): every packed token is one query over
    its own causal extent of the pool (a prompt chunk's token i sees its row's first kv_len - q_len + i + 1
    positions), its keys gathered to `kv_bucket` positions; the extents live on the device, so no host
    work runs per layer."""

    kv_start: torch.Tensor  # [tokens] int64: pool slot of the token's row's position 0
    kv_len: torch.Tensor  # [tokens] int64: positions the token sees (1..kv_bucket)
    kv_bucket: int


@dataclass(frozen=True)
class PackedBatch:
    pool: KVPool
    write_slots: torch.Tensor  # [total_tokens] int64: the pool slot each packed token's K/V goes to
    rows: tuple[PackedRow, ...]
    plan: AttentionPlan | None = None  # None: the per-row reference loop
    native_writes: bool = False  # new K/V into the pool by the C++ copy (native_kernels.py), not two index_copy_
    padded: PaddedTokens | None = None  # a step padded for a CUDA graph (cuda_graphs.py): `rows` and `plan` unused


def native_step(batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(kv_start, kv_len) of every packed token when the whole step is our kernels' (KV writes and one kernel
    call per layer, no SDPA group, no padding): what `softserve_native::step_attention` runs in C++."""
    plan = batch.plan
    if not batch.native_writes or batch.padded is not None or plan is None or plan.prefill is not None:
        return None
    return plan.native_tokens


def padded_token_attention(padded: PaddedTokens, tokens_first, keys, values, sliding_window, scaling) -> torch.Tensor:
    """Each token's query over its own extent of the pool, every shape fixed by (tokens, kv_bucket):
    [tokens, q_heads, d]. Built from device tensors only (no host value, no sync), so that a CUDA graph
    replays it with other extents. Each token gathers its row's keys again: on a GPU that costs far less
    than the launches it saves (cuda_graphs.MAX_GATHERED_BYTES bounds it)."""
    rows, q_heads, head_dim = tokens_first.shape  # a "row" here is one token
    kv_heads = keys.shape[0]
    groups = q_heads // kv_heads
    bucket = padded.kv_bucket
    j = torch.arange(bucket, device=keys.device)  # [kv_bucket]
    kv_len = padded.kv_len.unsqueeze(1)  # [rows, 1]
    index = (padded.kv_start.unsqueeze(1) + torch.minimum(j, kv_len - 1)).flatten()  # [rows * kv_bucket]
    k = keys.index_select(1, index).view(kv_heads, rows, bucket, head_dim).transpose(0, 1)  # [rows, kv_heads, kv_bucket, d]
    v = values.index_select(1, index).view(kv_heads, rows, bucket, head_dim).transpose(0, 1)
    visible = j < kv_len  # [rows, kv_bucket]
    if sliding_window is not None:
        visible = visible & (j >= kv_len - sliding_window)  # the query sits at kv_len - 1
    q = tokens_first.view(rows, kv_heads, groups, head_dim)  # a KV group's query heads ride on the query axis
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :], scale=scaling)
    return o.reshape(rows, q_heads, head_dim)


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor | None:
    """[q_len, kv_len]: query i (at position kv_len - q_len + i) sees keys 0..kv_len - q_len + i."""
    if q_len == 1:
        return None
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device).unsqueeze(1)  # [q_len, 1]
    cols = torch.arange(kv_len, device=device).unsqueeze(0)  # [1, kv_len]
    return cols <= rows + offset


def _attend_group(group: RowGroup, tokens_first, keys, values, sliding_window, scaling) -> torch.Tensor:
    """One SDPA call for the group's rows: returns [rows * max_q, q_heads, head_dim] (pads included)."""
    _, q_heads, head_dim = tokens_first.shape
    kv_heads = keys.shape[0]
    groups = q_heads // kv_heads
    rows, max_q, max_kv = group.num_rows, group.max_q, group.max_kv
    if group.native_extents is not None:  # decode rows, each read from its own extent of the pool in place
        q = tokens_first[:rows] if group.in_order else tokens_first.index_select(0, group.token_index)
        kv_start, kv_len = group.native_extents
        return native_kernels.decode_attention(q, keys, values, kv_start, kv_len, sliding_window,
                                                 scaling if scaling is not None else head_dim**-0.5)
    if group.only_row_kv is not None:  # one row: its extent of the pool as is, [1, kv_heads, kv_len, d]
        start, length = group.only_row_kv
        k, v = keys[None, :, start : start + length], values[None, :, start : start + length]
    else:  # gather every row's keys: [kv_heads, rows * max_kv, d] -> [rows, kv_heads, max_kv, d] (a strided view)
        k = keys.index_select(1, group.kv_index).view(kv_heads, rows, max_kv, head_dim).transpose(0, 1)
        v = values.index_select(1, group.kv_index).view(kv_heads, rows, max_kv, head_dim).transpose(0, 1)
    # [rows * max_q, q_heads, d]
    q = tokens_first[:rows] if group.in_order else tokens_first.index_select(0, group.token_index)
    # The query heads of one KV group ride on the query axis, so grouped-query attention needs no copy
    # of K/V (the CPU path of native GQA is very slow): [rows, kv_heads, groups * max_q, d].
    if max_q == 1:
        q = q.view(rows, kv_heads, groups, head_dim)
    else:
        q = q.view(rows, max_q, kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4).reshape(rows, kv_heads, groups * max_q, head_dim)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=group.mask(sliding_window, groups), scale=scaling)
    if max_q == 1:
        return o.reshape(rows, q_heads, head_dim)
    o = o.view(rows, kv_heads, groups, max_q, head_dim).permute(0, 3, 1, 2, 4)  # [rows, max_q, kv_heads, groups, d]
    return o.reshape(rows * max_q, q_heads, head_dim)


def batched_attention(plan: AttentionPlan, tokens_first, keys, values, sliding_window, scaling) -> torch.Tensor:
    """The whole packed batch in at most two calls: the native kernel (every row it takes) plus SDPA for
    longer prefill rows, or without the kernel SDPA for decode rows and for prefill rows: [total, q_heads, d]."""
    if plan.native_tokens is not None:
        kv_start, kv_len = plan.native_tokens
        out = native_kernels.decode_attention(tokens_first, keys, values, kv_start, kv_len, sliding_window,
                                                scaling if scaling is not None else tokens_first.shape[-1] ** -0.5)
        if plan.prefill is None:
            return out
    elif plan.identity:
        return _attend_group(plan.decode, tokens_first, keys, values, sliding_window, scaling)
    else:
        out = torch.empty_like(tokens_first)
    for group in (plan.decode, plan.prefill):
        if group is None:
            continue
        o = _attend_group(group, tokens_first, keys, values, sliding_window, scaling)
        index = group.token_index
        if group.valid is not None:
            o, index = o.index_select(0, group.valid), index.index_select(0, group.valid)
        out.index_copy_(0, index, o)
    return out


def reference_attention(rows, tokens_first, keys, values, sliding_window, scaling) -> torch.Tensor:
    """One SDPA per row: the straightforward form of `batched_attention`, kept as its reference."""
    _, q_heads, head_dim = tokens_first.shape
    kv_heads = keys.shape[0]
    groups = q_heads // kv_heads
    device = tokens_first.device
    outputs = []
    for row in rows:
        n = row.q_len
        kv_from, mask = row.kv_start, causal_mask(n, row.kv_len, device)
        kv_to = row.kv_start + row.kv_len
        if sliding_window is not None and row.kv_len > sliding_window:
            if n == 1:
                kv_from = kv_to - sliding_window
            else:
                cols = torch.arange(row.kv_len, device=device).unsqueeze(0)
                positions = torch.arange(n, device=device).unsqueeze(1) + (row.kv_len - n)
                mask = mask & (cols > positions - sliding_window)
        # 4-D inputs: torch's fused CPU kernel takes only those (3-D falls back to the ~2x slower math path).
        k = keys[None, :, kv_from:kv_to]  # [1, kv_heads, kv_len, head_dim], a view of the pool
        v = values[None, :, kv_from:kv_to]
        if n == 1:  # decode: a view, no mask (the one query sees every key of its row)
            q = tokens_first[row.q_start].view(1, kv_heads, groups, head_dim)
            o = F.scaled_dot_product_attention(q, k, v, scale=scaling)  # [1, kv_heads, groups, head_dim]
            outputs.append(o.view(1, q_heads, head_dim))
            continue
        q = tokens_first[row.q_start : row.q_start + n].view(n, kv_heads, groups, head_dim)
        q = q.permute(1, 2, 0, 3).reshape(1, kv_heads, groups * n, head_dim)
        if groups > 1:
            mask = mask.repeat(groups, 1)  # [groups * n, kv_len]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [1, kv_heads, groups * n, head_dim]
        outputs.append(o.view(kv_heads, groups, n, head_dim).permute(2, 0, 1, 3).reshape(n, q_heads, head_dim))
    return torch.cat(outputs)


def attend_packed(batch: PackedBatch, layer_idx: int, query, key, value, sliding_window, scaling) -> torch.Tensor:
    """query [1, q_heads, T, d], key/value [1, kv_heads, T, d] -> [1, T, q_heads, d]; writes the new K/V into the pool."""
    keys, values = batch.pool.layer(layer_idx)  # each [kv_heads, capacity, head_dim]
    if batch.native_writes:
        native_kernels.write_kv(keys, values, key[0], value[0], batch.write_slots)
    else:
        keys.index_copy_(1, batch.write_slots, key[0])  # key: [1, kv_heads, total_tokens, head_dim]
        values.index_copy_(1, batch.write_slots, value[0])
    tokens_first = query[0].transpose(0, 1)  # [total_tokens, q_heads, head_dim]
    plan = batch.plan
    if plan is None or plan.native_tokens is None or plan.prefill is not None:
        tokens_first = tokens_first.contiguous()  # one copy for the SDPA paths; the native kernel alone reads the view
    if batch.padded is not None:
        out = padded_token_attention(batch.padded, tokens_first, keys, values, sliding_window, scaling)
    elif plan is not None:
        out = batched_attention(batch.plan, tokens_first, keys, values, sliding_window, scaling)
    else:
        out = reference_attention(batch.rows, tokens_first, keys, values, sliding_window, scaling)
    return out.unsqueeze(0)  # [1, total_tokens, q_heads, head_dim]


_step = threading.local()  # .batch: the PackedBatch of the compiled forward running in this thread


@contextmanager
def current_batch(batch: PackedBatch):
    """Hands `batch` to the attention of a forward that cannot take it as a kwarg (the compiled one)."""
    _step.batch = batch
    try:
        yield
    finally:
        _step.batch = None


def step_batch() -> PackedBatch | None:
    return getattr(_step, "batch", None)


@contextmanager
def native_step_attention(batch: PackedBatch):
    """Hands a step that our kernels run whole (`native_step`) to `softserve_native::step_attention` for the
    forward inside; any other step leaves that op passing every layer to the Python op."""
    extents = native_step(batch)
    if extents is None:
        yield
        return
    native_kernels.set_step_attention(batch.pool.layer_keys, batch.pool.layer_values, batch.write_slots, *extents)
    try:
        yield
    finally:
        native_kernels.clear_step_attention()


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    batch: PackedBatch | None = kwargs.pop(BATCH_KWARG, None)
    native_op = kwargs.pop(NATIVE_OP_KWARG, False)  # the compiled forward's choice of op, a constant of its trace
    if kwargs.get("softcap") is not None and (batch is not None or torch.compiler.is_compiling()):
        raise NotImplementedError("attention logit softcapping is not supported by the packed engine")
    if batch is None and torch.compiler.is_compiling():
        # The engine's compiled forward (compiled_forward.py): the batch reaches the op through a thread-local.
        # With our kernels the graph calls their C++ op, which runs a step the runner handed it in C++ and
        # passes any other step to the Python op (csrc/step_attention.cpp).
        op = torch.ops.softserve_native.step_attention if native_op else torch.ops.softserve.packed_attention
        out = op(query, key, value, module.layer_idx, kwargs.get("sliding_window") or 0,
                 float(scaling if scaling is not None else query.shape[-1] ** -0.5))
        return out, None
    if batch is None:
        batch = step_batch()  # the compiled forward running eagerly (torch fell back: recompile limit)
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    return attend_packed(batch, module.layer_idx, query, key, value, kwargs.get("sliding_window"), scaling), None


def install(model) -> None:
    """Route the model's attention through `packed_attention_forward` (plain SDPA without a batch)."""
    avoid_native_gqa_on_cpu()
    AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if model.config._attn_implementation != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
