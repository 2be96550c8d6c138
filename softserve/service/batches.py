"""The Batch API without HTTP: creating, reading, listing and cancelling a principal's batches, and the
`BatchManager` that runs them on this replica (softserve/batch/runner.py).

A batch of another tenant is NotFound, like a missing one. Limits: at most --max-batches-per-tenant
unfinished batches per tenant (429) and --max-batch-requests lines per input file (400); input files
are uploads and their output files are written into the tenant's files, both counted against
--max-store-bytes-per-tenant; each line is a request of the tenant, so its rate limits apply (a batch
waits for them instead of failing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from softserve.batch.lines import count_lines
from softserve.batch.persist import BatchStore
from softserve.batch.records import FINISHED, batch_view, new_record
from softserve.batch.runner import BatchManager, LineExecutor
from softserve.service.auth import Principal
from softserve.service.errors import Conflict, InvalidRequest, NotFound, NotReady, Overloaded
from softserve.tuning.files import FileRegistry
from softserve.tuning.persist import new_replica_id

log = logging.getLogger("softserve.batch")

__all__ = ["BatchCreateRequest", "BatchService", "create_batch", "get_batch", "list_batches", "cancel_batch"]


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="an uploaded file with purpose 'batch'")
    endpoint: Literal["/v1/completions", "/v1/chat/completions"]  # = ENDPOINTS (a test holds them equal)
    completion_window: Literal["24h"] = "24h"  # = COMPLETION_WINDOWS
    metadata: dict[str, str] | None = Field(None, description="up to 16 string pairs, echoed back")


class BatchService:
    """Owns this replica's BatchManager once the model is loaded; `executor` answers lines (the API's routes)."""

    def __init__(self, state, executor: LineExecutor) -> None:
        self.state = state
        self.executor = executor
        self.manager: BatchManager | None = None
        self.store: BatchStore | None = None
        self.files: FileRegistry | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """On the serving event loop: wait for the model, then run the manager there."""
        self._task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        state = self.state
        await asyncio.to_thread(state.loaded.wait)
        if not state.is_ready or state.store is None:
            return
        s = state.settings
        backend = state.store.backend
        self.store = BatchStore(backend, owner=s.tuning_replica_id or new_replica_id(), lease_seconds=s.batch_lease_seconds)
        self.files = FileRegistry(backend, state.store.max_upload_bytes, usage=state.store.usage)
        self.manager = BatchManager(self.store, self.files, self.executor, window=s.batch_window or 2 * s.max_batch_size,
                                    max_running=s.max_running_batches, scan_seconds=s.batch_scan_seconds,
                                    flush_seconds=s.batch_flush_seconds, retention_seconds=s.batch_retention_seconds)
        await self.manager.serve()

    def require(self) -> tuple[BatchStore, FileRegistry, BatchManager]:
        if self.manager is None or self.store is None or self.files is None:
            raise NotReady("batches are not ready yet (the model is loading)")
        return self.store, self.files, self.manager

    async def close(self) -> None:
        if self.manager is not None:
            await self.manager.close()
        if self._task is not None:
            self._task.cancel()


def _not_found(batch_id: str) -> NotFound:
    return NotFound(f"batch {batch_id!r} not found", param="batch_id", code="batch_not_found")


def create_batch(service: BatchService, principal: Principal, body: BatchCreateRequest) -> dict[str, Any]:
    store, files, manager = service.require()
    settings = service.state.settings
    if body.metadata is not None and (len(body.metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in body.metadata.items())):
        raise InvalidRequest("metadata: at most 16 pairs, keys up to 64 and values up to 512 characters", param="metadata")
    try:
        meta = files.get(principal.tenant, body.input_file_id)
    except KeyError:
        raise NotFound(f"file {body.input_file_id!r} not found", param="input_file_id", code="file_not_found") from None
    if meta.purpose != "batch":
        raise InvalidRequest(f"file {body.input_file_id!r} has purpose {meta.purpose!r}; upload batch input with purpose 'batch'",
                             param="input_file_id", code="invalid_file")
    text = files.read_text(principal.tenant, body.input_file_id)
    total = count_lines(text)
    if total > settings.max_batch_requests:
        raise InvalidRequest(f"the file has {total} requests; a batch holds at most {settings.max_batch_requests} "
                             "(--max-batch-requests)", param="input_file_id", code="too_many_requests")
    unfinished = sum(1 for r in store.list(principal.tenant) if r["status"] not in FINISHED)
    if unfinished >= settings.max_batches_per_tenant:
        raise Overloaded(f"this tenant has {unfinished} unfinished batches, the limit (--max-batches-per-tenant); "
                         "wait for one to finish or cancel one", code="batch_limit", retry_after=30)
    record = new_record(tenant=principal.tenant, role=principal.role, endpoint=body.endpoint,
                        input_file_id=body.input_file_id, completion_window=body.completion_window,
                        metadata=body.metadata, total=total)
    store.create(record, text)
    manager.wake()
    return batch_view(record)


def _valid_id(batch_id: str) -> bool:
    return isinstance(batch_id, str) and batch_id.startswith("batch_") and batch_id[6:].isalnum()


def get_batch(service: BatchService, principal: Principal, batch_id: str) -> dict[str, Any]:
    store, _, _ = service.require()
    if not _valid_id(batch_id):
        raise _not_found(batch_id)
    try:
        return batch_view(store.read(principal.tenant, batch_id))
    except KeyError:
        raise _not_found(batch_id) from None


def list_batches(service: BatchService, principal: Principal, *, after: str | None, limit: int) -> dict[str, Any]:
    """Newest first; `after` (a batch id) continues after that batch, as OpenAI's cursor does."""
    store, _, _ = service.require()
    records = store.list(principal.tenant)
    if after is not None:
        ids = [r["id"] for r in records]
        records = records[ids.index(after) + 1:] if after in ids else []
    page = [batch_view(r) for r in records[:limit]]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(records) > limit}


def cancel_batch(service: BatchService, principal: Principal, batch_id: str) -> dict[str, Any]:
    store, _, manager = service.require()
    get_batch(service, principal, batch_id)

    def request(record: dict) -> dict | None:
        if record["status"] in FINISHED or record["status"] in ("cancelling", "finalizing"):
            return None
        record.update(cancel_requested=True, status="cancelling", cancelling_at=int(time.time()))
        return record

    record = store.update(principal.tenant, batch_id, request)
    if record["status"] in FINISHED and not record["cancel_requested"]:
        raise Conflict(f"batch {batch_id!r} already {record['status']}", param="batch_id", code="batch_finished")
    manager.wake()
    return batch_view(record)
