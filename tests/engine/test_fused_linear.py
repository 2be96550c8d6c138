"""q/k/v and gate/up as one packed bf16 product (softserve/engine/fused_linear.py): the siblings' outputs are
their own products' (to bf16 rounding), a row's result does not depend on the other rows, the plain
weights are not held twice, any call the stash cannot serve takes the sibling's own forward, and an
engine gives the same tokens fused and unpacked."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from softserve.engine.fused_linear import fuse_linears
from softserve.engine.packed_linear import can_pack, pack_linears, set_packed

pytestmark = pytest.mark.skipif(
    not can_pack(nn.Linear(4, 4).to(torch.bfloat16)), reason="this torch build has no oneDNN bf16 linear ops"
)


class Attention(nn.Module):  # the call order of HF attention: q, then k and v on the same input
    def __init__(self, hidden: int, kv: int, bias: bool):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=bias)
        self.k_proj = nn.Linear(hidden, kv, bias=bias)
        self.v_proj = nn.Linear(hidden, kv, bias=bias)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class MLP(nn.Module):  # HF's LlamaMLP: down(act(gate(x)) * up(x))
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _block(bias: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.ModuleDict({"attn": Attention(64, 32, bias), "mlp": MLP(64, 128)}).to(torch.bfloat16)


def _expected(block, x):
    """Each sibling's product on its own plain weight, in fp32 then rounded: what any kernel should give."""
    lin = lambda m: nn.functional.linear(x.float(), m.weight.float(), None if m.bias is None else m.bias.float())  # noqa: E731
    a, m = block["attn"], block["mlp"]
    return [lin(a.q_proj), lin(a.k_proj), lin(a.v_proj), lin(m.gate_proj), lin(m.up_proj)]


def _outputs(block, x):
    q, k, v = block["attn"](x)
    m = block["mlp"]
    return [q, k, v, m.gate_proj(x), m.up_proj(x)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 16, 133, 300])  # decode, a mixed step, past MAX_PACKED_ROWS where it is set (AMX)
def test_fused_siblings_give_their_own_products(bias, rows):
    block = _block(bias)
    x = torch.randn(1, rows, 64).to(torch.bfloat16)
    with torch.no_grad():
        expected = _expected(block, x)
        assert pack_linears(block) == 6 and fuse_linears(block) == 2
        got = _outputs(block, x)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), e, rtol=1.6e-2, atol=1e-2)  # bf16 rounding of an fp32 product


def test_a_rows_result_does_not_depend_on_the_other_rows():
    block = _block()
    pack_linears(block)
    fuse_linears(block)
    x = torch.randn(1, 16, 64).to(torch.bfloat16)
    with torch.no_grad():
        together = _outputs(block, x)
        for row in (0, 7, 15):
            alone = _outputs(block, x[:, row : row + 1])
            assert all(torch.equal(a[:, 0], t[:, row]) for a, t in zip(alone, together))


def test_the_plain_weights_become_slices_of_the_fused_one():
    block = _block(bias=True)
    attn = block["attn"]
    params = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
    before = [p.detach().clone() for p in params]
    pack_linears(block)
    fuse_linears(block)
    assert fuse_linears(block) == 2  # idempotent
    group = attn.q_proj._softserve_fused
    assert [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight] == params  # same Parameter objects
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    base = group.weight.untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == base for p in params)  # views: no second copy
    assert all(m._softserve_packed[0] is None for m in (attn.q_proj, attn.k_proj, attn.v_proj))  # own packs dropped


def test_a_sibling_called_with_another_input_computes_its_own_product():
    block = _block()
    pack_linears(block)
    fuse_linears(block)
    attn = block["attn"]
    x, y = (torch.randn(1, 4, 64).to(torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        attn.q_proj(x)  # stashes k and v of x
        assert torch.equal(attn.k_proj(y), nn.functional.linear(y, attn.k_proj.weight))
        assert torch.equal(attn.v_proj(y), nn.functional.linear(y, attn.v_proj.weight))
        attn.q_proj(x)
        k = attn.k_proj(x)
        attn.v_proj(x)
        assert attn.q_proj._softserve_fused.stash is None  # the last sibling dropped it
        torch.testing.assert_close(k.float(), _expected(block, x)[1], rtol=1.6e-2, atol=1e-2)


def test_an_input_changed_in_place_after_the_stash_is_computed_again():
    block = _block()
    pack_linears(block)
    fuse_linears(block)
    attn = block["attn"]
    x = torch.randn(1, 4, 64).to(torch.bfloat16)
    with torch.no_grad():
        attn.q_proj(x)  # stashes k and v of x as it is now
        x.copy_(torch.randn(1, 4, 64).to(torch.bfloat16))
        assert torch.equal(attn.k_proj(x), nn.functional.linear(x, attn.k_proj.weight))  # not the stale slice


def test_autograd_and_unpacked_take_the_plain_path():
    block = _block()
    pack_linears(block)
    fuse_linears(block)
    attn = block["attn"]
    for p in block.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 64).to(torch.bfloat16).requires_grad_(True)  # prompt tuning: the input carries P's grad
    q, k, v = attn(x)
    assert torch.equal(k, nn.functional.linear(x, attn.k_proj.weight))
    (q.float().sum() + k.float().sum() + v.float().sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    set_packed(block, False)
    with torch.no_grad():
        z = x.detach()
        assert all(torch.equal(a, nn.functional.linear(z, m.weight)) for a, m in zip(attn(z), (attn.q_proj, attn.k_proj, attn.v_proj)))


def test_engine_tokens_are_the_same_fused_and_unpacked(tiny_model, tokenizer):
    """A bf16 engine (packed and fused by default) against the same model unpacked: mixed prompts,
    prefill and decode, every row count in between."""
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
        fused = sum(getattr(m, "_softserve_fused", None) is not None for m in model.modules())
        assert fused == (5 * tiny_model.config.num_hidden_layers if packed else 0)
        prompts = [make_prompt(f"p{i}", k, hidden, seed=80 + i) for i, k in enumerate((4, 9))] + [None]
        prompts = [p if p is None else dataclasses.replace(p, embeddings=p.embeddings.to(torch.bfloat16)) for p in prompts]
        inputs = [list(range(300 + 7 * i, 300 + 7 * i + n)) for i, n in enumerate((5, 23, 2, 12, 8))]
        requests = [make_request(ids, soft_prompt=prompts[i % 3], max_tokens=8, ignore_eos=True)
                    for i, ids in enumerate(inputs)]
        done = run(engine, requests)
        outputs[packed] = [done[r.request_id] for r in requests]
    assert outputs[True] == outputs[False]
