"""Tenant and prompt names: one rule, used by the store, its aliases and the service's tenancy checks."""

from __future__ import annotations

import re

from .types import PromptValidationError

__all__ = ["NAME_RE", "validate_name"]

NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")


def validate_name(value: str, what: str = "prompt name") -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise PromptValidationError(
            f"invalid {what} {value!r}: use 1-64 characters from [a-zA-Z0-9._-], starting with a letter or digit"
        )
    return value
