"""Prompt releases without HTTP: aliases (`name@prod`, weighted splits) as a principal sees them, and
feedback scores attributed to the version that served a completion.

Aliases follow the rules of prompts (tenancy.py): another tenant's alias is the same NotFound as a
missing one, `public/` aliases are written by admins only. The store does the atomic moves
(softserve/store/aliases.py).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from softserve.store import aliases as store_aliases
from softserve.store.aliases import Alias, AliasChange
from softserve.store.store import PromptStore
from softserve.store.types import PromptMeta

from .auth import Principal
from .errors import InvalidRequest, NotFound
from .prompts import parse, store_errors
from .tenancy import PUBLIC_TENANT, PromptRef, display_prefix, require_write


__all__ = ["AliasView", "SplitArm", "list_aliases", "get_alias", "set_alias", "delete_alias", "CompletionLedger",
           "ServedCompletion", "give_feedback", "served_ref",
           "VersionRelease", "release_overview"]


@dataclass(frozen=True)
class SplitArm:
    version: str
    weight: float


@dataclass(frozen=True)
class AliasView:
    """One alias as the API shows it: `id` is what to pass as `model` ("name@prod", "public/name@prod")."""

    id: str
    name: str
    alias: str
    arms: tuple[SplitArm, ...]
    updated_at: int
    updated_by: str | None
    history: tuple[AliasChange, ...] = ()


def _bare_name(principal: Principal, reference: str) -> PromptRef:
    ref = parse(principal, reference)
    if ref.version is not None:
        raise InvalidRequest("give the bare prompt name in the path, without @version or @alias", param="name")
    return ref


def list_aliases(store: PromptStore, principal: Principal, reference: str) -> list[AliasView]:
    ref = _bare_name(principal, reference)
    with store_errors("name"):
        records = store_aliases.list_aliases(store, ref.namespace, ref.name)
    return [_view_for(principal, ref, r) for r in records]


def get_alias(store: PromptStore, principal: Principal, reference: str, alias: str) -> AliasView:
    """One alias with its whole history (oldest change first)."""
    ref = _bare_name(principal, reference)
    with store_errors("alias"):
        store_aliases.validate_alias(alias)
        records = {r.name: r for r in store_aliases.list_aliases(store, ref.namespace, ref.name)}
        if alias not in records:
            raise NotFound(f"alias {alias!r} of prompt {reference!r} not found", param="alias", code="alias_not_found")
        changes = store_aliases.history(store, ref.namespace, ref.name, alias)
    return _view_for(principal, ref, records[alias], tuple(changes))


def set_alias(store: PromptStore, principal: Principal, reference: str, alias: str,
              split: list[SplitArm]) -> AliasView:
    """Point an alias at one version or a weighted split (validated in the store, atomically moved)."""
    ref = _bare_name(principal, reference)
    with store_errors("alias"):
        store_aliases.validate_alias(alias)
    with store_errors("name"):
        store.versions(ref.namespace, ref.name)  # NotFound before PermissionDenied, as in delete
    require_write(principal, ref.namespace)
    with store_errors("split"):
        record, _ = store_aliases.set_alias(store, ref.namespace, ref.name, alias,
                                            [(arm.version, arm.weight) for arm in split], by=principal.actor)
    return _view_for(principal, ref, record)


def delete_alias(store: PromptStore, principal: Principal, reference: str, alias: str) -> AliasView:
    """Remove an alias; returns what it pointed at."""
    view = get_alias(store, principal, reference, alias)
    ref = _bare_name(principal, reference)
    require_write(principal, ref.namespace)
    with store_errors("alias"):
        store_aliases.delete_alias(store, ref.namespace, ref.name, alias, by=principal.actor)
    return view


def _view_for(principal: Principal, ref: PromptRef, record: Alias, history: tuple[AliasChange, ...] = ()) -> AliasView:
    prefix = f"{PUBLIC_TENANT}/" if ref.namespace == PUBLIC_TENANT and principal.tenant != PUBLIC_TENANT else ""
    return AliasView(id=f"{prefix}{ref.name}@{record.name}", name=prefix + ref.name, alias=record.name,
                     arms=tuple(SplitArm(a.version, a.weight) for a in record.arms), updated_at=record.updated_at,
                     updated_by=record.updated_by, history=history)


def served_ref(meta: PromptMeta, principal: Principal) -> str:
    """A served version as `principal` names it: "name@version" or "public/name@version"."""
    return display_prefix(meta, principal) + meta.ref


@dataclass(frozen=True)
class VersionRelease:
    """One version as the console's release view shows it: the aliases that point at it (with their
    weight share) and this replica's per-version numbers (metrics.VersionMetrics.snapshot; {} if none)."""

    meta: PromptMeta
    latest: bool
    aliases: dict[str, float]  # alias -> share of its traffic, 0..1
    numbers: dict[str, float]


def release_overview(store: PromptStore, metrics, principal: Principal, reference: str
                     ) -> tuple[list[AliasView], list[VersionRelease]]:
    """A prompt's aliases and its versions (latest first) with their numbers, side by side."""
    ref = _bare_name(principal, reference)
    with store_errors("name"):
        metas = store.versions(ref.namespace, ref.name)
        records = store_aliases.list_aliases(store, ref.namespace, ref.name)
    views = [_view_for(principal, ref, r) for r in records]
    label = ref.name if ref.namespace == principal.tenant else f"{ref.namespace}/{ref.name}"  # as version_series names it
    numbers = metrics.versions.snapshot(principal.tenant, label) if metrics is not None else {}
    out = []
    for meta in metas:
        shares = {}
        for record in records:
            total = sum(a.weight for a in record.arms)
            for arm in record.arms:
                if arm.version == meta.version:
                    shares[record.name] = arm.weight / total
        out.append(VersionRelease(meta, meta.version == metas[0].version, shares, numbers.get(meta.version, {})))
    return views, out


# ---- feedback ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServedCompletion:
    """What served a completion id: per part, the version and the metric series it counted in."""

    versions: tuple[tuple[PromptMeta, tuple[str, str, str]], ...]


class CompletionLedger:
    """completion id -> the versions that served it, per tenant, for the last `capacity` completions of
    this replica (in memory: feedback for a completion another replica served, or one older than that,
    is a 404)."""

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._served: OrderedDict[tuple[str, str], ServedCompletion] = OrderedDict()
        self._lock = threading.Lock()

    def record(self, tenant: str, completion_id: str, versions) -> None:
        with self._lock:
            self._served[(tenant, completion_id)] = ServedCompletion(tuple(versions))
            while len(self._served) > self.capacity:
                self._served.popitem(last=False)

    def lookup(self, tenant: str, completion_id: str) -> ServedCompletion | None:
        with self._lock:
            return self._served.get((tenant, completion_id))


MAX_ABS_SCORE = 1e6


class FeedbackRuntime(Protocol):
    """What feedback needs of softserve.service.runtime.Runtime (which imports this module)."""

    completions: CompletionLedger
    metrics: Any


def give_feedback(runtime: FeedbackRuntime, principal: Principal, completion_id: str, score: float) -> ServedCompletion:
    """Attribute `score` to the version(s) that served the principal's completion `completion_id`."""
    if not isinstance(score, (int, float)) or not math.isfinite(score) or abs(score) > MAX_ABS_SCORE:
        raise InvalidRequest(f"score must be a finite number with |score| <= {MAX_ABS_SCORE:g}", param="score")
    served = runtime.completions.lookup(principal.tenant, completion_id)  # another tenant's id: not found
    if served is None:
        raise NotFound(f"no completion {completion_id!r} with a soft prompt was served here (recent completions "
                       "of this replica only)", param="id", code="completion_not_found")
    if runtime.metrics is not None:
        for labels in {labels for _, labels in served.versions}:
            runtime.metrics.versions.observe_feedback(labels, float(score))
    return served
