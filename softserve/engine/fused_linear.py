"""Sibling linears that always read the same input (q/k/v; gate/up) as ONE packed bf16 product.

A decode step of a small model is bound by its linears, and at decode row counts a product's cost is
its weight read plus a fixed cost per call (oneDNN's set-up, and under the compiled forward the custom
op's dispatch). One product over the siblings' concatenated weights pays that fixed cost once and gives
oneDNN a wider N to split between threads: over SmolLM2-135M's 30 layers (bf16, 2 threads) the five
q/k/v/gate/up products become two, 1.13x at 16 rows and 1.32x at 133 rows (a mixed step), and the
compiled step loses 90 custom-op calls (docs/performance.md). vLLM fuses the same way
(QKVParallelLinear, MergedColumnParallelLinear).

The HF model code stays as it is. After `pack_linears`, `fuse_linears` gives every module that has
packed `q_proj`/`k_proj`/`v_proj` (or `gate_proj`/`up_proj`) children one packed weight of their
concatenated weights. The siblings' own weights become row slices (views) of the concatenated plain
weight, which products over `MAX_PACKED_ROWS` rows (where set) and autograd read (packed_linear.py), so nothing is held twice:
the fused packed weights (oneDNN's, and the small-row kernel's where it runs) replace the siblings' own. At run time the first sibling (the one
every architecture calls first: q_proj, gate_proj) computes the fused product and returns its slice;
it leaves the product with its input on the group ("stash"), and a later sibling called with that
very input object, unchanged since (its version counter), returns its slice of it; the last one drops
the stash, so in the HF call order no activation outlives its layer (a stash the last sibling never
takes lives until the group's next call). Any other call (another input, autograd, a replaced, cast
or moved weight, `set_packed(model, False)`) takes the sibling's own `nn.Linear` forward: always
correct, only slower. As for packed_linear.py, the weights must not change in place after fusing. The slices are
strided views: HF attention `.view`s them on the last dimension and the MLP reads them elementwise.

Under the compiled forward the product is the same op (packed_linear.packed_product) on the fused weights,
and the stash is ordinary Python state that the trace follows (one graph, as before).

Outputs: a fused product is the same kernel (oneDNN's, or the small-row kernel) over a wider weight, so
each slice equals the sibling's own packed product up to kernel choice (an ulp in a few elements at
some row counts; the small-row kernel's columns are independent, so there bit for bit).
bf16 is not held token-exact to fp32 anyway; fp32 packs and fuses nothing, so PEFT parity and fp32
batched == solo are untouched. Fused outputs are computed row by row, so a row's result still does not
depend on the other rows of its step (tests/engine/test_fused_linear.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from softserve.engine.packed_linear import ROWS_HINT, packed_product, small_pack

log = logging.getLogger(__name__)

# Children fused when a module has all of them, the one that computes the product first.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedGroup:
    """What the siblings of one module share: the fused weights and the stash of one product."""

    def __init__(self, members: list[nn.Linear], packed: torch.Tensor, small: torch.Tensor | None, weight: torch.Tensor,
                 bias: torch.Tensor | None):
        self.members = members
        self.packed = packed  # oneDNN layout of `weight`
        self.small = small  # the small-row kernel's layout of `weight`, or None (packed_linear.py)
        self.weight = weight  # [sum of out_features, in_features]; each member's weight is a row slice of it
        self.bias = bias  # [sum of out_features] or None; each member's bias is a slice of it
        self.weights = tuple(m.weight for m in members)  # the Parameters fused (identity checks)
        self.biases = tuple(m.bias for m in members)
        bounds, start = [], 0
        for m in members:
            bounds.append((start, start + m.out_features))
            start += m.out_features
        self.bounds = bounds
        # (input, its version counter then (None while tracing), fused output [..., sum_out])
        self.stash: tuple[torch.Tensor, int | None, torch.Tensor] | None = None

    def usable(self, x: torch.Tensor) -> bool:
        """The packed path's gates, for every member: bf16 CPU input, the fused Parameters still in place,
        bf16 and on the CPU (a moved model runs its own forward), still packed (`set_packed(model, False)`
        clears that), no autograd."""
        if x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return False
        for member, weight, bias in zip(self.members, self.weights, self.biases):
            if (member.weight is not weight or member.bias is not bias or member.weight.dtype != torch.bfloat16
                    or member.weight.device.type != "cpu"):
                return False
            if member._softserve_packed[1] is not weight:  # type: ignore[index]
                return False
        return not (torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in self.weights)))


def fuse_linears(model: nn.Module) -> int:
    """Fuse the packed q/k/v and gate/up siblings of `model` (after `pack_linears`); returns how many
    groups are fused. Idempotent; 0 where nothing is packed."""
    groups = 0
    for module in model.modules():
        for names in SIBLINGS:
            found = [getattr(module, name, None) for name in names]
            members = [m for m in found if isinstance(m, nn.Linear) and getattr(m, "_softserve_packed", None) is not None]
            if len(members) != len(names):
                continue
            if getattr(members[0], "_softserve_fused", None) is not None:
                groups += 1
                continue
            if (len({m.in_features for m in members}) != 1 or len({m.bias is None for m in members}) != 1
                    or any(m.weight.dtype != torch.bfloat16 or m.weight.device.type != "cpu" for m in members)):
                continue
            group = _fuse(members)
            if group is not None:
                groups += 1
    return groups


def _fuse(members: list[nn.Linear]) -> FusedGroup | None:
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in members])  # [sum_out, in]
        bias = None if members[0].bias is None else torch.cat([m.bias.detach() for m in members])
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        except RuntimeError as error:  # an unusual shape or build: the siblings stay as they are
            log.warning("packing fused %s failed (%s); they run unfused", [tuple(m.weight.shape) for m in members], error)
            return None
        small = None
        if all(m._softserve_packed[2] is not None for m in members):  # type: ignore[index]
            try:
                small = small_pack(weight)
            except RuntimeError as error:  # out of memory, say: oneDNN serves the fused product's small rows
                log.warning("packing fused %s for the small-row kernel failed (%s)", [tuple(m.weight.shape) for m in members], error)
        start = 0
        for m in members:
            # The member's Parameter object stays (its identity is what the gates check); its data becomes
            # a slice of the fused weight, so the plain weights are not held twice.
            m.weight.data = weight[start : start + m.out_features]
            if bias is not None:
                m.bias.data = bias[start : start + m.out_features]
            start += m.out_features
    group = FusedGroup(members, packed, small, weight, bias)
    last = len(members) - 1
    for index, member in enumerate(members):
        # The member's own packed weight is no longer read: keep only the marker set_packed toggles.
        member._softserve_packed = (None, member.weight, None)  # type: ignore[assignment]
        member._softserve_fused = group  # type: ignore[assignment]
        plain = nn.Linear.forward.__get__(member)
        member.forward = _first_forward(group, plain) if index == 0 else _later_forward(group, index, index == last, plain)  # type: ignore[method-assign]
    return group


def _first_forward(group: FusedGroup, plain):
    begin, end = group.bounds[0]

    def forward(x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
        if not group.usable(x):
            group.stash = None
            return plain(x)
        out = packed_product(x, group.packed, group.small, group.weight, group.bias)  # [..., sum of out_features]
        group.stash = (x, _version(x), out)
        return out[..., begin:end]

    return forward


def _later_forward(group: FusedGroup, index: int, is_last: bool, plain):
    begin, end = group.bounds[index]

    def forward(x: torch.Tensor) -> torch.Tensor:
        stash = group.stash
        # the same object, not changed in place since (a stash the last sibling never took can be old)
        if stash is None or stash[0] is not x or stash[1] != _version(x):
            return plain(x)
        if is_last:
            group.stash = None
        return stash[2][..., begin:end]

    return forward


def _version(x: torch.Tensor) -> int | None:
    """x's in-place version counter; None while torch traces (the graph is functional: no in-place
    change of a traced input between two siblings to detect) and for inference-mode tensors, which keep
    no counter (the engine's forward: HF code changes no linear's input between its siblings)."""
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    return x._version
