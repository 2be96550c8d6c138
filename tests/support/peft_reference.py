"""The reference every parity test compares with: PEFT's own model, decoding greedily by full recompute."""

from __future__ import annotations

import torch

PROMPTS = ["The capital of France is", "Translate to French: good morning", "1, 2, 3, 4,", "Write a haiku about the sea"]


@torch.inference_mode()
def peft_greedy(base_model, adapter_dir, input_ids: list[int], max_tokens: int, eos_ids: set[int]) -> list[int]:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    ids = list(input_ids)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in eos_ids:
            break
        ids.append(token)
    return out
