"""Prompt references in `model` and /v1/prompts/{ref}: one prompt ("name", "name@v", "public/name") or
a composition of several joined by "+" ("public/format+acme-task@3f2a9c1b0d4e").

Every part goes through the same tenant check as a single reference, so a part in another tenant
answers exactly like a missing one (404) and nothing about it is revealed.
"""

from __future__ import annotations

from prompt_store.compose import compose_meta
from prompt_store.store import PromptStore
from prompt_store.types import PromptMeta, PromptNotFound, PromptValidationError

from ..auth import Principal, tenant_for_model

__all__ = ["INVALID_COMPOSITION", "is_composition", "resolve_reference"]

INVALID_COMPOSITION = "invalid_composition"  # a 400 the client can act on (not "no such model")
SEPARATOR = "+"  # never part of a prompt name (store.NAME_RE), so the split is unambiguous


def is_composition(reference: str) -> bool:
    return isinstance(reference, str) and SEPARATOR in reference


def resolve_reference(store: PromptStore, principal: Principal, reference: str) -> tuple[PromptMeta, tuple[PromptMeta, ...]]:
    """(meta, parts): parts is () for a single prompt; for a composition meta is the composed one.

    Raises PromptNotFound (404: a missing or foreign part), PromptValidationError (400: malformed,
    too many parts, mixed kinds, too many virtual tokens in total)."""
    if not is_composition(reference):
        namespace, name, version = tenant_for_model(principal, reference)
        return store.resolve(namespace, name, version), ()
    pieces = reference.split(SEPARATOR)
    # Counted before any store read: a long "a+a+a+..." costs nothing.
    if len(pieces) > store.max_prompt_parts:
        raise PromptValidationError(
            f"composed prompt {reference!r} has {len(pieces)} parts; the limit is {store.max_prompt_parts} (--max-prompt-parts)",
            code=INVALID_COMPOSITION)
    parts: list[PromptMeta] = []
    for piece in pieces:
        try:
            namespace, name, version = tenant_for_model(principal, piece)  # PromptValidationError if malformed
            parts.append(store.resolve(namespace, name, version))
        except PromptNotFound:
            raise PromptNotFound(f"prompt {reference!r} not found: no prompt {piece!r}") from None
    try:
        meta = compose_meta(parts, label=reference, tenant=principal.tenant, max_virtual_tokens=store.max_virtual_tokens)
    except PromptValidationError as exc:
        raise PromptValidationError(exc.message, code=INVALID_COMPOSITION) from None
    return meta, tuple(parts)
