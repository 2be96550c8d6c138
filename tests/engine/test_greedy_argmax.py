"""The greedy-pick kernel (csrc/greedy.cpp) against the torch ops it replaces in the sampler: the same
index on every row, ties, NaN, -inf and banned ids included, in every logits dtype."""

from __future__ import annotations

import copy

import pytest
import torch

from softserve.engine import model_runner, native_kernels
from softserve.engine.request import SamplingParams
from softserve.engine.sampler import sample

pytestmark = pytest.mark.skipif(not native_kernels.can_build(), reason="no C++ compiler or ninja: the sampler uses torch ops")


def torch_pick(logits: torch.Tensor, banned_ids: list[list[int]]) -> torch.Tensor:
    """What sampler.sample did for greedy rows before the kernel (and still does without it)."""
    x = logits.float().clone()
    for row, ids in enumerate(banned_ids):
        if ids:
            x[row, ids] = float("-inf")
    return x.max(dim=-1).indices


def _logits(rows: int, vocab: int, dtype: torch.dtype, case: str) -> tuple[torch.Tensor, list[list[int]]]:
    gen = torch.Generator().manual_seed(rows * 1000 + vocab)
    x = (torch.randn(rows, vocab, generator=gen) * 3).round().to(dtype)  # small integers: many ties for the maximum
    banned: list[list[int]] = [[] for _ in range(rows)]
    if case == "nan":  # the first NaN wins, wherever the maximum is
        x[0, vocab // 2] = float("nan")
        x[0, vocab - 1] = float("nan")
    elif case == "all -inf":
        x[:] = float("-inf")
    elif case == "banned maximum":  # each row's first maximum banned: the next tie or the runner-up wins
        banned = [[int(x[r].float().argmax()), 0] for r in range(rows)]
    elif case == "banned inf and nan":
        x[-1, -1] = float("inf")
        x[0, 0] = float("nan")
        banned[-1].append(vocab - 1)
        banned[0].append(0)
    return x, banned


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows,vocab", [(1, 1), (3, 17), (2, 31), (5, 1000), (16, 49152)])
@pytest.mark.parametrize("case", ["ties", "nan", "all -inf", "banned maximum", "banned inf and nan"])
def test_the_kernel_picks_the_index_torch_picks(dtype, rows, vocab, case):
    logits, banned = _logits(rows, vocab, dtype, case)
    before = logits.clone()
    picked = native_kernels.greedy_argmax(logits, banned)
    assert picked.dtype == torch.long and picked.shape == (rows,)
    assert torch.equal(picked, torch_pick(logits, banned))
    assert torch.equal(logits.isnan(), before.isnan()) and torch.equal(logits.nan_to_num(), before.nan_to_num())  # untouched


def test_a_banned_id_outside_the_vocabulary_is_refused():
    logits = torch.zeros(2, 10)
    with pytest.raises(RuntimeError, match="out of range"):
        native_kernels.greedy_argmax(logits, [[], [10]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sampler_gives_the_same_result_with_and_without_the_kernel(dtype):
    """Greedy rows take the kernel; a row with logprobs or a random row sends the whole batch down the torch
    path, so the kernel only ever answers what it answers exactly."""
    logits, banned = _logits(6, 500, dtype, "banned maximum")
    greedy = [SamplingParams(temperature=0.0) for _ in range(6)]
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    for params in (greedy, greedy[:5] + [SamplingParams(temperature=0.0, logprobs=2)],
                   greedy[:5] + [SamplingParams(temperature=0.8, seed=7)]):
        with_kernel = sample(logits.clone(), params, copy.deepcopy(gens), banned, native=True)
        without = sample(logits.clone(), params, copy.deepcopy(gens), banned, native=False)
        assert torch.equal(with_kernel.token_ids, without.token_ids)
        assert (with_kernel.chosen_logprobs is None) == (params[-1].logprobs is None)


def test_bf16_engine_tokens_are_the_same_with_and_without_the_kernel(tiny_model, tokenizer, monkeypatch):
    """A bf16 engine (bf16 logits) with EOS banned before min_tokens on every row: same tokens either way."""
    from tests.support.engine_utils import make_engine, make_request, run

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    real_sample = model_runner.sample
    outputs = {}
    for native in (True, False):
        monkeypatch.setattr(model_runner, "sample", lambda *a, native_flag=native, **kw: real_sample(*a, **{**kw, "native": native_flag}))
        engine = make_engine(model, tokenizer, max_batch_size=4)
        requests = [make_request(list(range(100 + 5 * i, 110 + 5 * i)), max_tokens=8, min_tokens=8) for i in range(5)]
        done = run(engine, requests)
        outputs[native] = [done[r.request_id] for r in requests]
    assert all(len(tokens) == 8 for tokens in outputs[True])
    assert outputs[True] == outputs[False]
