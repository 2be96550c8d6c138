"""Engine steps padded to CUDA-graph buckets (cuda_graphs.py).

On CPU the padded forward runs without capture: it must give the packed path's tokens exactly (prompt
chunks, soft prompts' virtual tokens, decode rows, scoring), and its attention must equal the per-row
reference. The `gpu` tests run the captured graphs on a CUDA device (`pytest -m gpu
tests/engine/test_cuda_graphs.py` on a GPU machine; bench/gpu_device_run.sh runs them).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.engine_utils import make_engine, make_prompt, make_request, mixed_requests, mixed_step_tokens, run
from softserve.engine.cuda_graphs import MAX_CAPTURE_FAILURES, MAX_GATHERED_BYTES, StepGraphs, kv_buckets, token_buckets
from softserve.engine.kv_cache import KVPool
from softserve.engine.packed_attention import (
    PackedRow, PaddedTokens, padded_token_attention, reference_attention, token_extents,
)


def test_buckets_cover_every_size_once():
    assert token_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert token_buckets(20) == [1, 2, 4, 8, 16, 24]  # the first bucket that holds 20 tokens ends the list
    assert token_buckets()[-1] == 512 and token_buckets(10_000)[-1] == 512  # longer steps run eagerly
    assert kv_buckets(2048) == [256, 512, 1024, 2048]
    assert kv_buckets(2049)[-1] == 4096 and kv_buckets(10) == [256]


def test_bucket_of_a_step():
    graphs = StepGraphs(lambda *a: None, scratch_slot=0, hidden=8, dtype=torch.float32, device=torch.device("cpu"),
                        max_kv=1000, kv_bytes_per_position=1024, capture=False)
    assert graphs.bucket(3, 100) == (4, 256)
    assert graphs.bucket(17, 257) == (24, 512)
    assert graphs.bucket(513, 10) is None  # more tokens than any bucket
    assert graphs.bucket(1, 1025) is None  # longer than any admitted sequence
    longer = StepGraphs(lambda *a: None, scratch_slot=0, hidden=8, dtype=torch.float32, device=torch.device("cpu"),
                        max_kv=4000, kv_bytes_per_position=1024, capture=False)
    assert longer.bucket(200, 2000) is None and 224 * 2048 * 1024 > MAX_GATHERED_BYTES  # too many keys to gather
    assert longer.bucket(100, 2000) == (128, 2048)


def test_failed_captures_fall_back_to_the_packed_path(tiny_model, tokenizer):
    """A capture that raises (here: no CUDA at all) serves its step by the packed path, the same tokens;
    the bucket stays packed, and after MAX_CAPTURE_FAILURES buckets every step does."""
    engines: list = []

    def failing(engine):
        engine.runner.use_step_graphs(max_kv=engine.config.scheduler.max_model_len, capture=False)
        engine.runner.step_graphs.capture = True  # every capture attempt raises on this machine
        engines.append(engine)

    assert mixed_step_tokens(tiny_model, tokenizer, failing) == mixed_step_tokens(tiny_model, tokenizer, lambda e: None)
    engine = engines[0]
    graphs = engine.runner.step_graphs
    assert graphs.steps == 0 and graphs.captures == 0 and graphs.capture_error
    assert not graphs.enabled and len(graphs.failed) == MAX_CAPTURE_FAILURES
    assert engine.runner.forward_passes == engine.steps_run  # one forward per step, the failed attempts included


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_padded_attention_equals_the_per_row_reference(sliding_window):
    """Decode rows and prompt chunks, every token its own query, plus two pad tokens over the scratch slot."""
    kv_heads, q_heads, head_dim = 2, 6, 16
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, capacity=300, dtype=torch.float32, device="cpu")
    pool.storage.copy_(torch.randn(pool.storage.shape, generator=gen))
    keys, values = pool.layer(0)
    shapes = [(1, 1, 0), (1, 37, 10), (6, 9, 60), (1, 64, 100), (12, 12, 200), (3, 40, 230)]  # (q_len, kv_len, kv_start)
    rows, q = [], 0
    for q_len, kv_len, kv_start in shapes:
        rows.append(PackedRow(q_start=q, q_len=q_len, kv_start=kv_start, kv_len=kv_len))
        q += q_len
    rows = tuple(rows)
    queries = torch.randn(q, q_heads, head_dim, generator=gen)
    want = reference_attention(rows, queries, keys, values, sliding_window, None)
    starts, lengths = token_extents(rows)
    padded = PaddedTokens(torch.cat([starts, torch.tensor([pool.scratch_slot] * 2)]),
                          torch.cat([lengths, torch.tensor([1, 1])]), kv_bucket=64)
    got = padded_token_attention(padded, torch.cat([queries, torch.randn(2, q_heads, head_dim, generator=gen)]),
                                 keys, values, sliding_window, None)
    assert got.shape == (q + 2, q_heads, head_dim)
    torch.testing.assert_close(got[:q], want, rtol=1e-5, atol=1e-5)


def _padded(engines):
    def set_up(engine):
        engine.runner.use_step_graphs(max_kv=engine.config.scheduler.max_model_len, capture=False)
        engines.append(engine)
    return set_up


def test_padded_steps_give_the_packed_tokens(tiny_model, tokenizer):
    """Chunked prefill, cold prompts computed inline, rows joining: every step padded to its bucket."""
    engines: list = []
    want = mixed_step_tokens(tiny_model, tokenizer, lambda engine: None)
    got = mixed_step_tokens(tiny_model, tokenizer, _padded(engines))
    assert got == want
    graphs = engines[0].runner.step_graphs
    assert graphs.steps == engines[0].steps_run and graphs.captures == 0  # every step padded, eagerly on CPU


def test_padded_steps_keep_rows_apart(tiny_model, tokenizer):
    """Three rows (two soft prompts, one plain) decoding together in padded steps: each == its solo run."""
    hidden = tiny_model.config.hidden_size
    prompts = [make_prompt("a", 5, hidden, 1), make_prompt("b", 9, hidden, 2), None]
    inputs = [list(range(200, 207)), list(range(300, 320)), list(range(400, 403))]

    def requests():
        return [make_request(ids, soft_prompt=p, max_tokens=10, ignore_eos=True) for ids, p in zip(inputs, prompts)]

    solo = []
    for request in requests():
        solo.append(run(make_engine(tiny_model, tokenizer), [request])[request.request_id])
    engine = make_engine(tiny_model, tokenizer)
    engine.runner.use_step_graphs(max_kv=engine.config.scheduler.max_model_len, capture=False)
    batch = requests()
    done = run(engine, batch)
    assert [done[r.request_id] for r in batch] == solo
    assert engine.runner.step_graphs.steps >= 10


def test_padded_steps_score_prompts_as_the_packed_path(tiny_model, tokenizer):
    """prompt_logprobs reads logits of prompt positions: the padded step keeps every token's, the same values."""
    prompt = make_prompt("s", 4, tiny_model.config.hidden_size, 5)
    results = []
    for padded in (False, True):
        engine = make_engine(tiny_model, tokenizer)
        if padded:
            engine.runner.use_step_graphs(max_kv=engine.config.scheduler.max_model_len, capture=False)
        request = make_request(range(600, 615), soft_prompt=prompt, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
        results.append(engine.generate_sync([request])[request.request_id][0].prompt_logprobs)
    want, got = results
    assert len(got) == len(want) == 15 and got[0] is None and want[0] is None
    assert [(e.token_id, [t for t, _, _ in e.top]) for e in got[1:]] == [(e.token_id, [t for t, _, _ in e.top]) for e in want[1:]]
    for a, b in zip(got[1:], want[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [lp for _, _, lp in a.top] == pytest.approx([lp for _, _, lp in b.top], abs=1e-5)


# ---- on a CUDA device ----------------------------------------------------------------------------

gpu = pytest.mark.gpu


def _cuda_engine(model, tokenizer, graphs: bool):
    from softserve.engine.config import EngineConfig, SchedulerConfig
    from softserve.engine.engine import LLMEngine

    config = EngineConfig(scheduler=SchedulerConfig(max_batch_size=8), cuda_graphs=graphs, model_id="gpu-test",
                          kv_cache_bytes=64 * 1024 * 1024)
    return LLMEngine(model, tokenizer, config)


@pytest.fixture(scope="module")
def cuda_tiny(tiny_model):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import copy

    return copy.deepcopy(tiny_model).to("cuda")


@gpu
def test_cuda_graph_steps_equal_eager_steps_and_the_full_recompute(cuda_tiny, tokenizer):
    """fp32 on the GPU: captured step graphs == eager packed steps == HF full recompute, token for token."""
    from tests.support.engine_utils import reference_greedy

    results = {}
    for graphs in (False, True):
        engine = _cuda_engine(cuda_tiny, tokenizer, graphs)
        batch = mixed_requests(cuda_tiny, 12)
        done = run(engine, batch)
        results[graphs] = [done[r.request_id] for r in batch]
        if graphs:
            graphs = engine.runner.step_graphs
            assert graphs.capture_error is None, graphs.capture_error
            assert graphs.captures > 0 and graphs.steps == engine.steps_run  # prompt chunks replayed too
    assert results[True] == results[False]
    for request, tokens in zip(mixed_requests(cuda_tiny, 12), results[True]):
        with torch.device("cuda"):  # reference_greedy makes its id tensors on the default device
            assert tokens == reference_greedy(cuda_tiny, request.prompt_ids, request.soft_prompt, 12)


@gpu
def test_peft_prompt_tuning_parity_on_cuda(cuda_tiny, tokenizer, tmp_path):
    """A prompt-tuning adapter made and saved by PEFT, read from its files and served on the GPU with graphs
    on == PeftModel's own greedy tokens (full recompute on the same GPU), fp32."""
    import hashlib

    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
    from safetensors.torch import load_file

    from softserve.engine.request import SoftPrompt, SoftPromptRef

    k, steps = 6, 10
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k, prompt_tuning_init=PromptTuningInit.RANDOM)
    with torch.no_grad():
        reference = get_peft_model(cuda_tiny, config).to("cuda").eval()
        reference.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    reference.save_pretrained(tmp_path)
    ids = list(range(500, 511))
    want: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            seq = torch.tensor([ids + want], device="cuda")
            logits = reference(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
            want.append(int(logits[0, -1].argmax()))
    embeddings = load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"]  # PEFT's own file
    sha = hashlib.sha256(embeddings.float().cpu().numpy().tobytes()).hexdigest()
    prompt = SoftPrompt(SoftPromptRef(name="peft", version=sha[:12], sha256=sha, num_virtual_tokens=k), embeddings.cpu())
    engine = _cuda_engine(cuda_tiny, tokenizer, graphs=True)
    request = make_request(ids, soft_prompt=prompt, max_tokens=steps, ignore_eos=True)
    assert run(engine, [request])[request.request_id] == want
    assert engine.runner.step_graphs.steps == engine.steps_run


def test_start_up_pad_steps_touch_only_the_scratch_slot(tiny_model, tokenizer):
    """warm_up runs every bucket's step on pad tokens (captured on a GPU, eagerly here): no slot a request
    could own changes, whatever its contents."""
    engine = make_engine(tiny_model, tokenizer)
    engine.runner.use_step_graphs(max_kv=engine.config.scheduler.max_model_len, capture=False)
    pool = engine.runner.pool
    pool.storage.copy_(torch.randn(pool.storage.shape, generator=torch.Generator().manual_seed(0)))
    before = pool.storage.clone()
    done = engine.runner.step_graphs.warm_up(num_kv_buckets=1)
    assert done == len(engine.runner.step_graphs.token_buckets)
    scratch = pool.scratch_slot
    assert torch.equal(pool.storage[..., :scratch, :], before[..., :scratch, :])
    assert not torch.equal(pool.storage[..., scratch, :], before[..., scratch, :])  # the pads did write there
