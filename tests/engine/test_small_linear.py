"""The small-row bf16 linear kernel (csrc/small_linear.cpp) and where packed_linear.py routes to it.

It runs only where it is built for the CPU (AVX512-BF16, no AMX); elsewhere the tests that call it skip,
and the ones that check nothing is packed for it there still run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from softserve.engine import native_kernels, packed_linear
from softserve.engine.fused_linear import fuse_linears
from softserve.engine.packed_linear import pack_linears

needs_kernel = pytest.mark.skipif(not native_kernels.small_linear_available(),
                                  reason="the small-row kernel is not built for this CPU (no AVX512-BF16, or AMX)")


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 product of the bf16 operands: what one rounding to bf16 should be within half an ulp of."""
    out = x.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def _assert_rounded_once(got: torch.Tensor, exact: torch.Tensor) -> None:
    """Every element within half a bf16 ulp of the exact product (2^-8 relative), plus float32 summation."""
    assert bool(((got.double() - exact).abs() <= exact.abs() * 2.0 ** -8 * 1.01 + 1e-5).all())


@needs_kernel
@pytest.mark.parametrize(("rows", "k", "n", "bias"), [(1, 576, 960, False), (16, 576, 3072, True), (13, 1536, 576, False),
                                                      (5, 64, 50, True), (7, 64, 200, False), (3, 2, 1, True), (64, 96, 1000, True)])
def test_kernel_is_the_product_rounded_once(rows, k, n, bias):
    """Full blocks, partial last blocks (n not a multiple of 16 or 64), n < 16, K = 2, with and without
    bias: every element within one bf16 rounding (half an ulp, plus float32 summation) of the exact product."""
    torch.manual_seed(rows * 1000 + n)
    weight = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
    x = torch.randn(2, rows, k).to(torch.bfloat16)
    b = torch.randn(n).to(torch.bfloat16) if bias else None
    got = native_kernels.small_linear(x, native_kernels.small_linear_pack(weight), b, n)
    assert got.shape == (2, rows, n) and got.dtype == torch.bfloat16
    _assert_rounded_once(got, _reference(x, weight, b))


@needs_kernel
def test_a_rows_output_does_not_depend_on_the_other_rows():
    """Every row count tiles differently (6 + 5 + 5 rows at 16, ...): each row alone, bit for bit."""
    torch.manual_seed(0)
    weight = (torch.randn(200, 128) * 0.05).to(torch.bfloat16)
    packed = native_kernels.small_linear_pack(weight)
    bias = torch.randn(200).to(torch.bfloat16)
    x = torch.randn(300, 128).to(torch.bfloat16)
    solo = torch.cat([native_kernels.small_linear(x[i : i + 1], packed, bias, 200) for i in range(300)])
    for rows in (1, 2, 5, 6, 7, 12, 13, 16, 17, 64, 257, 300):
        assert torch.equal(native_kernels.small_linear(x[:rows], packed, bias, 200), solo[:rows]), rows


@needs_kernel
@pytest.mark.parametrize("n", [200, 1000, 49])
def test_every_thread_count_gives_the_same_bits(n):
    """The column blocks are split between threads (ranges that are not multiples of a tile, 3 threads over
    13 blocks): 2, 3 and 4 threads == 1 thread, bit for bit."""
    torch.manual_seed(n)
    weight = (torch.randn(n, 96) * 0.05).to(torch.bfloat16)
    packed = native_kernels.small_linear_pack(weight)
    bias = torch.randn(n).to(torch.bfloat16)
    x = torch.randn(16, 96).to(torch.bfloat16)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_kernels.small_linear(x, packed, bias, n)
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            assert torch.equal(native_kernels.small_linear(x, packed, bias, n), one), threads
            assert torch.equal(native_kernels.small_linear_pack(weight), packed)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_one_row_one_dimension_and_no_rows():
    torch.manual_seed(2)
    weight = (torch.randn(70, 32) * 0.05).to(torch.bfloat16)
    packed = native_kernels.small_linear_pack(weight)
    x = torch.randn(32).to(torch.bfloat16)
    got = native_kernels.small_linear(x, packed, None, 70)
    assert got.shape == (70,)
    _assert_rounded_once(got, _reference(x, weight, None))
    assert native_kernels.small_linear(torch.randn(0, 32).to(torch.bfloat16), packed, None, 70).shape == (0, 70)


@needs_kernel
def test_strided_input_and_bad_packs():
    torch.manual_seed(1)
    weight = (torch.randn(40, 64) * 0.05).to(torch.bfloat16)
    packed = native_kernels.small_linear_pack(weight)
    x = torch.randn(8, 128).to(torch.bfloat16)[:, ::2]  # not contiguous
    assert torch.equal(native_kernels.small_linear(x, packed, None, 40), native_kernels.small_linear(x.contiguous(), packed, None, 40))
    with pytest.raises(RuntimeError):
        native_kernels.small_linear(torch.randn(2, 62).to(torch.bfloat16), packed, None, 40)  # another K
    with pytest.raises(RuntimeError):
        native_kernels.small_linear_pack((torch.randn(4, 63)).to(torch.bfloat16))  # odd K
    with pytest.raises(RuntimeError):
        native_kernels.small_linear(x, packed, None, 80)  # another N than the pack's
    with pytest.raises(RuntimeError):
        native_kernels.small_linear(x, packed, torch.zeros(41).to(torch.bfloat16), 40)  # a bias of another size


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_op_passes_opcheck(bias):
    """The compiled forward's custom op with the kernel's weight: schema, fake tensor, dispatch as torch
    requires them. oneDNN's packed weight is an opaque tensor opcheck cannot copy; the op does not read
    it when the kernel serves the rows, so the plain weight stands in for it."""
    weight = (torch.randn(40, 64) * 0.05).to(torch.bfloat16)
    b = torch.randn(40).to(torch.bfloat16) if bias else None
    small = native_kernels.small_linear_pack(weight)
    x = torch.randn(1, 5, 64).to(torch.bfloat16)
    torch.library.opcheck(packed_linear.packed_linear_op, (x, weight, small, weight, b))
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, packed_linear.ROWS_HINT)
    assert torch.equal(packed_linear.packed_linear_op(x, packed, small, weight, b), native_kernels.small_linear(x, small, b, 40))


@needs_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_the_compiled_graphs_c_op_passes_opcheck_and_chooses_as_the_python_op(bias, monkeypatch):
    """`softserve_native::small_or_packed_linear`, the op the compiled graph calls where the kernel has a
    copy of the weight: schema, fake tensor and dispatch as torch requires them (rows the kernel serves,
    so the plain weight can stand in for oneDNN's opaque one), and bit for bit `_product` on each side
    of the row limit."""
    weight = (torch.randn(40, 64) * 0.05).to(torch.bfloat16)
    b = torch.randn(40).to(torch.bfloat16) if bias else None
    small = native_kernels.small_linear_pack(weight)
    limit = packed_linear.SMALL_LINEAR_MAX_ROWS
    torch.library.opcheck(torch.ops.softserve_native.small_or_packed_linear.default,
                          (torch.randn(1, 5, 64).to(torch.bfloat16), small, weight, 40, b, limit))
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, packed_linear.ROWS_HINT)
    monkeypatch.setattr(packed_linear, "MAX_PACKED_ROWS", None)
    for rows in (1, 5, limit, limit + 1, 300):
        x = torch.randn(1, rows, 64).to(torch.bfloat16)
        got = native_kernels.small_or_packed_linear(x, small, packed, b, 40, limit)
        assert torch.equal(got, packed_linear._product(x, packed, small, weight, b))
    assert native_kernels.small_or_packed_linear(torch.randn(0, 64).to(torch.bfloat16), small, packed, b, 40, limit).shape == (0, 40)


@needs_kernel
def test_the_engine_runs_the_kernel_and_not_with_native_kernels_off(tiny_model, tokenizer, monkeypatch):
    import copy

    from softserve.engine.config import EngineConfig, SchedulerConfig
    from softserve.engine.engine import LLMEngine
    from tests.support.engine_utils import make_request, run

    calls = []
    kernel = native_kernels.small_linear
    monkeypatch.setattr(native_kernels, "small_linear", lambda *a: calls.append(a[0].shape) or kernel(*a))
    tokens = {}
    for native in (True, False):
        model = copy.deepcopy(tiny_model).to(torch.bfloat16)
        engine = LLMEngine(model, tokenizer, EngineConfig(scheduler=SchedulerConfig(max_batch_size=4), model_id="t",
                                                          native_kernels=native))
        smalls = [m._softserve_packed[2] for m in model.modules() if getattr(m, "_softserve_packed", None) is not None]
        groups = [m._softserve_fused for m in model.modules() if getattr(m, "_softserve_fused", None) is not None]
        calls.clear()
        requests = [make_request(list(range(100 + i, 108 + i)), max_tokens=4, ignore_eos=True) for i in range(3)]
        done = run(engine, requests)
        tokens[native] = [done[r.request_id] for r in requests]
        if native:
            assert calls and any(g.small is not None for g in groups)
        else:
            assert not calls and all(s is None for s in smalls) and all(g.small is None for g in groups)
    assert all(len(t) == 4 for t in tokens[True])


@needs_kernel
def test_rows_up_to_the_limit_run_the_kernel_and_more_run_onednn(monkeypatch):
    """A small-row weight of zeros shows which path ran: only the kernel can return zeros."""
    layer = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    assert pack_linears(layer, small_kernel=True) == 1
    packed, weight, small = layer._softserve_packed
    assert small is not None
    layer._softserve_packed = (packed, weight, native_kernels.small_linear_pack(torch.zeros_like(layer.weight)))
    limit = packed_linear.SMALL_LINEAR_MAX_ROWS
    monkeypatch.setattr(packed_linear, "MAX_PACKED_ROWS", None)
    with torch.no_grad():
        assert torch.count_nonzero(layer(torch.randn(1, limit, 16).to(torch.bfloat16))) == 0
        assert torch.count_nonzero(layer(torch.randn(1, 3, 16).to(torch.bfloat16))) == 0
        big = torch.randn(1, limit + 1, 16).to(torch.bfloat16)
        assert torch.equal(layer(big), torch.ops.mkldnn._linear_pointwise(big, packed, None, "none", [], ""))
    x = torch.randn(1, 3, 16).to(torch.bfloat16).requires_grad_()
    assert torch.count_nonzero(layer(x)) > 0  # autograd: the module's own forward


@needs_kernel
def test_fused_siblings_get_a_kernel_weight_and_give_their_own_products():
    from tests.engine.test_fused_linear import _block, _expected, _outputs

    block = _block(True)
    x = torch.randn(1, 16, 64).to(torch.bfloat16)
    with torch.no_grad():
        expected = _expected(block, x)
        assert pack_linears(block, small_kernel=True) == 6 and fuse_linears(block) == 2
        assert block["attn"].q_proj._softserve_fused.small is not None
        got = _outputs(block, x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.float(), e, rtol=1.6e-2, atol=1e-2)


def test_nothing_is_packed_for_the_kernel_where_it_is_not_available(monkeypatch):
    monkeypatch.setattr(native_kernels, "small_linear_available", lambda: False)
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    if pack_linears(layer, small_kernel=True) == 0:
        pytest.skip("this torch build has no oneDNN linear ops")
    assert layer._softserve_packed[2] is None
    with torch.no_grad():
        x = torch.randn(1, 3, 16).to(torch.bfloat16)
        assert torch.equal(layer(x), torch.ops.mkldnn._linear_pointwise(x, layer._softserve_packed[0], layer.bias, "none", [], ""))


def test_amx_cpus_do_not_use_the_kernel(monkeypatch):
    """With AMX oneDNN's tile kernels are the faster choice at these rows (packed_linear.py)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_kernels.small_linear_available() is False
