"""bf16 CPU linears on weights packed once (softserve/engine/packed_linear.py): bitwise the outputs of
`F.linear`, at every row count an engine step produces; autograd and changed weights take the
unpacked path; a whole engine gives the same tokens packed and unpacked."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from softserve.engine.packed_linear import can_pack, pack_linears

pytestmark = pytest.mark.skipif(
    not can_pack(nn.Linear(4, 4).to(torch.bfloat16)), reason="this torch build has no oneDNN bf16 linear ops"
)


def _linear(in_features, out_features, bias, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (16, 64), (3, 7, 64), (1, 300, 64)])
def test_packed_equals_f_linear_bitwise(bias, shape):
    layer = _linear(64, 96, bias)
    x = torch.randn(*shape).to(torch.bfloat16)
    with torch.no_grad():
        expected = layer(x)
        assert pack_linears(layer) == 1
        assert layer._softserve_packed is not None
        got = layer(x)
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_autograd_and_changed_weights_take_the_unpacked_path():
    layer = _linear(32, 48, True)
    pack_linears(layer)
    layer.weight.requires_grad_(False)
    x = torch.randn(5, 32).to(torch.bfloat16).requires_grad_(True)  # prompt tuning: the input carries P's grad
    layer(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        layer.weight = nn.Parameter(torch.zeros_like(layer.weight))  # a new tensor: the unpacked path
        assert torch.equal(layer(x), layer.bias.expand(5, 48))
    layer.float()  # cast back to fp32: unpacked path, fp32 math
    assert layer(torch.randn(2, 32)).dtype == torch.float32


def test_pack_is_a_no_op_off_bf16_and_idempotent():
    assert pack_linears(nn.Linear(8, 8)) == 0  # fp32: F.linear stays
    layer = _linear(8, 8, False)
    assert pack_linears(layer) == 1 and pack_linears(layer) == 1
    with torch.no_grad():
        x = torch.randn(3, 8).to(torch.bfloat16)
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight))


def test_engine_tokens_are_the_same_packed_and_unpacked(tiny_model, tokenizer):
    """A bf16 engine (packed by default) against the same model unpacked: mixed prompts, prefill and
    decode, every row count in between."""
    from softserve.engine.config import EngineConfig, SchedulerConfig
    from softserve.engine.engine import LLMEngine
    from tests.support.engine_utils import make_prompt, make_request, run

    hidden = tiny_model.config.hidden_size
    outputs = {}
    for packed in (True, False):
        model = copy.deepcopy(tiny_model).to(torch.bfloat16)
        config = EngineConfig(scheduler=SchedulerConfig(max_batch_size=4, max_prefill_tokens=16), model_id="t",
                              pack_linears=packed)
        engine = LLMEngine(model, tokenizer, config)
        assert any(getattr(m, "_softserve_packed", None) is not None for m in model.modules()) is packed
        prompts = [make_prompt(f"p{i}", k, hidden, seed=70 + i) for i, k in enumerate((4, 9))] + [None]
        prompts = [p if p is None else dataclasses.replace(p, embeddings=p.embeddings.to(torch.bfloat16)) for p in prompts]
        inputs = [list(range(200 + 7 * i, 200 + 7 * i + n)) for i, n in enumerate((5, 23, 2, 12, 8))]
        requests = [make_request(ids, soft_prompt=prompts[i % 3], max_tokens=8, ignore_eos=True)
                    for i, ids in enumerate(inputs)]
        done = run(engine, requests)
        outputs[packed] = [done[r.request_id] for r in requests]
    assert outputs[True] == outputs[False]
    assert all(len(tokens) == 8 for tokens in outputs[True])


def test_products_over_max_packed_rows_run_on_the_plain_weight(monkeypatch):
    """Big prefill chunks are faster unpacked on AMX CPUs (module docstring): a packed weight of zeros shows
    which path ran, since only the packed path can return zeros. The limit is pinned to the AMX value, so
    the branch runs on every CPU."""
    from softserve.engine import packed_linear

    monkeypatch.setattr(packed_linear, "MAX_PACKED_ROWS", 256)
    layer = _linear(16, 8, False)
    pack_linears(layer)
    zeros = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(layer.weight), 16)
    layer._softserve_packed = (zeros, layer._softserve_packed[1], None)
    limit = packed_linear.MAX_PACKED_ROWS
    with torch.no_grad():
        small = torch.randn(1, limit, 16).to(torch.bfloat16)
        big = torch.randn(1, limit + 1, 16).to(torch.bfloat16)
        assert torch.count_nonzero(layer(small)) == 0
        assert torch.equal(layer(big), nn.functional.linear(big, layer.weight))
        assert torch.count_nonzero(layer(big)) > 0


def test_without_amx_every_product_is_packed(monkeypatch):
    """No limit on CPUs with AVX512-BF16 and no AMX (there the packed weight is faster at every row count),
    256 rows elsewhere; with none, a product far over 256 rows still runs on the packed weight."""
    from softserve.engine import packed_linear

    for amx, bf16, limit in ((True, True, 256), (False, False, 256), (False, True, None)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda bf16=bf16: bf16, raising=False)
        assert packed_linear._max_packed_rows() == limit
    monkeypatch.setattr(packed_linear, "MAX_PACKED_ROWS", None)
    layer = _linear(16, 8, False)
    pack_linears(layer)
    zeros = torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(layer.weight), 16)
    layer._softserve_packed = (zeros, layer._softserve_packed[1], None)
    with torch.no_grad():
        assert torch.count_nonzero(layer(torch.randn(1, 1000, 16).to(torch.bfloat16))) == 0


@pytest.mark.slow
@pytest.mark.process  # inductor runs the C++ compiler
def test_compiled_forward_runs_the_packed_op_with_the_same_tokens(tiny_model, tokenizer, monkeypatch):
    """The compiled graph calls `softserve::packed_linear` (inductor cannot lower the raw oneDNN op on a
    weight it did not freeze); its tokens are those of the compiled graph on plain weights. One prompt
    is longer than MAX_PACKED_ROWS, so the op's plain-weight branch runs inside the graph too."""
    import softserve.engine.engine as engine_module
    from softserve.engine import packed_linear
    from softserve.engine.config import EngineConfig, SchedulerConfig
    from softserve.engine.engine import LLMEngine
    from tests.support.engine_utils import make_prompt, make_request, run

    monkeypatch.setattr(engine_module, "use_compile", lambda *args: True)
    monkeypatch.setattr(packed_linear, "MAX_PACKED_ROWS", 256)  # the AMX value: the plain branch runs here too
    calls = []
    product = packed_linear._product
    monkeypatch.setattr(packed_linear, "_product", lambda *a: calls.append(a[0].shape) or product(*a))
    hidden = tiny_model.config.hidden_size
    outputs = {}
    for packed in (True, False):
        torch._dynamo.reset()
        model = copy.deepcopy(tiny_model).to(torch.bfloat16)
        config = EngineConfig(scheduler=SchedulerConfig(max_batch_size=4, max_prefill_tokens=512), model_id="t",
                              pack_linears=packed)
        engine = LLMEngine(model, tokenizer, config)
        assert engine.runner.compiled_forward is not None
        prompts = [make_prompt(f"p{i}", k, hidden, seed=80 + i) for i, k in enumerate((4, 9))] + [None]
        prompts = [p if p is None else dataclasses.replace(p, embeddings=p.embeddings.to(torch.bfloat16)) for p in prompts]
        inputs = [list(range(100 + i, 100 + i + n)) for i, n in enumerate((5, packed_linear.MAX_PACKED_ROWS + 20, 3, 12))]
        requests = [make_request(ids, soft_prompt=prompts[i % 3], max_tokens=6, ignore_eos=True)
                    for i, ids in enumerate(inputs)]
        calls.clear()
        done = run(engine, requests)
        outputs[packed] = [done[r.request_id] for r in requests]
        if packed:
            assert any(rows[-2] > packed_linear.MAX_PACKED_ROWS for rows in calls) and any(rows[-2] <= 4 for rows in calls)
        else:
            assert not calls
    assert outputs[True] == outputs[False]
    assert all(len(tokens) == 6 for tokens in outputs[True])
