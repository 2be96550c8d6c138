"""KV state of the running batch, and the soft-prompt KV prefix cache.

Layout of every row in the batch (left-aligned padding, like TGI's causal-LM batches):

    [pad ... pad | P_i (k_i virtual tokens) | pad ... | x_1 .. x_n | generated ...]

Pads have attention-mask 0 and the position ids come from each row's own count of real tokens, so a
row computes what it would compute alone. Decode appends one column for every row; rows that finish
are dropped, and leading columns that are padding in every remaining row are trimmed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowableLayer(DynamicLayer):
    """A DynamicLayer that writes into a preallocated buffer instead of `torch.cat` on every step.

    HF's DynamicLayer copies the whole cache each decode step (O(T) per token); here the buffer
    grows geometrically, so decode writes one column in place.
    """

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, spare: int = 64):
        super().__init__()
        self.length = 0
        self._spare = spare
        self._buf_k: torch.Tensor | None = None
        self._buf_v: torch.Tensor | None = None
        if keys is not None and values is not None:
            self._write(keys, values)

    def _ensure_capacity(self, like: torch.Tensor, needed: int) -> None:
        if self._buf_k is not None and self._buf_k.shape[-2] >= needed:
            return
        capacity = max(needed + self._spare, int(needed * 1.25))
        batch, heads, _, head_dim = like.shape
        new_k = like.new_empty(batch, heads, capacity, head_dim)  # [batch, kv_heads, capacity, head_dim]
        new_v = like.new_empty(batch, heads, capacity, head_dim)
        if self._buf_k is not None and self.length:
            new_k[:, :, : self.length] = self._buf_k[:, :, : self.length]
            new_v[:, :, : self.length] = self._buf_v[:, :, : self.length]
        self._buf_k, self._buf_v = new_k, new_v

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n = key_states.shape[-2]
        self._ensure_capacity(key_states, self.length + n)
        self._buf_k[:, :, self.length : self.length + n] = key_states
        self._buf_v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys = self._buf_k[:, :, : self.length]
        self.values = self._buf_v[:, :, : self.length]
        self.device = key_states.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self._write(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length


class BatchCache(Cache):
    """A `transformers` Cache whose layers are GrowableLayers built from given tensors."""

    def __init__(self, layers_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, num_layers: int):
        if layers_kv is None:
            layers = [GrowableLayer() for _ in range(num_layers)]
        else:
            layers = [GrowableLayer(k, v) for k, v in layers_kv]
        super().__init__(layers=layers)

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [batch, kv_heads, seq, head_dim] (views into the buffers)."""
        return [(layer.keys, layer.values) for layer in self.layers]


def left_pad(t: torch.Tensor, to_len: int, dim: int) -> torch.Tensor:
    """Pad `t` with zeros at the front of `dim` up to `to_len`."""
    missing = to_len - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class PrefixKV:
    """KV of one soft prompt computed alone at positions 0..k-1: per layer ([1, H, k, D], [1, H, k, D])."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    num_tokens: int
    nbytes: int


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

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)
