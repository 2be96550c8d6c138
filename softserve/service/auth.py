"""API keys: hashed key file, constant-time authentication, tenant/role principals.

The key file never holds plaintext keys, only sha256 hex digests, so a leaked file (or backup)
does not leak credentials. Keys are high-entropy random tokens, so an unsalted fast hash is
sufficient (no password-style KDF needed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from softserve.store.store import NAME_RE

__all__ = [
    "Principal",
    "ApiKeyRegistry",
    "add_key",
    "hash_key",
    "KEY_PREFIX",
    "ROLES",
]

KEY_PREFIX = "sk-ss-"
ROLES = ("admin", "user")


@dataclass(frozen=True)
class Principal:
    tenant: str
    role: str  # "admin" | "user"
    # Which key authenticated ("key-" + 8 hex of its sha256, never the key): recorded as the author of
    # changes such as alias moves. Not part of equality: the same tenant and role are the same principal.
    key_id: str | None = field(default=None, compare=False)

    @property
    def actor(self) -> str:
        """Who did something, for histories: "tenant:key-1a2b3c4d" (or "tenant:role" without keys)."""
        return f"{self.tenant}:{self.key_id or self.role}"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class _KeyEntry:
    sha256: str
    principal: Principal


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _read_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        data = yaml.safe_load(text)
    else:
        data = json.loads(text) if text.strip() else None
    if data is None:
        data = {"keys": []}
    if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
        raise ValueError(f"{path}: expected an object with a 'keys' list")
    data.setdefault("keys", [])
    return data


def _write_file(path: Path, data: dict[str, Any]) -> None:
    if path.suffix.lower() in (".yaml", ".yml"):
        text = yaml.safe_dump(data, sort_keys=False)
    else:
        text = json.dumps(data, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _parse_entries(data: dict[str, Any], source: str) -> list[_KeyEntry]:
    entries = []
    for i, item in enumerate(data["keys"]):
        if not isinstance(item, dict):
            raise ValueError(f"{source}: keys[{i}] is not an object")
        digest = str(item.get("sha256", "")).lower()
        tenant = item.get("tenant")
        role = item.get("role", "user")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{source}: keys[{i}].sha256 must be 64 hex chars")
        if not isinstance(tenant, str) or not NAME_RE.fullmatch(tenant):
            raise ValueError(f"{source}: keys[{i}].tenant {tenant!r} is not a valid tenant name")
        if role not in ROLES:
            raise ValueError(f"{source}: keys[{i}].role must be one of {ROLES}")
        entries.append(_KeyEntry(digest, Principal(tenant, role, key_id=f"key-{digest[:8]}")))
    return entries


class ApiKeyRegistry:
    """Maps `Authorization: Bearer <key>` to a Principal. Immutable; reload by loading again."""

    def __init__(self, entries: list[_KeyEntry] | None = None, *, enabled: bool = True) -> None:
        self._entries = tuple(entries or ())
        self.enabled = enabled

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "ApiKeyRegistry":
        p = Path(path)
        return cls(_parse_entries(_read_file(p), str(p)))

    @classmethod
    def disabled(cls) -> "ApiKeyRegistry":
        """Dev mode: no keys; every request is Principal("default", "admin")."""
        return cls(enabled=False)

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization_header: str | None) -> Principal | None:
        if not self.enabled:
            return Principal("default", "admin")
        if not authorization_header:
            return None
        scheme, _, token = authorization_header.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None
        digest = hash_key(token).encode("ascii")
        found: Principal | None = None
        # Compare against every entry without breaking early, so timing reveals neither which
        # entry matched nor how many digest characters were right.
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.sha256.encode("ascii")):
                found = entry.principal
        return found


def add_key(path: str | os.PathLike[str], tenant: str, role: str = "user") -> str:
    """Create a key for `tenant`, append its hash to the key file (creating it) and return the
    plaintext key. The caller shows it once; it cannot be recovered afterwards."""
    if not NAME_RE.fullmatch(tenant):
        raise ValueError(f"invalid tenant name {tenant!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    p = Path(path)
    data = _read_file(p) if p.exists() else {"keys": []}
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    data["keys"].append(
        {
            "sha256": hash_key(key),
            "tenant": tenant,
            "role": role,
            "hint": key[: len(KEY_PREFIX) + 4],  # lets operators tell keys apart; not a secret
            "created_at": int(time.time()),
        }
    )
    _parse_entries(data, str(p))  # never write a file we could not load
    _write_file(p, data)
    return key
