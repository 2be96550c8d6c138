"""Decode steps replayed as CUDA graphs: one graph launch per step instead of hundreds of kernel launches.

On a GPU a small model's decode step is bound by the host, not by the device: each layer is ~15 kernels
of a few microseconds of GPU work each, and every one of them costs Python, dispatcher and launch time
first. vLLM captures its decode forward once per batch size and replays it; so do we. What a graph
needs, and how a decode step provides it:

- fixed shapes: the step's rows are padded to a row bucket (1, 2, 4, 8, 16, 24, 32, ...), and every
  row's keys are gathered to a KV bucket (256, 512, ... positions) with a mask for the rest; one graph
  per (row bucket, KV bucket), captured the first time a step needs it;
- fixed addresses: the step's inputs (token ids, positions, pool slots, each row's KV extent) are copied
  into one static device buffer that the graph reads, with one host-to-device copy; the logits land in
  the graph's own output tensor;
- no host work inside: the attention of a padded step (`padded_decode_attention`) builds its gather
  indices and mask on the device from the extents.

A pad row decodes token 0 at position 0 over the pool's scratch slot (`KVPool.scratch_slot`), which no
request owns; its logits are dropped. Steps that are not decode-only (a prompt chunk, scoring, a soft
prompt's virtual tokens) or fit no bucket run the packed path as before, and so does every step once a
capture has failed (an op that waits for the host cannot be captured): logged once, the step served.

`capture=False` runs the same padded forward without a graph: that is how the CPU tests hold the padded
path equal to the packed one; on a GPU the tests hold the replayed graphs equal to eager steps.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from softserve.engine.packed_attention import PaddedDecode

log = logging.getLogger("softserve.cuda_graphs")

# Rows past this decode eagerly: at that size the step's launch overhead is small beside its work.
MAX_GRAPH_ROWS = 256
# The smallest KV bucket; buckets double up to the longest sequence the scheduler admits.
MIN_KV_BUCKET = 256
INPUT_FIELDS = 5  # token id, position, write slot, kv_start, kv_len

# forward(token_ids [rows], positions [rows], write_slots [rows], padded) -> logits [rows, vocab]
PaddedForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, PaddedDecode], torch.Tensor]


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every 8 rows to 64 and every 32 to 256: the first that holds `max_rows` ends it."""
    candidates = [1, 2, 4, *range(8, 65, 8), *range(96, MAX_GRAPH_ROWS + 1, 32)]
    buckets = []
    for size in candidates:
        buckets.append(size)
        if size >= max_rows:
            break
    return buckets


def kv_buckets(max_kv: int) -> list[int]:
    """MIN_KV_BUCKET doubling until one holds `max_kv` positions."""
    buckets = [MIN_KV_BUCKET]
    while buckets[-1] < max_kv:
        buckets.append(buckets[-1] * 2)
    return buckets


class DecodeGraphs:
    """The decode graphs of one model runner, captured lazily and replayed with new inputs."""

    def __init__(self, forward: PaddedForward, *, scratch_slot: int, device: torch.device, max_rows: int,
                 max_kv: int, capture: bool) -> None:
        self._forward = forward
        self.row_buckets = row_buckets(min(max_rows, MAX_GRAPH_ROWS))
        self.kv_buckets = kv_buckets(max_kv)
        self.capture = capture and device.type == "cuda"
        self.enabled = True  # False once a capture failed: the runner goes back to the packed path
        self.capture_error: str | None = None  # why, for logs and benches
        width = self.row_buckets[-1]
        # [INPUT_FIELDS * rows] each: a bucket's inputs are the first INPUT_FIELDS * rows entries, viewed
        # [INPUT_FIELDS, rows], so one contiguous copy fills them and each graph reads fixed addresses.
        self._inputs = torch.zeros(INPUT_FIELDS * width, dtype=torch.long, device=device)
        self._host = torch.zeros(INPUT_FIELDS * width, dtype=torch.long, pin_memory=self.capture)
        self._copied = torch.cuda.Event() if self.capture else None  # the last host->device copy of `_host`
        self._pad = (0, 0, scratch_slot, scratch_slot, 1)  # a pad row: token 0 at position 0 over the scratch slot
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.replays = 0  # steps that ran through this path (replayed, or padded eagerly where capture is off)
        self.captures = 0

    def bucket(self, num_rows: int, max_kv_len: int) -> tuple[int, int] | None:
        """(row bucket, KV bucket) of a decode step, or None where it fits no bucket."""
        rows = next((b for b in self.row_buckets if b >= num_rows), None)
        kv = next((b for b in self.kv_buckets if b >= max_kv_len), None)
        return None if rows is None or kv is None else (rows, kv)

    def run(self, bucket: tuple[int, int], token_ids: list[int], positions: list[int], write_slots: list[int],
            kv_start: list[int], kv_len: list[int]) -> torch.Tensor:
        """One decode step of len(token_ids) rows: logits [rows, vocab] (valid until the next step)."""
        rows, kv_bucket = bucket
        n = len(token_ids)
        if self._copied is not None:
            self._copied.synchronize()  # the pinned buffer may still feed the last step's copy
        host = self._host[: INPUT_FIELDS * rows].view(INPUT_FIELDS, rows)
        for field, values, pad in zip(host, (token_ids, positions, write_slots, kv_start, kv_len), self._pad):
            field[:n] = torch.tensor(values, dtype=torch.long)
            field[n:] = pad
        self._inputs[: INPUT_FIELDS * rows].copy_(host.view(-1), non_blocking=self.capture)
        if self._copied is not None:
            self._copied.record()
        self.replays += 1
        graph = self._graphs.get(bucket)
        if graph is None and self.capture:
            graph = self._capture(rows, kv_bucket)
        if graph is None:
            return self._run_padded(rows, kv_bucket)[:n]
        graph[0].replay()
        return graph[1][:n]

    def _run_padded(self, rows: int, kv_bucket: int) -> torch.Tensor:
        token_ids, positions, write_slots, kv_start, kv_len = self._inputs[: INPUT_FIELDS * rows].view(INPUT_FIELDS, rows)
        return self._forward(token_ids, positions, write_slots, PaddedDecode(kv_start, kv_len, kv_bucket))

    def _capture(self, rows: int, kv_bucket: int):
        """Capture the bucket's graph over the inputs already copied in, or turn capturing off if it fails.

        Torch's recipe: run the forward on a side stream first (lazy cuBLAS and allocator state), then
        capture into the pool every graph of this runner shares (graphs replay one at a time)."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run_padded(rows, kv_bucket)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                out = self._run_padded(rows, kv_bucket)
        except Exception as error:  # an op that syncs with the host cannot be captured: serve without graphs
            self.enabled = False
            self.capture_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            log.warning("capturing a decode CUDA graph (%d rows, %d KV) failed, decoding without graphs: %s",
                        rows, kv_bucket, self.capture_error)
            return None
        self._graphs[(rows, kv_bucket)] = (graph, out)
        self.captures += 1
        log.info("captured the decode CUDA graph for %d rows over %d KV positions", rows, kv_bucket)
        return graph, out
