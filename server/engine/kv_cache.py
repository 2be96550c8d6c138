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
    """A DynamicLayer over a preallocated buffer: decode writes one column in place.

    HF's DynamicLayer `torch.cat`s the whole cache every decode step (O(T) per token). Here the
    live KV is `buffer[:, :, start:end]`; the buffer grows geometrically, rows are selected and
    batches merged with exactly one copy of the live data (continuous batching does that at almost
    every step, so every extra copy costs).
    """

    def __init__(self, spare: int = 64) -> None:
        super().__init__()
        self._spare = spare
        self._buf_k: torch.Tensor | None = None  # [batch, kv_heads, capacity, head_dim]
        self._buf_v: torch.Tensor | None = None
        self.start = 0
        self.end = 0

    @classmethod
    def adopt(cls, buf_k: torch.Tensor, buf_v: torch.Tensor, start: int, end: int, spare: int = 64) -> "GrowableLayer":
        """Take ownership of buffers whose columns start..end are live (no copy)."""
        layer = cls(spare)
        layer._buf_k, layer._buf_v, layer.start, layer.end = buf_k, buf_v, start, end
        layer._publish(buf_k.device)
        return layer

    def _publish(self, device) -> None:
        self.keys = self._buf_k[:, :, self.start : self.end]
        self.values = self._buf_v[:, :, self.start : self.end]
        self.device = device
        self.is_initialized = True

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n = key_states.shape[-2]
        if self._buf_k is None or self._buf_k.shape[-2] < self.end + n:
            live = self.end - self.start
            capacity = max(live + n + self._spare, int((live + n) * 1.25))
            batch, heads, _, head_dim = key_states.shape
            new_k = key_states.new_empty(batch, heads, capacity, head_dim)
            new_v = value_states.new_empty(batch, heads, capacity, head_dim)
            if live:
                new_k[:, :, :live] = self._buf_k[:, :, self.start : self.end]
                new_v[:, :, :live] = self._buf_v[:, :, self.start : self.end]
            self._buf_k, self._buf_v, self.start, self.end = new_k, new_v, 0, live
        self._buf_k[:, :, self.end : self.end + n] = key_states
        self._buf_v[:, :, self.end : self.end + n] = value_states
        self.end += n
        self._publish(key_states.device)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        self._write(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def select_rows(self, index: torch.Tensor, drop_front: int) -> None:
        """Keep rows `index` (in that order) and drop `drop_front` leading columns: one copy."""
        begin = self.start + drop_front
        self._buf_k = self._buf_k[:, :, begin:].index_select(0, index)
        self._buf_v = self._buf_v[:, :, begin:].index_select(0, index)
        self.start, self.end = 0, self.end - begin
        self._publish(self._buf_k.device)

    def append_rows(self, other: "GrowableLayer") -> None:
        """Stack `other`'s rows under ours, both right-aligned to the wider one: one copy each."""
        mine, theirs = self.get_seq_length(), other.get_seq_length()
        width = max(mine, theirs)
        rows = self._buf_k.shape[0]
        total = rows + other._buf_k.shape[0]
        batch_k = self._buf_k.new_empty(total, self._buf_k.shape[1], width + self._spare, self._buf_k.shape[3])
        batch_v = self._buf_v.new_empty(batch_k.shape)
        for buf, src_self, src_other in ((batch_k, self.keys, other.keys), (batch_v, self.values, other.values)):
            # Padding must be zeros, not uninitialised memory: a masked NaN still poisons softmax @ V.
            buf[:rows, :, : width - mine] = 0
            buf[:rows, :, width - mine : width] = src_self
            buf[rows:, :, : width - theirs] = 0
            buf[rows:, :, width - theirs : width] = src_other
        self._buf_k, self._buf_v, self.start, self.end = batch_k, batch_v, 0, width
        self._publish(batch_k.device)


class BatchCache(Cache):
    """A `transformers` Cache made of GrowableLayers."""

    def __init__(self, layers: list[GrowableLayer]):
        super().__init__(layers=layers)

    @classmethod
    def empty(cls, num_layers: int) -> "BatchCache":
        return cls([GrowableLayer() for _ in range(num_layers)])

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each [batch, kv_heads, seq, head_dim] (views into the buffers)."""
        return [(layer.keys, layer.values) for layer in self.layers]

    def select_rows(self, index: torch.Tensor, drop_front: int) -> None:
        for layer in self.layers:
            layer.select_rows(index, drop_front)

    def append_rows(self, other: "BatchCache") -> None:
        for mine, theirs in zip(self.layers, other.layers):
            mine.append_rows(theirs)


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
