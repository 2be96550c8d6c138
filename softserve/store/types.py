"""Boundary types of the prompt store: model facts, prompt metadata, loaded prompts, errors.

The engine and the API layer only ever see these types; storage keys and file formats stay
inside `softserve.store`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "ModelInfo",
    "PromptMeta",
    "LoadedPrompt",
    "PromptStoreError",
    "PromptNotFound",
    "PromptValidationError",
    "PromptCacheFull",
    "PromptIntegrityError",
    "QuotaExceeded",
    "PromptQuotaExceeded",
    "StorageQuotaExceeded",
]


@dataclass(frozen=True)
class ModelInfo:
    """Facts of the served model that uploads are validated against."""

    name: str  # served model name / base_model_name_or_path; only used for a mismatch warning
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    # GQA models store fewer KV heads than query heads; prefix-tuning tensors hold KV, so they use these.
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def kv_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def prefix_width(self) -> int:
        """Columns of a PEFT PREFIX_TUNING tensor for this model: layers * 2 (K, V) * kv_heads * head_dim."""
        return self.num_layers * 2 * self.kv_heads * self.kv_head_dim


@dataclass(frozen=True)
class PromptMeta:
    """One immutable version of a named soft prompt.

    `version` is derived from the content hash, so the same tensor always gets the same version id
    no matter who uploads it or in which file layout.
    """

    tenant: str
    name: str
    version: str  # first 12 hex chars of sha256
    sha256: str  # full hex content hash (format.content_sha256)
    num_virtual_tokens: int
    token_dim: int  # columns of the stored tensor (for PREFIX_TUNING: layers * 2 * kv_heads * head_dim)
    dtype: str  # "float32" | "float16" | "bfloat16", as stored
    peft_type: str  # "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING"
    created_at: int  # unix seconds
    description: str | None
    adapter_config: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def kind(self) -> str:
        """How the engine serves it: "prefix_tuning" (the tensor is per-layer KV) or "prompt_tuning"
        (input embeddings; P_TUNING files hold the encoder's output, so they are served alike)."""
        return "prefix_tuning" if self.peft_type == "PREFIX_TUNING" else "prompt_tuning"

    @property
    def nbytes(self) -> int:
        """Size of the tensor in its stored dtype (the cache computes its own for the cache dtype)."""
        return self.num_virtual_tokens * self.token_dim * _ITEMSIZE[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptMeta":
        return cls(
            tenant=str(d["tenant"]),
            name=str(d["name"]),
            version=str(d["version"]),
            sha256=str(d["sha256"]),
            num_virtual_tokens=int(d["num_virtual_tokens"]),
            token_dim=int(d["token_dim"]),
            dtype=str(d["dtype"]),
            peft_type=str(d["peft_type"]),
            created_at=int(d["created_at"]),
            description=d.get("description"),
            adapter_config=dict(d.get("adapter_config") or {}),
        )


_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class LoadedPrompt:
    """A prompt resident in the cache. `embeddings` is shared: never modify it in place."""

    meta: PromptMeta
    embeddings: torch.Tensor  # [num_virtual_tokens, token_dim], cache dtype + device, requires_grad False


class PromptStoreError(Exception):
    """Base error; `status_code` is the HTTP status the API layer should answer with."""

    status_code: int = 500
    code: str = "prompt_store_error"

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if code is not None:
            self.code = code


class PromptNotFound(PromptStoreError):
    status_code = 404
    code = "prompt_not_found"


class PromptValidationError(PromptStoreError):
    """Bad upload or bad name. Status is 400 (malformed), 413 (too large), 415, or 422 (well-formed
    but incompatible with the served model / unsupported)."""

    status_code = 400
    code = "invalid_prompt"


class PromptCacheFull(PromptStoreError):
    """Every cached prompt is pinned by in-flight requests and the new one does not fit."""

    status_code = 503
    code = "prompt_cache_full"


class PromptIntegrityError(PromptStoreError):
    """Stored bytes do not match their recorded hash (disk corruption or tampering)."""

    status_code = 500
    code = "prompt_integrity_error"


class QuotaExceeded(PromptStoreError):
    """A tenant's storage quota would be exceeded; nothing was written. `limit` and `usage` are in
    the quota's unit (prompt names, or bytes), `usage` before the refused write."""

    def __init__(self, message: str, *, limit: int, usage: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.usage = usage


class PromptQuotaExceeded(QuotaExceeded):
    """The tenant already has `--max-prompts-per-tenant` prompt names (a new version of an existing
    name is always allowed by this quota). Free one with DELETE."""

    status_code = 429
    code = "prompt_quota_exceeded"


class StorageQuotaExceeded(QuotaExceeded):
    """The tenant's stored bytes (prompt tensors of all live versions + uploaded files) would pass
    `--max-store-bytes-per-tenant`."""

    status_code = 413
    code = "storage_quota_exceeded"
