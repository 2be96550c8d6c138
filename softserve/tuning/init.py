"""Initial values of a soft prompt, as PEFT's PromptEmbedding computes them.

- `text`   (PEFT TEXT): embeddings of `tokenizer(init_text)["input_ids"]`, repeated / truncated to k.
- `random` (PEFT RANDOM): a fresh `torch.nn.Embedding(k, hidden)`, i.e. N(0, 1) entries.
- `vocab`  (PEFT SAMPLE_VOCAB): k rows of the input embedding matrix sampled uniformly.

All of them draw from a generator seeded by the caller, so a seed fixes the result.
"""

from __future__ import annotations

import math

import torch

from softserve.tuning.config import INIT_METHODS

__all__ = ["INIT_METHODS", "PEFT_INIT_NAMES", "init_prompt", "text_init_ids"]

PEFT_INIT_NAMES = {"text": "TEXT", "random": "RANDOM", "vocab": "SAMPLE_VOCAB"}


def text_init_ids(tokenizer, init_text: str, k: int) -> list[int]:
    ids = list(tokenizer(init_text)["input_ids"])
    if not ids:
        raise ValueError("init_text tokenizes to no tokens")
    if len(ids) < k:
        ids = ids * math.ceil(k / len(ids))
    return ids[:k]


@torch.no_grad()
def init_prompt(model, tokenizer, k: int, method: str = "text", init_text: str | None = None, *, seed: int = 0) -> torch.Tensor:
    """A float32 tensor [k, hidden] on the model's device."""
    if k < 1:
        raise ValueError("num_virtual_tokens must be >= 1")
    embed = model.get_input_embeddings()
    weight = embed.weight
    hidden = weight.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if method == "text":
        if not init_text or not init_text.strip():
            raise ValueError("init 'text' needs a non-empty init_text")
        ids = torch.tensor(text_init_ids(tokenizer, init_text, k), device=weight.device)
        out = embed(ids)
    elif method == "vocab":
        ids = torch.randint(0, weight.shape[0], (k,), generator=gen).to(weight.device)
        out = embed(ids)
    elif method == "random":
        out = torch.randn(k, hidden, generator=gen).to(weight.device)
    else:
        raise ValueError(f"init must be one of {INIT_METHODS}, got {method!r}")
    return out.detach().to(torch.float32).clone()
