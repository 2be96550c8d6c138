"""Uploaded files (`POST /v1/files`: training data, Batch API input) and the Batch API's result files, stored in the prompt store's backend under keys
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

__all__ = ["TuningFile", "FileRegistry", "FILE_PURPOSES", "RESULT_PURPOSES"]

FILE_PURPOSES = ("tune", "fine-tune", "batch")  # what a client may upload
RESULT_PURPOSES = ("batch_output",)  # what the server writes (a batch's output and error files)


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
    """Uploaded JSONL files. Training data is validated (JSON + record shape, with line numbers) at upload;
    batch input only as UTF-8 text here: its lines are checked when a batch is created, and a bad line
    lands in the batch's error file with its line number instead of refusing the whole file."""

    def __init__(self, backend, max_bytes: int, usage: UsageLedger | None = None, max_examples: int | None = None) -> None:
        self.backend = backend
        self.max_bytes = max_bytes
        self.max_examples = max_examples  # training files: 400 past it (--max-tuning-examples)
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
        if purpose == "batch":
            count = sum(1 for line in text.splitlines() if line.strip())
            if count == 0:
                raise DatasetError("file has no requests", source=filename or "file")
        else:
            count = len(parse_jsonl(text, source=filename or "file", max_examples=self.max_examples))
        return self._write(tenant, "file-" + uuid.uuid4().hex[:24], filename or "data.jsonl", purpose, data, count)

    def create_result(self, tenant: str, file_id: str, filename: str, data: bytes) -> tuple[TuningFile, bool]:
        """A file the server writes (a batch's output or error file) under an id the caller derives, so a
        redone write replaces it. Returns (meta, new): usage is added only for a new file."""
        try:
            self.get(tenant, file_id)
            new = False
        except KeyError:
            new = True
        count = sum(1 for line in data.splitlines() if line.strip())
        return self._write(tenant, file_id, filename, "batch_output", data, count, add_usage=new), new

    def _write(self, tenant: str, file_id: str, filename: str, purpose: str, data: bytes, count: int, *,
               add_usage: bool = True) -> TuningFile:
        meta = TuningFile(id=file_id, tenant=tenant, filename=filename[:255], purpose=purpose,
                          bytes=len(data), num_examples=count, created_at=int(time.time()))
        counted = self.usage is not None and add_usage
        reserved = counted and purpose in FILE_PURPOSES
        if reserved:
            # Checked and counted in one compare-and-swap before anything is written, so concurrent
            # uploads cannot all pass the same old total (issue #26 F5): StorageQuotaExceeded (413).
            self.usage.reserve_file_bytes(tenant, len(data))
        try:
            self.backend.put(self._key(tenant, file_id, "jsonl"), data)
            self.backend.put(self._key(tenant, file_id, "json"), json.dumps(meta.__dict__).encode())
        except BaseException:
            if reserved:
                self.usage.add(tenant, file_bytes=-len(data))
            raise
        if counted and not reserved:
            # The server's own result files are counted, never refused, and only once written: add()
            # applies a change already in the store (with no usage record yet, it walks the store).
            self.usage.add(tenant, file_bytes=len(data))
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
        return self.read_bytes(tenant, file_id).decode("utf-8")

    def read_bytes(self, tenant: str, file_id: str) -> bytes:
        self.get(tenant, file_id)
        return self.backend.get(self._key(tenant, file_id, "jsonl"))

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
