"""bf16 linears on CPU with their weights packed once for oneDNN, instead of on every call.

`F.linear` on a bf16 CPU tensor already runs oneDNN (AMX / AVX512-BF16), but it reorders the weight
into oneDNN's blocked layout on every call: for a decode step of 16 rows that reorder costs about as
much as the product. vLLM-CPU packs each linear's weight once at load; so do we. The product is the
same oneDNN kernel on the same blocked weight, so its outputs are bitwise those of `F.linear`
(tests/engine/test_packed_linear.py), except at a few row counts with 2+ threads where oneDNN picks
another kernel for the packed weight: an ulp in a few elements (docs/performance.md lists them); where
the small-row kernel below serves the product, within half an ulp of the exact product instead. bf16
is not held token-exact anyway (fp32 is, and packs nothing).

Whether the packed layout also wins for big products depends on the CPU. With AMX it wins only for the
row counts of decode and small mixed steps: measured over SmolLM2-135M's 210 layer linears with cold
caches (bf16, 2 threads, an AMX host), packed vs `F.linear` is 1.44-1.53x from 1 to 96 rows, 1.2-1.4x up
to 256 rows, then 0.93x at 384, 0.94x at 512 and 0.59x at 1,024 rows (a big prefill chunk): oneDNN's
per-call reorder there picks AMX kernels and a layout for the actual row count. On an AVX512-BF16 CPU
without AMX (AMD Zen 5) the packed weight is faster at every row count (1.07x at 640 and 1,024 rows),
and packing prefill products too made a classification wave 1.2x faster (docs/performance.md). So only
there is every product packed; elsewhere (AMX, and CPUs without native bf16, never measured) products
over `MAX_PACKED_ROWS` rows run `F.linear` on the plain weight. The plain weight stays in memory either way (autograd and the fallbacks read it).

On CPUs with AVX512-BF16 and no AMX, products of up to `SMALL_LINEAR_MAX_ROWS` rows (decode steps and
small mixed ones) run our own kernel instead (native_kernels.py, csrc/small_linear.cpp) on a third copy
of the weight in its layout. Over SmolLM2-135M's 121 products on the Zen 5 host it is 1.45x oneDNN's
packed product at 1 row, 1.43x at 16, 1.31x at 64 and 1.08x at 256 (`bench/small_linear.py`,
docs/performance.md "Small-row linears"). Its output is oneDNN's in almost every element (the same
float32 sums of VDPBF16PS, at most an order of additions apart), and a row's output never depends on
the other rows of the call.

Only the serving path uses the packed weight: with autograd recording (prompt tuning trains through
the frozen model), or when the module's weight is no longer the one that was packed (moved, cast,
replaced), the module's own forward runs. The frozen model's weights must not change in place
after packing (nothing in the server does that). Each packed copy costs one more copy of the linear
weights (~270 MB for SmolLM2-135M in bf16): one for oneDNN, and one for the small-row kernel where it runs.

Under the compiled forward (compiled_forward.py) the product is one opaque op: inductor's own lowering
of the oneDNN op accepts only weights it froze itself, and keeping the row-count choice inside the op
means one graph serves every row count. Where the small-row kernel has a copy of the weight that op is
C++ (`softserve_native::small_or_packed_linear`), elsewhere the Python custom op `softserve::packed_linear`:
through the Python op each product paid ~7 us of wrappers, ~0.8 ms of a 15 ms decode step.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from softserve.engine import native_kernels

log = logging.getLogger(__name__)

# Rows per product that the packed layout is tuned for; any row count runs correctly.
ROWS_HINT = 16


def _max_packed_rows() -> int | None:
    """Rows per product above which the plain weight is faster: none on CPUs with AVX512-BF16 and no AMX,
    256 elsewhere (module docstring)."""
    return None if native_kernels.cpu_has_bf16_without_amx() else 256


MAX_PACKED_ROWS: int | None = _max_packed_rows()
# Products of up to this many rows run the small-row kernel where it is built (module docstring).
SMALL_LINEAR_MAX_ROWS = 256


def can_pack(model: nn.Module) -> bool:
    param = next(model.parameters())
    return (param.device.type == "cpu" and param.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_linears(model: nn.Module, small_kernel: bool = False) -> int:
    """Give every bf16 CPU `nn.Linear` of `model` a packed weight; returns how many (0: nothing to do,
    or this torch build has no oneDNN linear ops). With `small_kernel`, where the small-row kernel is
    built for this CPU, also its packed weight (module docstring). Idempotent."""
    if not can_pack(model):
        return 0
    small_kernel = small_kernel and native_kernels.small_linear_available()
    packed = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight.dtype != torch.bfloat16:
            continue
        if getattr(module, "_softserve_packed", None) is not None:
            packed += 1
            continue
        try:
            weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), ROWS_HINT)
        except RuntimeError as error:  # an unusual shape or build: this module keeps F.linear
            log.warning("packing a %s linear failed (%s); it runs unpacked", tuple(module.weight.shape), error)
            continue
        small = None
        if small_kernel:
            try:
                small = small_pack(module.weight.detach())
            except RuntimeError as error:  # out of memory, say: oneDNN serves this module's small products
                log.warning("packing a %s linear for the small-row kernel failed (%s); oneDNN serves it", tuple(module.weight.shape), error)
        # nn.Module's typed __setattr__ takes only tensors and modules, hence the ignores
        module._softserve_packed = (weight, module.weight, small)  # type: ignore[assignment]
        module.forward = _packed_forward(module, module.forward)  # type: ignore[method-assign]
        packed += 1
    return packed


def small_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The small-row kernel's copy of weight [out, in], or None where it takes no such shape (odd `in`)."""
    return native_kernels.small_linear_pack(weight) if weight.shape[1] % 2 == 0 else None


def _product(x: torch.Tensor, packed: torch.Tensor, small: torch.Tensor | None, weight: torch.Tensor,
             bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if small is not None and rows <= SMALL_LINEAR_MAX_ROWS:
        return native_kernels.small_linear(x, small, bias, weight.shape[0])  # [..., out_features]
    if MAX_PACKED_ROWS is not None and rows > MAX_PACKED_ROWS:
        return torch.nn.functional.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # [..., out_features]


@torch.library.custom_op("softserve::packed_linear", mutates_args=())
def packed_linear_op(x: torch.Tensor, packed: torch.Tensor, small: torch.Tensor | None, weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out]: `_product` as one opaque call for the compiled graph."""
    return _product(x, packed, small, weight, bias)


@packed_linear_op.register_fake
def _(x, packed, small, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _packed_forward(module: nn.Linear, unpacked_forward):
    def forward(x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        # identity and dtype, not data_ptr(): the compiled forward traces this, and data_ptr() would
        # break its graph at every linear
        weight, packed_from, small = module._softserve_packed  # type: ignore[misc]
        if (x.dtype != torch.bfloat16 or module.weight is not packed_from or module.weight.dtype != torch.bfloat16
                or module.weight.device.type != "cpu"
                or (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))):
            return unpacked_forward(x)
        return packed_product(x, weight, small, module.weight, module.bias)

    return forward


def packed_product(x: torch.Tensor, packed: torch.Tensor, small: torch.Tensor | None, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] -> [..., out] on `small` (up to SMALL_LINEAR_MAX_ROWS rows, if given), `packed` (up to
    MAX_PACKED_ROWS rows, if set) or `weight`: when torch is tracing, one op opaque to the compiler (the
    C++ op where `small` is given, else the Python custom op), else `_product` directly (eager: without
    an op's dispatch cost)."""
    if torch.compiler.is_compiling():
        if small is not None and MAX_PACKED_ROWS is None:  # the same choice as `_product`, made in C++
            return native_kernels.small_or_packed_linear(x, small, packed, bias, weight.shape[0], SMALL_LINEAR_MAX_ROWS)
        return packed_linear_op(x, packed, small, weight, bias)
    return _product(x, packed, small, weight, bias)


def set_packed(model: nn.Module, enabled: bool) -> None:
    """Switch a packed model's linears between their packed and plain weights (benchmarks compare the two
    on one model). Eager only: a compiled graph was traced for one of them."""
    for module in model.modules():
        state = getattr(module, "_softserve_packed", None)
        if state is not None:
            module._softserve_packed = (state[0], module.weight if enabled else None, state[2])  # type: ignore[assignment]
