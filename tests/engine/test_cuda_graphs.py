"""Decode steps padded to CUDA-graph buckets (cuda_graphs.py).

On CPU the padded forward runs without capture: it must give the packed path's tokens exactly, and its
attention must equal the per-row reference. The `gpu` tests run the captured graphs on a CUDA device
(`pytest -m gpu tests/engine/test_cuda_graphs.py` on a GPU machine; bench/gpu_device_run.sh runs them).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.engine_utils import make_engine, make_prompt, make_request, mixed_step_tokens, run
from softserve.engine.cuda_graphs import DecodeGraphs, kv_buckets, row_buckets
from softserve.engine.kv_cache import KVPool
from softserve.engine.packed_attention import PackedRow, PaddedDecode, padded_decode_attention, reference_attention


def test_buckets_cover_every_size_once():
    assert row_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 24]  # the first bucket that holds 20 rows ends the list
    assert row_buckets(1000)[-1] == 256  # past 256 rows a step decodes eagerly
    assert kv_buckets(2048) == [256, 512, 1024, 2048]
    assert kv_buckets(2049)[-1] == 4096 and kv_buckets(10) == [256]


def test_bucket_of_a_step():
    graphs = DecodeGraphs(lambda *a: None, scratch_slot=0, device=torch.device("cpu"), max_rows=32, max_kv=1000,
                          capture=False)
    assert graphs.bucket(3, 100) == (4, 256)
    assert graphs.bucket(17, 257) == (24, 512)
    assert graphs.bucket(33, 10) is None  # more rows than the scheduler runs
    assert graphs.bucket(1, 1025) is None  # longer than any admitted sequence


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_padded_attention_equals_the_per_row_reference(sliding_window):
    kv_heads, q_heads, head_dim = 2, 6, 16
    gen = torch.Generator().manual_seed(0)
    pool = KVPool(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, capacity=200, dtype=torch.float32, device="cpu")
    pool.storage.copy_(torch.randn(pool.storage.shape, generator=gen))
    keys, values = pool.layer(0)
    extents = [(0, 1), (10, 37), (60, 9), (100, 64)]  # (kv_start, kv_len), one a single position, one a full bucket
    rows = tuple(PackedRow(q_start=i, q_len=1, kv_start=s, kv_len=n) for i, (s, n) in enumerate(extents))
    queries = torch.randn(len(rows), q_heads, head_dim, generator=gen)
    want = reference_attention(rows, queries, keys, values, sliding_window, None)
    # padded with two pad rows over the scratch slot, as cuda_graphs.py pads a step
    starts = [s for s, _ in extents] + [pool.scratch_slot] * 2
    lengths = [n for _, n in extents] + [1, 1]
    padded = PaddedDecode(torch.tensor(starts), torch.tensor(lengths), kv_bucket=64)
    padded_queries = torch.cat([queries, torch.randn(2, q_heads, head_dim, generator=gen)])
    got = padded_decode_attention(padded, padded_queries, keys, values, sliding_window, None)
    assert got.shape == (6, q_heads, head_dim)
    torch.testing.assert_close(got[: len(rows)], want, rtol=1e-5, atol=1e-5)


def test_padded_decode_steps_give_the_packed_tokens(tiny_model, tokenizer):
    """Chunked prefill, cold prompts and rows joining, with every decode-only step padded to a bucket."""
    engines = []

    def padded(engine):
        engine.runner.use_decode_graphs(max_rows=4, max_kv=engine.config.scheduler.max_model_len, capture=False)
        engines.append(engine)

    want = mixed_step_tokens(tiny_model, tokenizer, lambda engine: None)
    got = mixed_step_tokens(tiny_model, tokenizer, padded)
    assert got == want
    graphs = engines[0].runner.decode_graphs
    assert graphs.replays > 0 and graphs.captures == 0  # padded steps ran, eagerly (nothing to capture on CPU)


def test_padded_decode_keeps_rows_apart_and_leaves_the_pool_outside_them(tiny_model, tokenizer):
    """Three rows (two soft prompts, one plain) decoding in a 4-row bucket: each == its solo run, and no
    slot outside the rows' own and the scratch slot changes."""
    hidden = tiny_model.config.hidden_size
    prompts = [make_prompt("a", 5, hidden, 1), make_prompt("b", 9, hidden, 2), None]
    inputs = [list(range(200, 207)), list(range(300, 320)), list(range(400, 403))]

    def requests():
        return [make_request(ids, soft_prompt=p, max_tokens=10, ignore_eos=True) for ids, p in zip(inputs, prompts)]

    solo = []
    for request in requests():
        solo.append(run(make_engine(tiny_model, tokenizer), [request])[request.request_id])
    engine = make_engine(tiny_model, tokenizer)
    engine.runner.use_decode_graphs(max_rows=4, max_kv=engine.config.scheduler.max_model_len, capture=False)
    batch = requests()
    done = run(engine, batch)
    assert [done[r.request_id] for r in batch] == solo
    assert engine.runner.decode_graphs.replays >= 9


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


def _mixed_requests(model):
    hidden = model.config.hidden_size
    prompts = [make_prompt(f"g{i}", k, hidden, seed=i) for i, k in enumerate((3, 8, 5))] + [None]
    inputs = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate((5, 30, 12, 3, 21, 9))]
    return [make_request(ids, soft_prompt=prompts[i % 4], max_tokens=12, ignore_eos=True) for i, ids in enumerate(inputs)]


@gpu
def test_cuda_graph_steps_equal_eager_steps_and_the_full_recompute(cuda_tiny, tokenizer):
    """fp32 on the GPU: captured decode graphs == eager packed steps == HF full recompute, token for token."""
    from tests.support.engine_utils import reference_greedy

    results = {}
    for graphs in (False, True):
        engine = _cuda_engine(cuda_tiny, tokenizer, graphs)
        batch = _mixed_requests(cuda_tiny)
        done = run(engine, batch)
        results[graphs] = [done[r.request_id] for r in batch]
        if graphs:
            decode_graphs = engine.runner.decode_graphs
            assert decode_graphs.capture_error is None, decode_graphs.capture_error
            assert decode_graphs.captures > 0 and decode_graphs.replays > decode_graphs.captures
    assert results[True] == results[False]
    for request, tokens in zip(_mixed_requests(cuda_tiny), results[True]):
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
    assert engine.runner.decode_graphs.replays >= steps - 1
