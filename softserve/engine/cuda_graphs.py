"""Engine steps replayed as CUDA graphs: one graph launch per step instead of hundreds of kernel launches.

On a GPU a small model's step is bound by the host, not by the device: each layer is ~15 kernels of a
few microseconds of GPU work each, and every one costs Python, dispatcher and launch time first. On the
H200 machine here an eager SmolLM2-135M step took 60-85 ms of host time for ~3 ms of kernels, decode
or prefill alike (bench/RESULTS.md, "GPU"). vLLM captures its forward per batch size and replays it;
we capture every step that fits, prompt chunks and soft prompts' virtual tokens included:

- fixed shapes: the step's packed tokens are padded to a token bucket (1, 2, 4, 8, 16, 24, ... 512), and
  every token's keys are gathered to a KV bucket (256, 512, ... positions) with a mask for the rest; one
  graph per (token bucket, KV bucket), those of the two smallest KV buckets captured at start-up
  (`warm_up`), the others the first time a step needs them;
- fixed addresses: per token, the id, position, pool slot, KV extent and whether a soft-prompt row
  replaces its embedding are copied into one static device buffer with one host-to-device copy (the
  soft-prompt rows, where a step has any, into a static embedding buffer); every graph writes the logits
  of every token into one shared output buffer, and the runner keeps the rows it samples or scores;
- no host work inside: attention (`padded_token_attention`) treats every token as one query over its
  own causal extent of the pool, its gather indices and mask built on the device from the extents.

A pad token is token 0 at position 0 over the pool's scratch slot (`KVPool.scratch_slot`), which no
request owns; its logits are never read. Steps of more tokens than MAX_GRAPH_TOKENS, or whose gathered
keys would exceed MAX_GATHERED_BYTES, run the packed path as before. So do the steps of a bucket whose
capture failed (out of memory, say; logged, the step itself served by the packed path), and every
step once MAX_CAPTURE_FAILURES captures have failed. Captures are thread-local (`capture_error_mode`),
so other threads' CUDA work (a prompt copied to the device, a tuning job) cannot spoil one.

`capture=False` runs the same padded forward without a graph: that is how the CPU tests hold the padded
path equal to the packed one; on a GPU the tests hold the replayed graphs equal to eager steps.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("softserve.cuda_graphs")

# Steps of more packed tokens run eagerly (long prompt chunks: their launches are a small share there).
MAX_GRAPH_TOKENS = 512
# Token bucket x KV bucket x bytes of one position's K and V at most this: what each layer gathers,
# transiently (SmolLM2-135M in bf16: 768 B a position, so up to 349,525 positions, e.g. 512 tokens x 512).
MAX_GATHERED_BYTES = 256 << 20
# After this many failed captures the graphs are turned off; before, only the failing bucket is.
MAX_CAPTURE_FAILURES = 3
# The smallest KV bucket; buckets double up to the longest sequence the scheduler admits.
MIN_KV_BUCKET = 256
FIELDS = ("token_id", "position", "write_slot", "kv_start", "kv_len", "is_virtual")

# forward(fields [len(FIELDS), tokens] on the device, virtual_embeds [tokens, hidden], kv_bucket) -> logits [tokens, vocab]
PaddedForward = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def token_buckets(max_tokens: int = MAX_GRAPH_TOKENS) -> list[int]:
    """1, 2, 4, 8, every 8 to 64, every 32 to 256, every 64 to 512, up to the first that holds max_tokens."""
    candidates = [1, 2, 4, *range(8, 65, 8), *range(96, 257, 32), *range(320, MAX_GRAPH_TOKENS + 1, 64)]
    buckets = []
    for size in candidates:
        buckets.append(size)
        if size >= max_tokens:
            break
    return buckets


def kv_buckets(max_kv: int) -> list[int]:
    """MIN_KV_BUCKET doubling until one holds `max_kv` positions."""
    buckets = [MIN_KV_BUCKET]
    while buckets[-1] < max_kv:
        buckets.append(buckets[-1] * 2)
    return buckets


class StepGraphs:
    """The step graphs of one model runner, captured at start-up (`warm_up`) or on first use, replayed with new inputs."""

    def __init__(self, forward: PaddedForward, *, scratch_slot: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, max_kv: int, kv_bytes_per_position: int, capture: bool) -> None:
        self._forward = forward
        self._max_gathered_positions = MAX_GATHERED_BYTES // max(1, kv_bytes_per_position)
        self.token_buckets = token_buckets()
        self.kv_buckets = kv_buckets(max_kv)
        self.capture = capture and device.type == "cuda"
        self.enabled = True  # False after MAX_CAPTURE_FAILURES failed captures: the packed path only
        self.capture_error: str | None = None  # the last failure, for logs and benches
        self.failed: set[tuple[int, int]] = set()  # buckets whose capture failed: the packed path
        width = self.token_buckets[-1]
        # [len(FIELDS) * tokens] each: a bucket's inputs are the first len(FIELDS) * tokens entries, viewed
        # [len(FIELDS), tokens], so one contiguous copy fills them and each graph reads fixed addresses.
        self._inputs = torch.zeros(len(FIELDS) * width, dtype=torch.long, device=device)
        self._host = torch.zeros(len(FIELDS) * width, dtype=torch.long, pin_memory=self.capture)
        self._virtual = torch.zeros(width, hidden, dtype=dtype, device=device)  # soft-prompt rows at their token index
        self._copied = torch.cuda.Event() if self.capture else None  # the last host->device copy of `_host`
        self._pad = (0, 0, scratch_slot, scratch_slot, 1, 0)  # token 0 at position 0 over the scratch slot
        # [max tokens, vocab]: the logits every graph writes (allocated at the first capture, when the shape
        # is known). One buffer for all graphs, so that each graph's own logits are transient in the pool.
        self._logits: torch.Tensor | None = None
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._mempool = torch.cuda.graph_pool_handle() if self.capture else None
        self.steps = 0  # steps that ran through this path (replayed, or padded eagerly where capture is off)
        self.captures = 0

    def bucket(self, num_tokens: int, max_kv_len: int) -> tuple[int, int] | None:
        """(token bucket, KV bucket) of a step, or None where it fits none."""
        tokens = next((b for b in self.token_buckets if b >= num_tokens), None)
        kv = next((b for b in self.kv_buckets if b >= max_kv_len), None)
        if tokens is None or kv is None or tokens * kv > self._max_gathered_positions or (tokens, kv) in self.failed:
            return None
        return tokens, kv

    def run(self, bucket: tuple[int, int], fields: tuple, virtual_index: list[int],
            virtual_rows: torch.Tensor | None) -> torch.Tensor | None:
        """One step of len(fields[0]) packed tokens (`fields`: lists or CPU tensors in FIELDS order,
        is_virtual left out: it follows from virtual_index; virtual_rows [len(virtual_index), hidden] on the device) -> logits
        [tokens, vocab] of every token, pads after them (valid until the next step); None where the
        bucket's capture just failed: the caller runs the step its own way (what was written to the pool
        here is written again by that run, slot for slot)."""
        tokens, kv_bucket = bucket
        self._copy_in(tokens, fields, virtual_index)
        if virtual_index and virtual_rows is not None:
            index = torch.tensor(virtual_index, dtype=torch.long).to(self._virtual.device, non_blocking=True)
            self._virtual.index_copy_(0, index, virtual_rows.to(self._virtual.dtype))
        graph = self._graphs.get(bucket)
        if graph is None and self.capture:
            graph = self._capture(tokens, kv_bucket)
            if graph is None:
                return None
        self.steps += 1
        if graph is None:
            return self._run_padded(tokens, kv_bucket)
        graph.replay()
        assert self._logits is not None
        return self._logits[:tokens]

    def _copy_in(self, tokens: int, fields: tuple, virtual_index: list[int]) -> None:
        """The step's fields, pads after them, into the bucket's inputs: one host-to-device copy."""
        n = len(fields[0])
        if self._copied is not None:
            self._copied.synchronize()  # the pinned buffer may still feed the last step's copy
        host = self._host[: len(FIELDS) * tokens].view(len(FIELDS), tokens)
        for row, values, pad in zip(host[:-1], fields, self._pad):
            row[:n] = torch.as_tensor(values, dtype=torch.long)
            row[n:] = pad
        is_virtual = host[-1]
        is_virtual.zero_()
        if virtual_index:
            is_virtual[virtual_index] = 1
        self._inputs[: len(FIELDS) * tokens].copy_(host.view(-1), non_blocking=self.capture)
        if self._copied is not None:
            self._copied.record()

    @torch.inference_mode()
    def warm_up(self, num_kv_buckets: int = 2) -> int:
        """Capture the graph of every token bucket over the smallest KV buckets now (start-up), from steps
        of pad tokens only, which touch nothing but the scratch slot: serving then pays no capture for
        short sequences. Where capture is off the same pad steps run eagerly (the CPU tests' check).
        Returns the number of buckets captured (or run); stops once the graphs are off."""
        done = 0
        for kv_bucket in self.kv_buckets[:num_kv_buckets]:
            for tokens in self.token_buckets:
                if not self.enabled:
                    return done
                if (tokens, kv_bucket) in self._graphs or self.bucket(tokens, kv_bucket) != (tokens, kv_bucket):
                    continue
                self._copy_in(tokens, ([],) * (len(FIELDS) - 1), [])
                if not self.capture:
                    self._run_padded(tokens, kv_bucket)
                    done += 1
                elif self._capture(tokens, kv_bucket) is not None:
                    done += 1
        return done

    def _run_padded(self, tokens: int, kv_bucket: int) -> torch.Tensor:
        fields = self._inputs[: len(FIELDS) * tokens].view(len(FIELDS), tokens)
        return self._forward(fields, self._virtual[:tokens], kv_bucket)

    def _capture(self, tokens: int, kv_bucket: int):
        """Capture the bucket's graph over the inputs already copied in; None where that fails (the bucket
        is marked failed, and the graphs are turned off after MAX_CAPTURE_FAILURES buckets).

        Torch's recipe: run the forward on a side stream first (lazy cuBLAS and allocator state), then
        capture into the pool every graph of this runner shares (graphs replay one at a time). The runs
        before the capture compute this very step: they write the same K/V the replay writes again."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    logits = self._run_padded(tokens, kv_bucket)
            torch.cuda.current_stream().wait_stream(side)
            if self._logits is None:
                self._logits = logits.new_empty(self.token_buckets[-1], logits.shape[1])
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (the API's prompt copies, tuning) neither fail nor
            # spoil the capture; only this thread's own forward is captured.
            with torch.cuda.graph(graph, pool=self._mempool, capture_error_mode="thread_local"):
                self._logits[:tokens].copy_(self._run_padded(tokens, kv_bucket))
        except Exception as error:  # out of memory, or an op that syncs with the host: this bucket runs packed
            self.failed.add((tokens, kv_bucket))
            self.capture_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self.enabled = len(self.failed) < MAX_CAPTURE_FAILURES
            log.warning("capturing the CUDA graph of %d tokens over %d KV positions failed (%s); such steps run "
                        "without a graph%s", tokens, kv_bucket, self.capture_error,
                        "" if self.enabled else f", and after {MAX_CAPTURE_FAILURES} failures every step does")
            return None
        self._graphs[(tokens, kv_bucket)] = graph
        self.captures += 1
        log.info("captured the CUDA graph for steps of %d tokens over %d KV positions", tokens, kv_bucket)
        return graph
