"""Helpers for engine tests: build engines, prompts and an independent greedy reference."""

from __future__ import annotations

import hashlib
import itertools

import torch

from softserve.engine.config import EngineConfig, SchedulerConfig
from softserve.engine.engine import LLMEngine
from softserve.engine.request import Request, SamplingParams, SoftPrompt, SoftPromptRef

_ids = itertools.count()


def make_engine(model, tokenizer, **sched) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(scheduler=SchedulerConfig(**sched), model_id="test"))


def make_prompt(name: str, k: int, hidden: int, seed: int, scale: float = 1.0) -> SoftPrompt:
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(k, hidden, generator=gen) * scale
    sha = hashlib.sha256(emb.numpy().tobytes()).hexdigest()
    return SoftPrompt(SoftPromptRef(name=name, version=sha[:12], sha256=sha, num_virtual_tokens=k), emb)


def make_request(prompt_ids, *, soft_prompt=None, **sampling) -> Request:
    sampling.setdefault("temperature", 0.0)
    return Request(
        request_id=f"req-{next(_ids)}",
        prompt_ids=list(prompt_ids),
        sampling=SamplingParams(**sampling),
        soft_prompt=soft_prompt,
    )


def run(engine: LLMEngine, requests: list[Request]) -> dict[str, list[int]]:
    outs = engine.generate_sync(requests)
    return {rid: [t for o in seq for t in o.token_ids] for rid, seq in outs.items()}


def mixed_requests(model, max_tokens: int) -> list[Request]:
    """Six greedy requests of 3-30 prompt tokens, with 3 soft prompts of different k and one without."""
    hidden = model.config.hidden_size
    prompts = [make_prompt(f"p{i}", k, hidden, seed=i) for i, k in enumerate((3, 8, 5))] + [None]
    inputs = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate((5, 30, 12, 3, 21, 9))]
    return [make_request(ids, soft_prompt=prompts[i % 4], max_tokens=max_tokens, ignore_eos=True) for i, ids in enumerate(inputs)]


def mixed_step_tokens(model, tokenizer, set_up) -> list[list[int]]:
    """`mixed_requests` through steps that mix chunked prefill, cold prompts and rows joining (4 rows, 16
    prefill tokens per step), on a fresh engine that `set_up(engine)` configures first: each request's 8
    tokens. Tests run it twice, once per engine path."""
    engine = make_engine(model, tokenizer, max_batch_size=4, max_prefill_tokens=16)
    set_up(engine)
    requests = mixed_requests(model, 8)
    done = run(engine, requests)
    return [done[r.request_id] for r in requests]


@torch.inference_mode()
def reference_greedy(model, prompt_ids, soft_prompt, max_tokens, eos_ids=()) -> list[int]:
    """Full recompute, no KV cache, no batching: model(inputs_embeds=[P, embed(ids)])."""
    embed = model.get_input_embeddings()
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        x = embed(torch.tensor([ids]))  # [1, n, hidden]
        if soft_prompt is not None:
            x = torch.cat([soft_prompt.embeddings.unsqueeze(0).to(x.device, x.dtype), x], dim=1)
        logits = model(inputs_embeds=x).logits[0, -1]
        token = int(logits.argmax())
        out.append(token)
        ids.append(token)
        if token in eos_ids:
            break
    return out
