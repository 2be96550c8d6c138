"""Our C++ kernels for the CPU serving path, built at first use: decode attention read from the KV pool in
place, the Llama family's RMSNorm in one pass, KV writes, and bf16 linears of few rows.

The batched path (packed_attention.py) gathers every decode row's keys and values out of the pool into
a padded `[rows, kv_heads, max_kv, head_dim]` copy, once per layer, and then calls SDPA on it. On
this CPU the gathers and the SDPA call cost more than the attention's arithmetic: ~9-13 ms of a
~50 ms C=16 decode step on SmolLM2-135M in bf16. `csrc/decode_attention.cpp` reads each row's
extent of the pool where it lies: one task per (row, KV head), float32 scores, softmax and sum (as
torch's CPU flash attention does), parallel over the calling thread's OpenMP pool (`csrc/parallel.h`,
not `at::parallel_for`: see there why).

It is built with torch's extension machinery (`torch.utils.cpp_extension.load`: a C++ compiler and
ninja) the first time a CPU engine starts on a machine, ~30-60 s, and cached by torch
(`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`). `-march=native` makes it fast on the
machine that builds it; the CPU's flags are part of the extension's name, so another CPU builds its own.
Where it cannot be built (no compiler, a read-only cache, a torch without the headers), `load()`
logs why once and returns False, and the engine keeps the SDPA path: same results within float
rounding, slower.

`csrc/rms_norm.cpp` replaces the ~8 eager ops of transformers' `LlamaRMSNorm` (and its copies in
Mistral, Qwen2 and Qwen3, which `RMS_NORM_CLASSES` names; a test holds their code equal to Llama's) by
one pass per row: ~3 ms of a ~37 ms C=16 decode step on SmolLM2 in bf16. It is installed only on bf16
and fp16 models (`install_rms_norms`): the fp32 path keeps the module's own code, so PEFT parity in
fp32 is untouched; in bf16 the sum of squares is added in another order than torch's, so an output
can differ from the module's by one bf16 rounding step. Gemma 3's norm (`(1 + w)`, other rounding)
keeps its own code.

`csrc/small_linear.cpp` is the bf16 linear of decode-sized products (up to `SMALL_LINEAR_MAX_ROWS`
rows) on CPUs with AVX512-BF16 and no AMX, on a weight packed once for it; packed_linear.py uses it.

`csrc/greedy.cpp` picks greedy rows' tokens straight from the logits (sampler.py uses it).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "csrc" / name for name in ("decode_attention.cpp", "rms_norm.cpp", "write_kv.cpp", "small_linear.cpp", "greedy.cpp", "step_attention.cpp")]
HEADERS = sorted((Path(__file__).resolve().parent / "csrc").glob("*.h"))
# transformers' classes whose forward is exactly LlamaRMSNorm's (tests/engine/test_native_kernels.py checks)
RMS_NORM_CLASSES = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def _cpu_tag() -> str:
    """A short hash of this CPU's model and flags: a -march=native build is only valid on such a CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = [line for line in text.splitlines() if line.startswith(("model name", "flags"))][:2]
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()[:10]


@functools.cache
def build_digest() -> str:
    """What the kernels compute depends on: their sources, the compiler flags and this CPU (`-march=native`)."""
    digest = hashlib.sha256("\n".join([*CFLAGS, _cpu_tag()]).encode())
    for path in [*SOURCES, *HEADERS]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def can_build() -> bool:
    return (shutil.which("c++") is not None or shutil.which("g++") is not None) and shutil.which("ninja") is not None


@functools.cache
def load() -> bool:
    """Build (once per machine) and load the kernel; False where it cannot be (the reason is logged once)."""
    if not can_build():
        log.warning("no C++ compiler or no ninja on PATH: decode attention uses the SDPA path (slower)")
        return False
    started = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name=f"softserve_native_{_cpu_tag()}", sources=[str(path) for path in SOURCES],
                           extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as error:  # a build or load failure must never stop the server: the SDPA path stays
        log.warning("building the native kernels failed (%s): decode attention uses the SDPA path (slower)",
                    str(error).strip().splitlines()[-1:] or error)
        return False
    log.info("native kernels loaded in %.1f s (built on this machine's first start)", time.perf_counter() - started)
    ops = ("decode_attention", "rms_norm", "write_kv", "small_linear", "small_or_packed_linear", "greedy_argmax",
           "step_attention")
    if not all(hasattr(torch.ops.softserve_native, op) for op in ops):
        return False
    # the compiled forward traces this op (packed_linear.packed_product): its output's shape, for the tracer
    torch.library.register_fake("softserve_native::small_or_packed_linear")(
        lambda x, small, packed, n, bias, max_small_rows: x.new_empty((*x.shape[:-1], n)))
    torch.library.register_fake("softserve_native::step_attention")(  # [1, T, q_heads, d], as the Python op's
        lambda query, key, value, layer_idx, sliding_window, scaling: query.new_empty(
            (1, query.shape[2], query.shape[1], query.shape[3])))
    return True


def available(device: torch.device) -> bool:
    return device.type == "cpu" and load()


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, kv_start: torch.Tensor,
                     kv_len: torch.Tensor, sliding_window: int | None, scale: float) -> torch.Tensor:
    """q [rows, q_heads, d] (any strides, head_dim contiguous); keys/values one layer of the pool
    [kv_heads, capacity, d]; kv_start/kv_len [rows] int64: row r's query sees slots kv_start[r] ..
    kv_start[r] + kv_len[r] - 1 (the last `sliding_window` of them where that is set); kv_len 0: zeros
    (a query attended elsewhere). A prefill row's queries come as rows of their own, each with its causal
    extent (packed_attention.token_extents). Returns [rows, q_heads, d], contiguous."""
    return torch.ops.softserve_native.decode_attention(q, keys, values, kv_start, kv_len, sliding_window or 0, scale)


def write_kv(keys: torch.Tensor, values: torch.Tensor, new_keys: torch.Tensor, new_values: torch.Tensor,
             slots: torch.Tensor) -> None:
    """keys/values: one layer of the pool [kv_heads, capacity, d]; new_keys/new_values [kv_heads, tokens, d];
    slots [tokens] int64. Exactly `keys.index_copy_(1, slots, new_keys)` and the same for values."""
    torch.ops.softserve_native.write_kv(keys, values, new_keys, new_values, slots)


def set_step_attention(keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor, kv_start: torch.Tensor,
                       kv_len: torch.Tensor) -> None:
    """Hand this thread's next forward the step for `softserve_native::step_attention` (csrc/step_attention.cpp):
    per layer the pool's (keys, values), each token's pool slot and its (kv_start, kv_len) extent. Until
    `clear_step_attention`, every call of that op in this thread writes and attends with these."""
    torch.ops.softserve_native.set_step_attention(keys, values, slots, kv_start, kv_len)


def clear_step_attention() -> None:
    """`step_attention` in this thread goes back to the Python op (softserve::packed_attention)."""
    torch.ops.softserve_native.clear_step_attention()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden], weight [hidden], one dtype: LlamaRMSNorm's output."""
    return torch.ops.softserve_native.rms_norm(x, weight, eps)


def greedy_argmax(logits: torch.Tensor, banned_ids: list[list[int]]) -> torch.Tensor:
    """logits [rows, vocab] on CPU; banned_ids: per row, ids counted as -inf -> [rows] int64: each row's first
    maximal index, a NaN above every number: `logits.float()`, banned set to -inf, `.max(dim=-1).indices`."""
    pairs = [(row, token) for row, ids in enumerate(banned_ids) for token in ids]
    return torch.ops.softserve_native.greedy_argmax(logits, torch.tensor(pairs, dtype=torch.long).reshape(-1, 2))


def cpu_has_bf16_without_amx() -> bool:
    """AVX512-BF16 and no AMX (AMD Zen 4/5, say): there oneDNN's packed weight wins at every row count and
    the small-row kernel beats it at decode row counts; with AMX its tile kernels are the faster choice
    (packed_linear.py). False where this torch cannot tell."""
    has_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return callable(has_amx) and callable(has_bf16) and bool(has_bf16()) and not has_amx()


def small_linear_available() -> bool:
    """The CPU is one the small-row linear kernel is for (`cpu_has_bf16_without_amx`) and it is built here."""
    return cpu_has_bf16_without_amx() and load() and bool(torch.ops.softserve_native.small_linear_supported())


def small_linear_pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] bf16 (K even) -> the kernel's layout [ceil(N/16), K/2, 16, 2] (csrc/small_linear.cpp)."""
    return torch.ops.softserve_native.small_linear_pack(weight)


def small_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [..., K] bf16 -> x W^T + bias [..., out_features] bf16, W given packed (`small_linear_pack`)."""
    return torch.ops.softserve_native.small_linear(x, packed, out_features, bias)


def small_or_packed_linear(x: torch.Tensor, small: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                           out_features: int, max_small_rows: int) -> torch.Tensor:
    """x [..., K] bf16 -> [..., out_features]: `small_linear` up to `max_small_rows` rows, else oneDNN's
    product on its packed weight `packed`; one C++ op, for the compiled graph (csrc/small_linear.cpp)."""
    return torch.ops.softserve_native.small_or_packed_linear(x, small, packed, out_features, bias, max_small_rows)


def install_rms_norms(model: torch.nn.Module) -> int:
    """Route the Llama-family RMSNorms of a bf16/fp16 CPU model through the kernel; returns how many (0:
    nothing to do). Autograd (tuning trains through the model), the compiled forward (inductor fuses the
    norm itself) and an input of another dtype take the module's own forward. Idempotent."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype not in (torch.bfloat16, torch.float16) or not load():
        return 0
    installed = 0
    for module in model.modules():
        if type(module).__name__ not in RMS_NORM_CLASSES:
            continue
        if not getattr(module, "_softserve_native_norm", False):
            module.forward = _native_norm_forward(module, module.forward)
            module._softserve_native_norm = True  # type: ignore[assignment]
        installed += 1
    return installed


def _native_norm_forward(module, module_forward):
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if (x.dtype != weight.dtype or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return module_forward(x)
        return rms_norm(x, weight, module.variance_epsilon)

    return forward
