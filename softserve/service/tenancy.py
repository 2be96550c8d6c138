"""Tenancy: namespaces, who may read and write what, and prompt references. The only module that knows.

- A principal (tenant, role) reads its own namespace and `public`, writes its own namespace, and
  writes `public` only if admin.
- Anything in another tenant's namespace answers exactly like a missing prompt (NotFound, never a
  permission error), so its existence is never revealed.
- References (the API's `model` field, /v1/prompts/{ref}): "name", "name@version", "public/name[@v]"
  (also "<own tenant>/name"), or a composition of such parts joined by "+" ("public/fmt+task@3f2a9c").
- Other tenants see a public prompt as "public/<name>"; the public tenant itself sees bare names.
"""

from __future__ import annotations

from typing import NamedTuple

from softserve.store import aliases
from softserve.store.aliases import is_alias_label
from softserve.store.compose import compose_meta
from softserve.store.store import NAME_RE, PromptStore
from softserve.store.types import PromptMeta, PromptNotFound, PromptValidationError

from .auth import Principal
from .errors import PermissionDenied

__all__ = [
    "PUBLIC_TENANT", "INVALID_COMPOSITION", "PromptRef", "Principal", "can_read", "can_write", "require_write",
    "parse_reference", "is_composition", "resolve_reference", "resolve_served", "Served", "served_label", "visible_prompts", "display_prefix",
]

PUBLIC_TENANT = "public"  # the shared namespace: everyone reads it, admins write it
INVALID_COMPOSITION = "invalid_composition"  # a 400 the client can act on (not "no such model")
SEPARATOR = "+"  # never part of a prompt name (store.NAME_RE), so the split is unambiguous


class PromptRef(NamedTuple):
    """A parsed single reference: the namespace (tenant) it lives in, its name, and what follows `@`:
    a pinned version (hex) or a release alias (see softserve/store/aliases.py for the grammar)."""

    namespace: str
    name: str
    version: str | None = None  # the label after "@", version or alias: management calls refuse both alike

    @property
    def alias(self) -> str | None:
        return self.version if self.version is not None and is_alias_label(self.version) else None


class Served(NamedTuple):
    """What serves a reference: the meta (a composition's own for "a+b"), its parts (() for a single
    prompt), and the (part, alias) pairs that were picked through an alias."""

    meta: PromptMeta
    parts: tuple[PromptMeta, ...]
    via_alias: tuple[tuple[PromptMeta, str], ...] = ()


def can_read(principal: Principal, namespace: str) -> bool:
    return namespace == principal.tenant or namespace == PUBLIC_TENANT


def can_write(principal: Principal, namespace: str) -> bool:
    if namespace == PUBLIC_TENANT:
        return principal.is_admin
    return namespace == principal.tenant


def require_write(principal: Principal, namespace: str) -> None:
    """Only reachable for `public` in practice: other tenants' namespaces already failed to parse (404)."""
    if not can_write(principal, namespace):
        raise PermissionDenied(f"only admins may modify the '{namespace}' namespace")


def parse_reference(principal: Principal, reference: str) -> PromptRef:
    """Parse one (non-composed) reference for reading.

    A namespace the principal may not read raises PromptNotFound; malformed references raise
    PromptValidationError. Writers must also call `require_write`."""
    if not isinstance(reference, str) or not reference:
        raise PromptValidationError("empty prompt reference")
    ref = reference
    namespace = principal.tenant
    if "/" in ref:
        namespace, _, ref = ref.partition("/")
        if "/" in ref:
            raise PromptValidationError(f"invalid prompt reference {reference!r}")
    name, sep, version = ref.partition("@")
    if not NAME_RE.fullmatch(name) or (sep and not version) or "@" in version:
        raise PromptValidationError(f"invalid prompt reference {reference!r}")
    if not NAME_RE.fullmatch(namespace) or not can_read(principal, namespace):
        raise PromptNotFound(f"prompt {reference!r} not found")
    return PromptRef(namespace, name, version or None)


def is_composition(reference: str) -> bool:
    return isinstance(reference, str) and SEPARATOR in reference


def resolve_reference(store: PromptStore, principal: Principal, reference: str) -> tuple[PromptMeta, tuple[PromptMeta, ...]]:
    """(meta, parts): parts is () for a single prompt; for a composition meta is the composed one.
    An alias is assigned at random (see resolve_served for sticky assignment)."""
    served = resolve_served(store, principal, reference)
    return served.meta, served.parts


def _resolve_one(store: PromptStore, principal: Principal, ref: PromptRef, assignment: str | None
                 ) -> tuple[PromptMeta, str | None]:
    """A single parsed reference: (meta, alias it went through or None). A pinned version always wins:
    only a non-hex label is an alias."""
    alias = ref.alias
    if alias is None:
        return store.resolve(ref.namespace, ref.name, ref.version), None
    record = aliases.get_alias(store, ref.namespace, ref.name, alias)
    scope = f"{ref.namespace}/{ref.name}@{alias}"
    arm = record.pick(aliases.assignment_point(scope, assignment))
    return store.resolve(ref.namespace, ref.name, arm.version), alias


def resolve_served(store: PromptStore, principal: Principal, reference: str, assignment: str | None = None) -> Served:
    """Resolve for serving. Every part goes through the same tenant check as a single reference, so a
    part in another tenant answers exactly like a missing one. A part through a split alias is assigned
    by a stable hash of (alias, `assignment`), or at random when it is None. Raises PromptNotFound, or
    PromptValidationError (malformed; with code INVALID_COMPOSITION: too many parts, mixed kinds, too
    many virtual tokens in total)."""
    if not is_composition(reference):
        meta, alias = _resolve_one(store, principal, parse_reference(principal, reference), assignment)
        return Served(meta, (), ((meta, alias),) if alias else ())
    pieces = reference.split(SEPARATOR)
    # Counted before any store read: a long "a+a+a+..." costs nothing.
    if len(pieces) > store.max_prompt_parts:
        raise PromptValidationError(
            f"composed prompt {reference!r} has {len(pieces)} parts; the limit is {store.max_prompt_parts} (--max-prompt-parts)",
            code=INVALID_COMPOSITION)
    parts: list[PromptMeta] = []
    via_alias: list[tuple[PromptMeta, str]] = []
    for piece in pieces:
        try:
            ref = parse_reference(principal, piece)  # PromptValidationError if malformed
            meta, alias = _resolve_one(store, principal, ref, assignment)
        except PromptNotFound:
            raise PromptNotFound(f"prompt {reference!r} not found: no prompt {piece!r}") from None
        parts.append(meta)
        if alias:
            via_alias.append((meta, alias))
    try:
        meta = compose_meta(parts, label=reference, tenant=principal.tenant, max_virtual_tokens=store.max_virtual_tokens)
    except PromptValidationError as exc:
        raise PromptValidationError(exc.message, code=INVALID_COMPOSITION) from None
    return Served(meta, tuple(parts), tuple(via_alias))


def served_label(served: Served, principal: Principal) -> str:
    """The pinned reference of what served: "name@version", or the parts' pinned refs joined by "+"."""
    metas = served.parts or (served.meta,)
    return SEPARATOR.join(display_prefix(m, principal) + m.ref for m in metas)


def display_prefix(meta: PromptMeta, principal: Principal) -> str:
    """How `principal` names a prompt of `meta.tenant`: "public/" for someone else's public prompt, else ""."""
    return f"{PUBLIC_TENANT}/" if meta.tenant == PUBLIC_TENANT and principal.tenant != PUBLIC_TENANT else ""


def visible_prompts(store: PromptStore, principal: Principal) -> list[PromptMeta]:
    """Every prompt `principal` may use: its own, then the public ones (latest versions)."""
    metas = list(store.list(principal.tenant))
    if principal.tenant != PUBLIC_TENANT:
        metas += store.list(PUBLIC_TENANT)
    return metas
