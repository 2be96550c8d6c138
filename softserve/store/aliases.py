"""Release aliases: named pointers (`prod`, `canary`) from a prompt name to one version or a weighted
split of up to 8 versions, moved atomically, with a history of every change. See LAYOUT.md, "Aliases".

- An alias lives in its name's head manifest (`aliases`), so moving one is the same compare-and-swap
  as an upload, and a delete of the name checks for aliases on the very head it conditionally deletes:
  an alias can never point at a version the name does not have, on any number of replicas.
- Grammar: `^[a-z][a-z0-9_-]{0,31}$` and not only hex digits. Version ids (and the >= 6-char prefixes
  that resolve them) are only hex digits, so `name@<label>` is a version iff the label is all hex.
- History: the head keeps the latest change inline (`alias_log.last`, written in the same swap as the
  move, so no change is ever lost); the next change first archives it, write-once, under
  `alias-history/<epoch>/<seq>.json`. A history is the archive plus the inline last change.
- Assignment to an arm of a split: a stable hash of (tenant, name, alias, assignment key) mapped onto
  the cumulative weights, so every replica assigns one key alike; no key: uniformly at random.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from . import cas, keys
from .backends import StorageBackend
from .names import validate_name
from .types import PromptNotFound, PromptStoreError, PromptValidationError


class PromptStore(Protocol):
    """What alias changes use of softserve.store.store.PromptStore: its head manifests (aliases live in
    the head) and their lock, cache and backend. A protocol, so the store can import this module."""

    backend: StorageBackend
    _lock: Any
    _cas: bool

    def _read_head(self, tenant: str, name: str, *, fresh: bool = False) -> Any: ...

    def _read_head_fresh(self, tenant: str, name: str) -> tuple[Any, str | None]: ...

    def _wrote_head(self, tenant: str, name: str, head: Any) -> None: ...

__all__ = ["ALIAS_RE", "MAX_ARMS", "Arm", "Alias", "AliasChange", "validate_alias", "is_alias_label",
           "assignment_point", "set_alias", "delete_alias", "list_aliases", "get_alias", "history", "in_use",
           "forget_history"]

ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_ALL_HEX = re.compile(r"^[0-9a-fA-F]+$")
MAX_ARMS = 8
_MAX_HISTORY_READ = 10_000  # archived changes one history answer reads at most (newest kept)


def is_alias_label(label: str) -> bool:
    """Whether what follows `@` in a reference names an alias (else it is a version id or prefix)."""
    return not _ALL_HEX.fullmatch(label)


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias) or not is_alias_label(alias):
        raise PromptValidationError(
            f"invalid alias {alias!r}: use 1-32 characters from [a-z0-9_-], starting with a letter, and not only "
            "hex digits (those are version ids)", code="invalid_alias")
    return alias


@dataclass(frozen=True)
class Arm:
    version: str  # full 12-char version id
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "weight": self.weight}


@dataclass(frozen=True)
class Alias:
    name: str
    arms: tuple[Arm, ...]
    updated_at: int
    updated_by: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"arms": [a.to_dict() for a in self.arms], "updated_at": self.updated_at, "updated_by": self.updated_by}

    @classmethod
    def from_dict(cls, name: str, d: dict[str, Any]) -> Alias:
        return cls(name, tuple(Arm(a["version"], float(a["weight"])) for a in d["arms"]), int(d.get("updated_at", 0)),
                   d.get("updated_by"))

    @property
    def versions(self) -> tuple[str, ...]:
        return tuple(a.version for a in self.arms)

    def pick(self, point: float) -> Arm:
        """The arm that owns `point` in [0, 1) on the cumulative weights (zero-weight arms own nothing)."""
        total = sum(a.weight for a in self.arms)
        edge = 0.0
        for arm in self.arms:
            edge += arm.weight / total
            if point < edge and arm.weight > 0:
                return arm
        return next(a for a in reversed(self.arms) if a.weight > 0)  # float rounding at the top edge


@dataclass(frozen=True)
class AliasChange:
    seq: int
    alias: str
    at: float  # unix seconds
    by: str | None
    before: tuple[Arm, ...] | None  # None: the alias was created
    after: tuple[Arm, ...] | None  # None: the alias was deleted

    def to_dict(self) -> dict[str, Any]:
        arms = lambda xs: None if xs is None else [a.to_dict() for a in xs]  # noqa: E731
        return {"seq": self.seq, "alias": self.alias, "at": self.at, "by": self.by, "from": arms(self.before),
                "to": arms(self.after)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AliasChange:
        arms = lambda xs: None if xs is None else tuple(Arm(a["version"], float(a["weight"])) for a in xs)  # noqa: E731
        return cls(int(d["seq"]), d["alias"], float(d["at"]), d.get("by"), arms(d.get("from")), arms(d.get("to")))


def assignment_point(scope: str, key: str | None) -> float:
    """A number in [0, 1): the same for one (scope, key) on every replica and run; random without a key."""
    if key is None:
        return random.random()
    digest = hashlib.sha256(f"softserve-split\n{scope}\n{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_arms(split: list[tuple[str, float]]) -> None:
    if not 1 <= len(split) <= MAX_ARMS:
        raise PromptValidationError(f"an alias has 1 to {MAX_ARMS} versions, got {len(split)}", code="invalid_split")
    for _, weight in split:
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise PromptValidationError(f"split weights must be finite and >= 0, got {weight!r}", code="invalid_split")
    if sum(w for _, w in split) <= 0:
        raise PromptValidationError("split weights must sum to more than 0", code="invalid_split")


def _full_version(head_versions: tuple[str, ...], name: str, version: str) -> str:
    """A live version of the head from a full id or a unique prefix of >= 6 hex chars (as `resolve`)."""
    v = str(version).lower()
    matches = [x for x in head_versions if x.startswith(v)] if len(v) >= 6 and _ALL_HEX.fullmatch(v) else []
    if len(matches) != 1:
        raise PromptNotFound(f"version {version!r} of prompt {name!r} not found")
    return matches[0]


def in_use(name: str, aliases: dict[str, Any]) -> PromptStoreError:
    listed = ", ".join(f"{name}@{a}" for a in sorted(aliases))
    return PromptStoreError(f"prompt {name!r} has aliases ({listed}) pointing at its versions; delete or move them first",
                            status_code=409, code="alias_in_use")


def _change(store: PromptStore, tenant: str, name: str, alias: str, by: str | None,
            new_arms: list[tuple[str, float]] | None) -> tuple[Alias | None, AliasChange]:
    """Set (new_arms) or delete (None) one alias: a compare-and-swap loop on the head."""
    validate_name(tenant, "tenant")
    validate_name(name)
    validate_alias(alias)
    if new_arms is not None:
        _check_arms(new_arms)
    with store._lock:
        for attempt in range(cas.ATTEMPTS):
            head, etag = store._read_head_fresh(tenant, name)
            if head is None:
                raise PromptNotFound(f"prompt {name!r} not found")
            old = head.aliases.get(alias)
            if new_arms is None and old is None:
                raise PromptNotFound(f"alias {alias!r} of prompt {name!r} not found")
            now = time.time()
            record: Alias | None = None
            aliases = dict(head.aliases)
            if new_arms is None:
                aliases.pop(alias)
            else:
                arms = tuple(Arm(_full_version(head.versions, name, v), float(w)) for v, w in new_arms)
                if len({a.version for a in arms}) != len(arms):
                    raise PromptValidationError("a version appears twice in the split", code="invalid_split")
                record = Alias(alias, arms, int(now), by)
                aliases[alias] = record.to_dict()
            log = dict(head.alias_log) if head.alias_log else {"epoch": uuid.uuid4().hex[:12], "seq": 0}
            last = log.get("last")
            if last is not None:  # archive the inline change before the swap replaces it (write-once)
                store.backend.put(keys.alias_history(tenant, name, log["epoch"], int(last["seq"])),
                                  json.dumps(last, sort_keys=True).encode(), if_absent=True)
            before = Alias.from_dict(alias, old).arms if old is not None else None
            change = AliasChange(int(log["seq"]) + 1, alias, now, by, before, record.arms if record else None)
            log.update(seq=change.seq, last=change.to_dict())
            new_head = type(head)(latest=head.latest, versions=head.versions, aliases=aliases, alias_log=log)
            if cas.swap(store.backend, keys.prompt_head(tenant, name), new_head.to_json(), etag, store._cas):
                break
            cas.backoff(attempt)
        else:
            raise cas.conflict(f"alias {name}@{alias}")
        store._wrote_head(tenant, name, new_head)
    return record, change


def set_alias(store: PromptStore, tenant: str, name: str, alias: str, split: list[tuple[str, float]],
              by: str | None = None) -> tuple[Alias, AliasChange]:
    """Point `name@alias` at the versions of `split` [(version, weight)] (one arm: a plain pointer)."""
    record, change = _change(store, tenant, name, alias, by, split)
    assert record is not None
    return record, change


def delete_alias(store: PromptStore, tenant: str, name: str, alias: str, by: str | None = None) -> AliasChange:
    return _change(store, tenant, name, alias, by, None)[1]


def list_aliases(store: PromptStore, tenant: str, name: str) -> list[Alias]:
    """Every alias of a name, sorted; read from the backend (management, never a cached view)."""
    validate_name(tenant, "tenant")
    validate_name(name)
    head = store._read_head(tenant, name, fresh=True)
    if head is None:
        raise PromptNotFound(f"prompt {name!r} not found")
    return [Alias.from_dict(a, head.aliases[a]) for a in sorted(head.aliases)]


def get_alias(store: PromptStore, tenant: str, name: str, alias: str) -> Alias:
    """For serving: from the head cache (an alias move is seen within revalidate_seconds, like an upload)."""
    validate_name(tenant, "tenant")
    validate_name(name)
    head = store._read_head(tenant, name)
    record = head.aliases.get(alias) if head is not None else None
    if record is None:
        raise PromptNotFound(f"prompt {name + '@' + alias!r} not found")
    return Alias.from_dict(alias, record)


def history(store: PromptStore, tenant: str, name: str, alias: str | None = None) -> list[AliasChange]:
    """Every change of the name's aliases (or of one), oldest first: the archive plus the inline last."""
    validate_name(tenant, "tenant")
    validate_name(name)
    head = store._read_head(tenant, name, fresh=True)
    if head is None:
        raise PromptNotFound(f"prompt {name!r} not found")
    if not head.alias_log:
        return []
    prefix = keys.alias_history_prefix(tenant, name) + head.alias_log["epoch"] + "/"
    changes: dict[int, AliasChange] = {}
    for key in sorted(store.backend.list(prefix))[-_MAX_HISTORY_READ:]:
        try:
            change = AliasChange.from_dict(json.loads(store.backend.get(key)))
        except (KeyError, ValueError, TypeError):
            continue  # deleted meanwhile, or unreadable: the rest still answers
        changes[change.seq] = change
    last = AliasChange.from_dict(head.alias_log["last"])
    changes[last.seq] = last
    return [c for _, c in sorted(changes.items()) if alias is None or c.alias == alias]


def forget_history(backend: StorageBackend, tenant: str, name: str) -> None:
    """After a name's head is deleted: its archived alias changes go too (a crash leaves them unread:
    a re-created name starts a new epoch)."""
    for key in backend.list(keys.alias_history_prefix(tenant, name)):
        backend.delete(key)
