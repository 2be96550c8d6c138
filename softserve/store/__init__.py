"""Soft-prompt storage: validation of PEFT uploads, versioned tenant-scoped store, device cache."""

from .backends import LocalBackend, MemoryBackend, StorageBackend
from .cache import CacheStats, PromptCache
from .format import ParsedPrompt, content_sha256, export_adapter, export_zip, parse_upload
from .store import PromptStore, validate_name
from .types import (
    LoadedPrompt,
    ModelInfo,
    PromptCacheFull,
    PromptIntegrityError,
    PromptMeta,
    PromptNotFound,
    PromptStoreError,
    PromptQuotaExceeded,
    PromptValidationError,
    QuotaExceeded,
    StorageQuotaExceeded,
)

__all__ = [
    "CacheStats",
    "LoadedPrompt",
    "LocalBackend",
    "MemoryBackend",
    "ModelInfo",
    "ParsedPrompt",
    "PromptCache",
    "PromptCacheFull",
    "PromptIntegrityError",
    "PromptMeta",
    "PromptNotFound",
    "PromptStore",
    "PromptStoreError",
    "PromptQuotaExceeded",
    "PromptValidationError",
    "QuotaExceeded",
    "StorageQuotaExceeded",
    "StorageBackend",
    "content_sha256",
    "export_adapter",
    "export_zip",
    "parse_upload",
    "validate_name",
]
