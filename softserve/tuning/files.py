"""Uploaded training files (`POST /v1/files`), stored in the prompt store's backend under keys
that `softserve.store.keys` builds (`tenants/<tenant>/files/<id>.jsonl` + `.json`, see
softserve/store/LAYOUT.md), so they persist like prompts."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from softserve.store import keys
from softserve.store.store import validate_name
from softserve.store.usage import UsageLedger
from softserve.tuning.data import DatasetError, parse_jsonl

__all__ = ["TuningFile", "FileRegistry", "FILE_PURPOSES"]

FILE_PURPOSES = ("tune", "fine-tune")


# ---- files ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuningFile:
    id: str
    tenant: str
    filename: str
    purpose: str
    bytes: int
    num_examples: int
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "num_examples": self.num_examples}


class FileRegistry:
    """Uploaded JSONL files, validated (JSON + record shape, with line numbers) at upload."""

    def __init__(self, backend, max_bytes: int, usage: UsageLedger | None = None) -> None:
        self.backend = backend
        self.max_bytes = max_bytes
        self.usage = usage  # the store's per-tenant usage and quota (files count against the bytes quota)

    @staticmethod
    def _key(tenant: str, file_id: str, ext: str) -> str:
        return keys.file_data(tenant, file_id) if ext == "jsonl" else keys.file_meta(tenant, file_id)

    def create(self, tenant: str, filename: str, purpose: str, data: bytes) -> TuningFile:
        validate_name(tenant, "tenant")
        if purpose not in FILE_PURPOSES:
            raise DatasetError(f"purpose must be one of {list(FILE_PURPOSES)}, got {purpose!r}", source="purpose")
        if len(data) > self.max_bytes:
            raise DatasetError(f"file is {len(data)} bytes; the limit is {self.max_bytes}", source=filename or "file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DatasetError("file is not UTF-8 text", source=filename or "file") from None
        examples = parse_jsonl(text, source=filename or "file")
        file_id = "file-" + uuid.uuid4().hex[:24]
        meta = TuningFile(id=file_id, tenant=tenant, filename=(filename or "data.jsonl")[:255], purpose=purpose,
                          bytes=len(data), num_examples=len(examples), created_at=int(time.time()))
        if self.usage is not None:  # counted before anything is written: StorageQuotaExceeded (413) when over
            self.usage.reserve_file_bytes(tenant, len(data))
        try:
            self.backend.put(self._key(tenant, file_id, "jsonl"), data)
            self.backend.put(self._key(tenant, file_id, "json"), json.dumps(meta.__dict__).encode())
        except BaseException:
            if self.usage is not None:
                self.usage.add(tenant, file_bytes=-len(data))
            raise
        return meta

    def get(self, tenant: str, file_id: str) -> TuningFile:
        if not keys.is_generated_id(file_id, "file-"):
            raise KeyError(file_id)
        try:
            raw = self.backend.get(self._key(tenant, file_id, "json"))
        except (KeyError, ValueError):
            raise KeyError(file_id) from None
        return TuningFile(**json.loads(raw))

    def read_text(self, tenant: str, file_id: str) -> str:
        self.get(tenant, file_id)
        return self.backend.get(self._key(tenant, file_id, "jsonl")).decode("utf-8")

    def list(self, tenant: str) -> list[TuningFile]:
        validate_name(tenant, "tenant")
        out = []
        for key in self.backend.list(keys.files_prefix(tenant)):
            if key.endswith(".json"):
                try:
                    out.append(TuningFile(**json.loads(self.backend.get(key))))
                except KeyError:
                    continue
        return sorted(out, key=lambda f: (f.created_at, f.id), reverse=True)

    def delete(self, tenant: str, file_id: str) -> None:
        meta = self.get(tenant, file_id)
        self.backend.delete(self._key(tenant, file_id, "jsonl"))
        self.backend.delete(self._key(tenant, file_id, "json"))
        if self.usage is not None:
            self.usage.add(tenant, file_bytes=-meta.bytes)
