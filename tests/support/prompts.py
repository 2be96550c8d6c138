"""Soft-prompt fixtures for store and API tests: a tiny model's facts, a PEFT config, tensors and files."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save as st_save

from softserve.store.types import ModelInfo

H = 64  # hidden size of the tiny model these prompts fit
MODEL = ModelInfo(name="tiny-llama", hidden_size=H, num_layers=2, num_attention_heads=4)
CFG = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}).encode()


def tensor(seed: int, k: int = 4) -> torch.Tensor:
    """A reproducible [k, H] prompt."""
    return torch.randn(k, H, generator=torch.Generator().manual_seed(seed))


def blob(seed: int, k: int = 4) -> bytes:
    """`tensor(seed, k)` as a PEFT adapter_model.safetensors."""
    return st_save({"prompt_embeddings": tensor(seed, k)}, metadata={"format": "pt"})
