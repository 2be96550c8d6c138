"""Flattens the step's rows into one packed batch, runs the frozen model ONCE, samples. Nothing else.

The scheduler decides which positions of which requests run; the runner turns that into tensors:

    token axis:  | row 0: 1 decode token | row 1: chunk of P_1 + prompt | row 2: 1 decode token | ...
    input        | embed(token ids), with the virtual positions overwritten by rows of P_i            |
    positions    | each row counts from 0 in its own sequence [P_i | prompt | generated]             |
    KV           | written to / read from the row's own extent of the pool (packed_attention.py)     |

Logits are computed only at each sampling row's last token (on a GPU, a step replayed as a CUDA graph
computes every token's and keeps those rows: cuda_graphs.py). The runner also owns the prompt-KV
prefix cache: a hit is copied into the row's extent at admission, and a prompt computed inline is
filed in the cache right after the forward that computed it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from softserve.engine.compiled_forward import WARM_UP_SHAPES, compile_forward
from softserve.engine.cuda_graphs import StepGraphs
from softserve.engine.guided import advance_guided
from softserve.engine.kv_cache import KVPool, PrefixKV, PrefixKVCache, kv_shape
from softserve.engine.kv_tier import PrefixKVTier
from softserve.engine.outputs import RowLogprobs, RunnerOutput
from softserve.engine.packed_attention import (
    BATCH_KWARG, NO_MASK, AttentionPlan, PackedBatch, PackedRow, PaddedTokens, current_batch, install,
    native_step_attention, token_extents,
)
from softserve.engine.request import Request, SamplingParams
from softserve.engine.sampler import SampleResult, apply_guided_masks, make_generator, sample
from softserve.engine.scheduler import ScheduledRow, SchedulerOutput
from softserve.engine.scoring import PromptLogitsSpan, record_prompt_logprobs, scored_positions, start_prompt_logprobs

log = logging.getLogger("softserve.runner")


@dataclass
class FlatBatch:
    """One step's inputs on the host, before they become tensors."""

    token_ids: list[int]  # [total_tokens]; 0 at virtual positions (overwritten by P rows)
    positions: list[int]  # [total_tokens]
    write_slots: list[int]  # [total_tokens]
    virtual_index: list[int]  # packed indices that take soft-prompt rows
    virtual_rows: list[torch.Tensor]  # slices of P, in virtual_index order: each [m, hidden]
    rows: list[PackedRow]
    logits_index: list[int]  # the last token of every sampling row
    prompt_logits_index: list[int]  # prompt positions scored for rows that asked (after logits_index)
    prompt_spans: list[PromptLogitsSpan]


def _real_tokens(request: Request, begin: int, end: int) -> list[int]:
    """Token ids at real positions begin..end-1 of prompt + generated (without building the concatenation)."""
    prompt, n = request.prompt_ids, len(request.prompt_ids)
    if begin >= n:
        return request.output_ids[begin - n : end - n]
    if end <= n:
        return prompt[begin:end]
    return prompt[begin:] + request.output_ids[: end - n]


class ModelRunner:
    def __init__(
        self,
        model,
        *,
        model_id: str,
        eos_token_ids: set[int],
        prefix_cache: PrefixKVCache,
        kv_cache_tokens: int,
    ) -> None:
        self.model = model
        text_config = model.config.get_text_config()
        if getattr(text_config, "attn_logit_softcapping", None):
            raise ValueError("models with attention logit softcapping (e.g. Gemma 2) are not supported by the packed engine")
        install(model)
        self._eos_ids = tuple(sorted(eos_token_ids))
        self.model_id = model_id
        self.prefix_cache = prefix_cache
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.embed = model.get_input_embeddings()
        self.num_layers, self.num_kv_heads, self.head_dim = kv_shape(model)
        self.pool = KVPool(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                           capacity=kv_cache_tokens, dtype=self.dtype, device=self.device)
        self._no_mask = NO_MASK.to(self.device)
        self.forward_passes = 0  # model calls; equals the engine's non-empty steps (one forward per step)
        # One SDPA call per layer per row group (packed_attention.py); False: the per-row reference loop.
        self.batched_attention = True
        # Decode rows attended by the C++ kernel reading the pool in place, and new K/V written by the C++
        # copy (native_kernels.py); the engine turns it on where the kernels are built (CPU).
        self.native_kernels = False
        # The same forward compiled with inductor (compiled_forward.py), or None: eager HF modules.
        self.compiled_forward = None
        # Steps replayed as CUDA graphs (cuda_graphs.py), or None; the engine sets it on GPUs.
        self.step_graphs: StepGraphs | None = None
        # Prompt KV on local disk under `prefix_cache` (kv_tier.py), or None; the engine sets it.
        self.kv_tier: PrefixKVTier | None = None

    def use_step_graphs(self, *, max_kv: int, capture: bool = True) -> None:
        """Steps through fixed-shape padded forwards, captured as CUDA graphs where `capture` and the device
        is a GPU (else run eagerly: the CPU tests' way to check the padded path)."""
        kv_bytes = 2 * self.num_kv_heads * self.head_dim * self.pool.storage.element_size()  # K and V of a position
        self.step_graphs = StepGraphs(self._padded_forward, scratch_slot=self.pool.scratch_slot,
                                      hidden=self.embed.weight.shape[1], dtype=self.dtype, device=self.device,
                                      max_kv=max_kv, kv_bytes_per_position=kv_bytes, capture=capture)

    def _padded_forward(self, fields: torch.Tensor, virtual_embeds: torch.Tensor, kv_bucket: int) -> torch.Tensor:
        """fields [len(FIELDS), tokens] int64 on the device, virtual_embeds [tokens, hidden] -> logits [tokens, vocab]."""
        token_ids, positions, write_slots, kv_start, kv_len, is_virtual = fields
        embeds = self.embed(token_ids)  # [tokens, hidden]
        embeds = torch.where(is_virtual.unsqueeze(1).bool(), virtual_embeds, embeds)  # soft-prompt rows in place
        batch = PackedBatch(pool=self.pool, write_slots=write_slots, rows=(),
                            padded=PaddedTokens(kv_start, kv_len, kv_bucket))
        out = self.model(
            inputs_embeds=embeds.unsqueeze(0),  # [1, tokens, hidden]
            position_ids=positions.unsqueeze(0),  # [1, tokens]
            attention_mask=self._no_mask,
            use_cache=False,
            logits_to_keep=0,  # every token: the runner keeps the rows it samples or scores
            **{BATCH_KWARG: batch},
        )
        return out.logits[0]  # [tokens, vocab]

    def _graph_bucket(self, flat: FlatBatch) -> tuple[int, int] | None:
        """The CUDA-graph bucket of a step, or None: the packed path."""
        graphs = self.step_graphs
        if graphs is None or not graphs.enabled or self.compiled_forward is not None:
            return None
        return graphs.bucket(len(flat.token_ids), max(row.kv_len for row in flat.rows))

    def _graph_forward(self, flat: FlatBatch, bucket: tuple[int, int]) -> torch.Tensor | None:
        """The step through its CUDA graph: logits of the sampled and scored rows, or None where the
        bucket's capture just failed (the packed path runs the step)."""
        assert self.step_graphs is not None
        extents = token_extents(flat.rows)  # each [tokens]: the token's row's slot 0, the positions it sees
        assert extents is not None  # the flattened rows tile the packed axis
        virtual = torch.cat(flat.virtual_rows).to(self.device, non_blocking=True) if flat.virtual_rows else None
        logits = self.step_graphs.run(bucket, (flat.token_ids, flat.positions, flat.write_slots, *extents),
                                      flat.virtual_index, virtual)  # [bucket tokens, vocab]
        if logits is None:
            return None
        kept = flat.logits_index + flat.prompt_logits_index
        if kept == list(range(len(kept))):  # decode rows only: the first tokens are the sampled ones
            return logits[: len(kept)]
        return logits.index_select(0, torch.tensor(kept, dtype=torch.long).to(self.device, non_blocking=True))

    def use_compiled_forward(self, on: bool, max_positions: int | None = None) -> None:
        """`max_positions`: the engine's max_model_len, the rotary tables' length (compiled_forward.py)."""
        self.compiled_forward = compile_forward(self.model, max_positions, self.native_kernels) if on else None

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile every graph the compiled forward will need now, not on the first requests. Writes K/V to
        pool slots 0..2, which no request owns yet."""
        if self.compiled_forward is None:
            return
        hidden = self.embed.weight.shape[1]
        for tokens, kept in WARM_UP_SHAPES:
            rows = (PackedRow(0, tokens, 0, tokens),)
            slots = torch.arange(tokens, device=self.device)
            batch = PackedBatch(pool=self.pool, write_slots=slots, rows=rows, native_writes=self.native_kernels,
                                plan=AttentionPlan.build(rows, self.device, self.native_kernels))
            embeds = torch.zeros(1, tokens, hidden, dtype=self.dtype, device=self.device)
            with current_batch(batch), native_step_attention(batch):
                self.compiled_forward(embeds, slots.unsqueeze(0), slots[tokens - kept :])

    # ---- soft-prompt KV prefixes -------------------------------------------------------------
    def _prefix_key(self, sha256: str) -> tuple[str, str, str]:
        return (self.model_id, str(self.dtype), sha256)

    def _prefix_from_tier(self, sha256: str, num_virtual_tokens: int) -> PrefixKV | None:
        """The prompt's KV read from the disk tier and kept in the device cache, or None."""
        if self.kv_tier is None:
            return None
        shape = (self.num_layers, 2, self.num_kv_heads, num_virtual_tokens, self.head_dim)
        kv = self.kv_tier.get(sha256, shape, self.dtype, self.device)
        if kv is None:
            return None
        entry = PrefixKV(kv)
        self.prefix_cache.put(self._prefix_key(sha256), entry)
        return entry

    def stage_prefix(self, sha256: str, num_virtual_tokens: int) -> bool:
        """Read a prompt's KV from the disk tier into the device cache before its request is admitted, in the
        caller's thread (the service's, per request), so the engine step does not wait for the disk. True if
        the device cache holds it now. Thread-safe: both caches take their own locks."""
        if self._prefix_key(sha256) in self.prefix_cache:
            return True
        if self.kv_tier is None or sha256 not in self.kv_tier:
            return False
        return self._prefix_from_tier(sha256, num_virtual_tokens) is not None

    def forget_prefix(self, sha256: str) -> None:
        """A deleted prompt's KV out of the device cache and off the disk tier (any thread)."""
        self.prefix_cache.discard(self._prefix_key(sha256))
        if self.kv_tier is not None:
            self.kv_tier.discard(sha256)

    def lookup_prefix(self, request: Request) -> PrefixKV | None:
        """Called by the scheduler at admission: the handle keeps the KV alive even if evicted later."""
        if request.soft_prompt.is_prefix:  # prefix tuning: the tensor IS the KV, nothing to compute
            return self._prefix_tuning_kv(request)
        sha256 = request.prompt_sha256
        entry = self.prefix_cache.get(self._prefix_key(sha256))
        return entry if entry is not None else self._prefix_from_tier(sha256, request.num_virtual_tokens)

    def _prefix_tuning_kv(self, request: Request) -> PrefixKV:
        """PEFT's [k, layers * 2 * kv_heads * head_dim] -> the pool layout [layers, 2, kv_heads, k, head_dim].

        PEFT reads it as view(k, 2 * layers, kv_heads, head_dim).permute(1, 2, 0, 3), K = [2l], V = [2l + 1];
        the keys are used as stored (no rotary is applied to them), and real tokens count from position k.
        """
        tensor = request.soft_prompt.embeddings
        k = tensor.shape[0]
        kv = tensor.to(self.device, self.dtype).view(k, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        return PrefixKV(kv.permute(1, 2, 3, 0, 4))  # [layers, 2, kv_heads, k, head_dim] (a view; copied at admission)

    def _copy_prefix_in(self, request: Request) -> None:
        prefix: PrefixKV = request.cached_prefix
        k, start = prefix.num_tokens, request.kv_offset
        self.pool.storage[:, :, :, start : start + k] = prefix.kv  # [layers, 2, kv_heads, k, head_dim]

    def _file_prefix(self, request: Request) -> None:
        k, start = request.num_virtual_tokens, request.kv_offset
        kv = self.pool.storage[:, :, :, start : start + k].clone()  # compact: [layers, 2, kv_heads, k, head_dim]
        self.prefix_cache.put(self._prefix_key(request.prompt_sha256), PrefixKV(kv))
        if self.kv_tier is not None:
            self.kv_tier.put(request.prompt_sha256, kv)  # written by the tier's thread; nobody writes `kv` again

    # ---- flatten ------------------------------------------------------------------------------
    def _flatten(self, rows: list[ScheduledRow]) -> FlatBatch:
        flat = FlatBatch([], [], [], [], [], [], [], [], [])
        q = 0
        for row in rows:
            request = row.request
            k, offset = request.num_virtual_tokens, request.kv_offset
            begin, end = row.start, row.start + row.num_tokens
            if begin < k:  # virtual tokens of a prompt whose KV is not cached: computed inline
                v_end = min(end, k)
                flat.virtual_index.extend(range(q, q + v_end - begin))
                flat.virtual_rows.append(request.soft_prompt.embeddings[begin:v_end])
                flat.token_ids.extend([0] * (v_end - begin))
            if end > k:
                flat.token_ids.extend(_real_tokens(request, max(begin, k) - k, end - k))
            flat.positions.extend(range(begin, end))
            flat.write_slots.extend(range(offset + begin, offset + end))
            flat.rows.append(PackedRow(q, end - begin, offset, end))
            if row.samples:
                flat.logits_index.append(q + end - begin - 1)
            scored = scored_positions(request, begin, end)
            if scored:
                flat.prompt_logits_index.extend(range(q + scored.start - begin, q + scored.stop - begin))
                flat.prompt_spans.append(PromptLogitsSpan(request, scored.start + 1 - k, len(scored)))
            q += end - begin
        return flat

    def _forward(self, flat: FlatBatch) -> torch.Tensor:
        bucket = self._graph_bucket(flat)
        if bucket is not None:
            logits = self._graph_forward(flat, bucket)
            if logits is not None:
                self.forward_passes += 1
                return logits
        def to_device(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

        input_ids, positions, slots, logits_index = map(
            to_device, (flat.token_ids, flat.positions, flat.write_slots, flat.logits_index + flat.prompt_logits_index)
        )
        embeds = self.embed(input_ids)  # [total_tokens, hidden]
        if flat.virtual_index:
            virtual = torch.cat(flat.virtual_rows).to(self.device, embeds.dtype)  # [num_virtual, hidden]
            embeds.index_copy_(0, to_device(flat.virtual_index), virtual)
        rows = tuple(flat.rows)
        plan = AttentionPlan.build(rows, self.device, self.native_kernels) if self.batched_attention else None
        batch = PackedBatch(pool=self.pool, write_slots=slots, rows=rows, plan=plan, native_writes=self.native_kernels)
        self.forward_passes += 1
        if self.compiled_forward is not None:
            # A graph that keeps no logits depends on nothing, and torch drops every layer from it, the
            # attention op's KV writes included (a pure op to the compiler): always keep one, then drop it.
            kept = logits_index if logits_index.numel() else logits_index.new_zeros(1)
            with current_batch(batch), native_step_attention(batch):
                logits = self.compiled_forward(embeds.unsqueeze(0), positions.unsqueeze(0), kept)
            return logits[: logits_index.numel()]
        out = self.model(
            inputs_embeds=embeds.unsqueeze(0),  # [1, total_tokens, hidden]
            position_ids=positions.unsqueeze(0),  # [1, total_tokens]
            attention_mask=self._no_mask,
            use_cache=False,
            logits_to_keep=logits_index,
            **{BATCH_KWARG: batch},
        )
        return out.logits[0]  # [sampling rows + scored prompt positions, vocab]

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> RunnerOutput:
        for request in sched.prefill:
            request.generator = make_generator(request.sampling.seed, self.device)
            start_prompt_logprobs(request)
            if request.cached_prefix is not None:
                self._copy_prefix_in(request)
        flat = self._flatten(sched.rows)
        logits = self._forward(flat)
        if flat.prompt_spans:
            record_prompt_logprobs(flat.prompt_spans, logits[len(flat.logits_index) :])
        all_logits = logits[: len(flat.logits_index)]  # [sampling rows, vocab]
        for row in sched.rows:
            if row.computes_prefix and row.start + row.num_tokens >= row.request.num_virtual_tokens:
                self._file_prefix(row.request)
        if not sched.scheduled:
            return RunnerOutput(sampled_token_ids=[])

        scheduled = sched.scheduled
        banned = [_banned_ids(r, self._eos_ids) for r in scheduled]
        params = [r.sampling for r in scheduled]
        generators = [r.generator for r in scheduled]
        failed_rows: dict[int, str] = {}
        apply_guided_masks(all_logits, scheduled)
        try:
            result = sample(all_logits, params, generators, banned, native=self.native_kernels)
        except Exception:
            result, failed_rows = self._sample_rows_separately(all_logits, params, generators, banned)
        token_ids = result.token_ids.tolist()  # the one device->host copy per step
        advance_guided(scheduled, token_ids)
        row_logprobs: list[RowLogprobs | None] | None = None
        if result.chosen_logprobs is not None:
            chosen = result.chosen_logprobs.tolist()
            top_ids = result.top_ids.tolist() if result.top_ids is not None else None
            top_lps = result.top_logprobs.tolist() if result.top_logprobs is not None else None
            row_logprobs = []
            for i, request in enumerate(scheduled):
                n = request.sampling.logprobs
                if n is None:
                    row_logprobs.append(None)
                    continue
                top = tuple(zip(top_ids[i][:n], top_lps[i][:n])) if top_ids is not None and n > 0 else ()
                row_logprobs.append(RowLogprobs(chosen=chosen[i], top=top))
        return RunnerOutput(sampled_token_ids=token_ids, logprobs=row_logprobs, failed_rows=failed_rows)

    def _sample_rows_separately(self, logits, params, generators, banned):
        """Batched sampling raised: sample row by row so only the offending rows fail."""
        rows, failed = [], {}
        for i in range(logits.shape[0]):
            try:
                rows.append(sample(logits[i : i + 1].clone(), [params[i]], [generators[i]], [banned[i]]))
            except Exception as exc:
                log.exception("sampling failed for row %d", i)
                failed[i] = f"sampling failed: {type(exc).__name__}"
                rows.append(sample(logits[i : i + 1].clone(), [SamplingParams(temperature=0.0)], [generators[i]], [[]]))
        merged = SampleResult(
            token_ids=torch.cat([r.token_ids for r in rows]),
            chosen_logprobs=None, top_logprobs=None, top_ids=None,
        )
        if all(p.logprobs is None for p in params):
            return merged, failed
        # Logprobs only for rows whose own sampling worked and asked for them.
        merged.chosen_logprobs = torch.cat([
            r.chosen_logprobs if r.chosen_logprobs is not None else torch.zeros(1, device=logits.device) for r in rows
        ])
        width = max((p.logprobs or 0) for p in params)
        top_lp = torch.zeros(len(rows), width, device=logits.device)
        top_ids = torch.zeros(len(rows), width, dtype=torch.long, device=logits.device)
        for i, r in enumerate(rows):
            if r.top_ids is not None:
                n = r.top_ids.shape[1]
                top_lp[i, :n], top_ids[i, :n] = r.top_logprobs[0], r.top_ids[0]
        merged.top_logprobs, merged.top_ids = (top_lp, top_ids) if width > 0 else (None, None)
        return merged, failed

    def trim_memory(self) -> None:
        """After a device OOM: drop cached prompt KV and return freed blocks to the device."""
        self.prefix_cache.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()



def _banned_ids(request: Request, eos_ids: tuple[int, ...]) -> list[int]:
    """Stop tokens may not be sampled before min_tokens (vLLM semantics)."""
    sampling = request.sampling
    if request.num_output_tokens >= sampling.min_tokens:
        return []
    banned = list(sampling.stop_token_ids)
    if not sampling.ignore_eos:
        banned.extend(eos_ids)
    return banned
