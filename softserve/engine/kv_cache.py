"""KV memory: the preallocated pool the running rows live in, and the soft-prompt KV prefix cache.

Pool layout: one tensor `[num_layers, 2 (K/V), kv_heads, capacity + 1, head_dim]` (the last slot is
scratch for CUDA-graph pad tokens, owned by no request). A running
request owns the contiguous extent `[kv_offset, kv_offset + reservation)` of the capacity axis
(kv_allocator.py decides where); position p of its sequence `[P_i | prompt | generated]` lives at
slot `kv_offset + p`. Nothing is ever padded, moved or copied when rows join or leave.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

log = logging.getLogger("softserve.kv")


def kv_shape(model) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a causal LM: what one token's KV holds per layer."""
    text_config = model.config.get_text_config()
    kv_heads = text_config.num_key_value_heads or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return text_config.num_hidden_layers, kv_heads, head_dim


class KVPool:
    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        self.capacity = capacity
        # One slot past the capacity that no request owns: the pad tokens of a step padded to a CUDA-graph
        # bucket (cuda_graphs.py; the start-up captures too) write their K/V there and read it back.
        self.scratch_slot = capacity
        # torch.empty: on CPU untouched pages are never committed, so an idle pool costs no RSS.
        self.storage = torch.empty(num_layers, 2, num_kv_heads, capacity + 1, head_dim, dtype=dtype, device=device)
        # the views, made once: indexing the storage twice per layer per step is Python time on the hot path
        self._layers = [(self.storage[i, 0], self.storage[i, 1]) for i in range(num_layers)]
        self.layer_keys = [k for k, _ in self._layers]  # the same views as two lists (native step attention)
        self.layer_values = [v for _, v in self._layers]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of one layer, each [kv_heads, capacity + 1, head_dim] (views of `storage`)."""
        return self._layers[index]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype) -> int:
        return num_layers * 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def default_kv_cache_bytes(device: torch.device, bytes_per_token: int, max_batch_size: int, max_model_len: int) -> int:
    """Enough for every row at full length, bounded by a share of free memory (never below one full row)."""
    wanted = max_batch_size * max_model_len * bytes_per_token
    share = 0.5 if device.type == "cuda" else 0.3  # CPU: the model, prompts and the OS live in the same RAM
    allowed = int(available_memory_bytes(device) * share)
    return max(min(wanted, allowed), max_model_len * bytes_per_token)


@dataclass
class PrefixKV:
    """KV of one soft prompt at positions 0..k-1, laid out like the pool: [num_layers, 2, kv_heads, k, head_dim]."""

    kv: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


class PrefixKVCache:
    """LRU (bounded in bytes) of soft-prompt KV prefixes.

    Keyed by (model id, dtype, content sha256) — never by a prompt's name — so a renamed, replaced or
    another tenant's prompt can never be served someone else's state.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, str, str], PrefixKV] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: tuple[str, str, str]) -> PrefixKV | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple[str, str, str], entry: PrefixKV) -> None:
        with self._lock:
            if entry.nbytes > self.budget_bytes or key in self._entries:
                return  # too big to keep: it is still used for this step, just not cached
            while self._entries and self.bytes + entry.nbytes > self.budget_bytes:
                _, old = self._entries.popitem(last=False)
                self.bytes -= old.nbytes
                self.evictions += 1
            self._entries[key] = entry
            self.bytes += entry.nbytes

    def __contains__(self, key: object) -> bool:
        """Without counting a hit or a miss, or refreshing the entry."""
        with self._lock:
            return key in self._entries

    def discard(self, key: tuple[str, str, str]) -> None:
        """Drop one entry (requests already holding it keep their handle)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.bytes -= entry.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
