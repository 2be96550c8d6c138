"""Composed prompts ("a+b"): several stored prompts served as one, their tensors concatenated along k.

Prompt tuning: the input embeddings [P_a; P_b]. Prefix tuning: the prefix KV of a, then b's (the tensor
holds per-layer K/V for each virtual position, so concatenating rows concatenates the prefixes).
A composition is identified by the content hashes of its parts in order, so its caches (device tensor,
KV prefix) never collide with a single prompt's, nor with the same parts in another order.
"""

from __future__ import annotations

import hashlib

import torch

from .types import PromptMeta, PromptValidationError

__all__ = ["composed_sha256", "compose_meta", "load_composed_tensor"]


def composed_sha256(parts: list[PromptMeta] | tuple[PromptMeta, ...]) -> str:
    return hashlib.sha256(("compose:" + ":".join(p.sha256 for p in parts)).encode("ascii")).hexdigest()


def compose_meta(parts: list[PromptMeta] | tuple[PromptMeta, ...], *, label: str, tenant: str,
                 max_virtual_tokens: int) -> PromptMeta:
    """The metadata of a composition (what the cache, the engine and usage see). Raises a 400
    PromptValidationError for mixed kinds or too many virtual tokens in total."""
    if len(parts) < 2:
        raise ValueError("a composition has at least two parts")
    kinds = {p.kind for p in parts}
    if len(kinds) > 1:
        prefix = next(p for p in parts if p.kind == "prefix_tuning")
        tuned = next(p for p in parts if p.kind != "prefix_tuning")
        raise PromptValidationError(
            f"cannot compose prefix-tuning prompt {prefix.name!r} with prompt-tuning prompt {tuned.name!r}: "
            "all parts of a composition must be of one kind")
    widths = {p.token_dim for p in parts}
    if len(widths) > 1:  # cannot happen for prompts validated against one model; never serve garbage
        raise PromptValidationError(f"parts of {label!r} have different widths {sorted(widths)}")
    total = sum(p.num_virtual_tokens for p in parts)
    if total > max_virtual_tokens:
        counts = " + ".join(str(p.num_virtual_tokens) for p in parts)
        raise PromptValidationError(
            f"composition {label!r} has {counts} = {total} virtual tokens; the limit is {max_virtual_tokens} (--max-virtual-tokens)")
    sha = composed_sha256(parts)
    dtypes = {p.dtype for p in parts}
    peft_types = {p.peft_type for p in parts}
    return PromptMeta(
        tenant=tenant,
        name=label,
        version=sha[:12],
        sha256=sha,
        num_virtual_tokens=total,
        token_dim=widths.pop(),
        dtype=dtypes.pop() if len(dtypes) == 1 else "float32",
        peft_type=peft_types.pop() if len(peft_types) == 1 else "PROMPT_TUNING",  # PROMPT_TUNING + P_TUNING
        created_at=max(p.created_at for p in parts),
        description=None,
    )


def load_composed_tensor(store, parts: list[PromptMeta] | tuple[PromptMeta, ...]) -> torch.Tensor:
    """[sum k, token_dim] on CPU; each part verified against its hash by the store."""
    tensors = [store.load_tensor(p) for p in parts]
    dtype = tensors[0].dtype if all(t.dtype == tensors[0].dtype for t in tensors) else torch.float32
    return torch.cat([t.to(dtype) for t in tensors], dim=0)
