"""Flattens scheduled requests into tensors, runs the frozen model, samples. Nothing else.

The runner owns the running batch's device state (KV cache, attention mask, positions, last tokens);
the scheduler owns the decisions. Row order always equals `SchedulerOutput.scheduled` (decode rows,
then new prefill rows), so outputs line up with requests without any lookup.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from server.engine.cpu_attention import avoid_native_gqa_on_cpu
from server.engine.kv_cache import BatchCache, GrowableLayer, PrefixKV, PrefixKVCache, left_pad
from server.engine.request import Request, SamplingParams
from server.engine.guided import advance_guided
from server.engine.sampler import SampleResult, apply_guided_masks, make_generator, sample
from server.engine.scheduler import RunnerOutput, SchedulerOutput
from server.engine.scoring import prompt_logits_to_keep, record_prompt_logprobs

log = logging.getLogger("softserve.runner")


@dataclass(frozen=True)
class RowLogprobs:
    chosen: float
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), best first


class ModelRunner:
    def __init__(
        self, model, *, model_id: str, pad_token_id: int, eos_token_ids: set[int], prefix_cache: PrefixKVCache
    ) -> None:
        self.model = model
        avoid_native_gqa_on_cpu()
        self._eos_ids = tuple(sorted(eos_token_ids))
        # transformers 5.x renamed `past_key_values` to `cache`; accept both so any HF model works.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.model_id = model_id
        self.pad_token_id = pad_token_id
        self.prefix_cache = prefix_cache
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        text_config = model.config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        self.num_kv_heads = text_config.num_key_value_heads or text_config.num_attention_heads
        self.head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        self._reset_batch()

    # ---- batch state -------------------------------------------------------------------------
    def _reset_batch(self) -> None:
        self.row_ids: list[str] = []
        self.cache: BatchCache | None = None
        self.mask: torch.Tensor | None = None  # [batch, seq] int64, 0 on padding
        self.next_pos: torch.Tensor | None = None  # [batch] int64: position of the next token
        self.last_tokens: torch.Tensor | None = None  # [batch] int64: token to feed at the next decode
        self.generators: dict[str, torch.Generator] = {}
        self.params: dict[str, SamplingParams] = {}

    def reset(self) -> None:
        """Drop every row (after a failed step) — the scheduler fails those requests."""
        self._reset_batch()

    @property
    def batch_size(self) -> int:
        return len(self.row_ids)

    @property
    def seq_len(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def _keep_rows(self, keep_ids: list[str]) -> None:
        """Keep exactly `keep_ids`, in that order; then trim columns that are padding in every row."""
        if keep_ids == self.row_ids:
            return
        for rid in set(self.row_ids) - set(keep_ids):
            self.generators.pop(rid, None)
            self.params.pop(rid, None)
        if not keep_ids:
            self._reset_batch()
            return
        where = {rid: i for i, rid in enumerate(self.row_ids)}
        index = torch.tensor([where[rid] for rid in keep_ids], device=self.device)
        mask = self.mask.index_select(0, index)
        # One host sync, only when rows leave: find the first column any remaining row uses.
        first_used = int(mask.any(dim=0).to(torch.int8).argmax().item())
        mask = mask[:, first_used:]
        self.cache.select_rows(index, first_used)
        self.mask = mask
        self.next_pos = self.next_pos.index_select(0, index)
        self.last_tokens = self.last_tokens.index_select(0, index)
        self.row_ids = list(keep_ids)

    # ---- soft-prompt KV prefixes -------------------------------------------------------------
    def _prefix_kv(self, request: Request) -> PrefixKV:
        key = (self.model_id, str(self.dtype), request.prompt_sha256)
        entry = self.prefix_cache.get(key)
        if entry is not None:
            return entry
        embeddings = request.soft_prompt.embeddings.to(self.device, self.dtype)  # [k, hidden]
        k = embeddings.shape[0]
        cache = BatchCache.empty(self.num_layers)
        self.model(
            inputs_embeds=embeddings.unsqueeze(0),  # [1, k, hidden]
            attention_mask=torch.ones(1, k, dtype=torch.long, device=self.device),
            position_ids=torch.arange(k, device=self.device).unsqueeze(0),
            **{self._cache_kwarg: cache},
            use_cache=True,
            logits_to_keep=1,
        )
        layers = [(kk.clone(), vv.clone()) for kk, vv in cache.kv()]  # compact copies: [1, H, k, D]
        nbytes = sum(kk.numel() * kk.element_size() * 2 for kk, _ in layers)
        entry = PrefixKV(layers=layers, num_tokens=k, nbytes=nbytes)
        self.prefix_cache.put(key, entry)
        return entry

    # ---- forward passes ----------------------------------------------------------------------
    def _decode(self) -> torch.Tensor:
        mask = torch.cat([self.mask, self.mask.new_ones(self.batch_size, 1)], dim=1)  # [batch, seq + 1]
        out = self.model(
            input_ids=self.last_tokens.unsqueeze(1),  # [batch, 1]
            attention_mask=mask,
            position_ids=self.next_pos.unsqueeze(1),  # [batch, 1]
            **{self._cache_kwarg: self.cache},
            use_cache=True,
        )
        self.mask = mask
        self.next_pos = self.next_pos + 1
        return out.logits[:, -1, :]  # [batch, vocab]

    def _prefill(self, requests: list[Request]) -> torch.Tensor:
        """Prefill new rows against their cached prompt KV and merge them into the running batch."""
        prefixes = [self._prefix_kv(r) if r.soft_prompt is not None else None for r in requests]
        ks = [p.num_tokens if p else 0 for p in prefixes]
        ns = [len(r.prompt_ids) for r in requests]
        rows, max_k, max_n = len(requests), max(ks), max(ns)

        input_ids = torch.full((rows, max_n), self.pad_token_id, dtype=torch.long)  # [rows, max_n]
        mask = torch.zeros(rows, max_k + max_n, dtype=torch.long)  # [rows, max_k + max_n]
        positions = torch.zeros(rows, max_n, dtype=torch.long)  # [rows, max_n]
        for i, (request, k, n) in enumerate(zip(requests, ks, ns)):
            input_ids[i, max_n - n :] = torch.tensor(request.prompt_ids, dtype=torch.long)
            mask[i, max_k - k : max_k] = 1
            mask[i, max_k + max_n - n :] = 1
            positions[i, max_n - n :] = torch.arange(k, k + n)
        input_ids, mask, positions = (t.to(self.device, non_blocking=True) for t in (input_ids, mask, positions))

        past = BatchCache.empty(self.num_layers)
        if max_k > 0:
            layers = []
            for layer in range(self.num_layers):
                # Prefix KV written straight into buffers with room for the prompt tokens: one copy.
                shape = (rows, self.num_kv_heads, max_k + max_n + 64, self.head_dim)
                buf_k = torch.zeros(shape, dtype=self.dtype, device=self.device)
                buf_v = torch.zeros(shape, dtype=self.dtype, device=self.device)
                for i, prefix in enumerate(prefixes):
                    if prefix is not None:
                        k_l, v_l = prefix.layers[layer]  # [1, H, k_i, D]
                        buf_k[i, :, max_k - prefix.num_tokens : max_k] = k_l[0]
                        buf_v[i, :, max_k - prefix.num_tokens : max_k] = v_l[0]
                layers.append(GrowableLayer.adopt(buf_k, buf_v, 0, max_k))
            past = BatchCache(layers)

        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            **{self._cache_kwarg: past},
            use_cache=True,
            logits_to_keep=prompt_logits_to_keep(requests),
        )
        record_prompt_logprobs(requests, out.logits)
        next_pos = torch.tensor([k + n for k, n in zip(ks, ns)], device=self.device)
        self._merge(requests, past, mask, next_pos)
        return out.logits[:, -1, :]  # [rows, vocab]

    def _merge(self, requests: list[Request], new_cache: BatchCache, new_mask: torch.Tensor, new_pos: torch.Tensor):
        new_ids = [r.request_id for r in requests]
        for r in requests:
            self.generators[r.request_id] = make_generator(r.sampling.seed, self.device)
            self.params[r.request_id] = r.sampling
        placeholder = torch.full((len(requests),), self.pad_token_id, dtype=torch.long, device=self.device)
        if not self.row_ids:
            self.cache, self.mask, self.next_pos = new_cache, new_mask, new_pos
            self.last_tokens = placeholder
            self.row_ids = new_ids
            return
        width = max(self.seq_len, new_mask.shape[1])
        self.cache.append_rows(new_cache)
        self.mask = torch.cat([left_pad(self.mask, width, 1), left_pad(new_mask, width, 1)])
        self.next_pos = torch.cat([self.next_pos, new_pos])
        self.last_tokens = torch.cat([self.last_tokens, placeholder])
        self.row_ids = self.row_ids + new_ids

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> RunnerOutput:
        self._keep_rows([r.request_id for r in sched.decode])
        logits = []
        if sched.decode:
            logits.append(self._decode())
        if sched.prefill:
            logits.append(self._prefill(sched.prefill))
        all_logits = torch.cat(logits) if len(logits) > 1 else logits[0]  # [batch, vocab]

        scheduled = sched.scheduled
        banned = [_banned_ids(r, self._eos_ids) for r in scheduled]
        params = [r.sampling for r in scheduled]
        generators = [self.generators[r.request_id] for r in scheduled]
        failed_rows: dict[int, str] = {}
        apply_guided_masks(all_logits, scheduled)
        try:
            result = sample(all_logits, params, generators, banned)
        except Exception:
            result, failed_rows = self._sample_rows_separately(all_logits, params, generators, banned)
        self.last_tokens = result.token_ids
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
