"""`softserve run-batch -i in.jsonl -o out.jsonl`: a Batch API input file answered offline, in this
process (vLLM's run-batch): no server, no HTTP, the same output (and error) lines as a batch's files.

It is the Batch API's own runner (softserve/batch/runner.py) over an in-memory store: the same line
checks with line numbers, the same ordering (input order), the same answers (the routes' code). The
model, the prompt store and the engine come from the same settings as `softserve serve`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from softserve.api.batches import RouteLineExecutor
from softserve.batch.lines import ENDPOINTS, count_lines
from softserve.batch.persist import BatchStore
from softserve.batch.records import FINISHED, new_record
from softserve.batch.runner import BatchManager
from softserve.config import OFFLINE_DEFAULTS, Settings  # OFFLINE_DEFAULTS: why, in config.py
from softserve.service.auth import ApiKeyRegistry
from softserve.service.runtime import LoadedModel, Runtime
from softserve.store.backends import MemoryBackend
from softserve.tuning.files import FileRegistry

__all__ = ["RunBatchResult", "run_batch", "first_endpoint", "offline_settings", "OFFLINE_DEFAULTS"]


@dataclass(frozen=True)
class RunBatchResult:
    total: int
    completed: int
    failed: int
    seconds: float

    def to_dict(self) -> dict:
        return {"total": self.total, "completed": self.completed, "failed": self.failed,
                "seconds": round(self.seconds, 3), "requests_per_s": round(self.total / self.seconds, 2) if self.seconds else None}


def offline_settings(settings: Settings) -> Settings:
    """`settings` with run-batch's own defaults for the fields not given."""
    return settings.model_copy(update={k: v for k, v in OFFLINE_DEFAULTS.items() if k not in settings.model_fields_set})


def first_endpoint(text: str) -> str:
    """The endpoint of the file: the first line's `url` (later lines with another url are error lines)."""
    for line in text.splitlines():
        if line.strip():
            try:
                url = json.loads(line).get("url")
            except (ValueError, AttributeError):
                break
            if url in ENDPOINTS:
                return url
            break
    return ENDPOINTS[0]


async def _run(runtime: Runtime, text: str, endpoint: str, tenant: str, progress) -> tuple[dict, str, str]:
    backend = MemoryBackend()
    store = BatchStore(backend, owner="run-batch", lease_seconds=3600)
    files = FileRegistry(backend, max_bytes=len(text.encode()) + 1)
    s = runtime.settings
    manager = BatchManager(store, files, RouteLineExecutor(runtime), window=s.batch_window or 4 * s.max_batch_size,
                           max_running=1, scan_seconds=0.05, flush_seconds=0.2)
    record = new_record(tenant=tenant, role="admin", endpoint=endpoint, input_file_id="file-local",
                        completion_window="24h", metadata=None, total=count_lines(text))
    store.create(record, text)
    serving = asyncio.ensure_future(manager.serve())
    try:
        while True:
            record = store.read(tenant, record["id"])
            progress(record["request_counts"])
            if record["status"] in FINISHED:
                break
            await asyncio.sleep(0.2)
    finally:
        await manager.close()
        serving.cancel()
    output = files.read_text(tenant, record["output_file_id"]) if record["output_file_id"] else ""
    errors = files.read_text(tenant, record["error_file_id"]) if record["error_file_id"] else ""
    return record, output, errors


def run_batch(settings: Settings, input_path: str | Path, output_path: str | Path, *, error_path: str | Path | None = None,
              tenant: str = "default", show_progress: bool = True, loaded: LoadedModel | None = None) -> RunBatchResult:
    """Answer every line of `input_path`; write the output lines (input order) to `output_path` and the
    error lines to `error_path`, or, without one, into the output file at their place in input order."""
    text = Path(input_path).read_text(encoding="utf-8")
    settings = offline_settings(settings)
    runtime = Runtime(settings=settings, registry=ApiKeyRegistry.disabled())
    runtime.build(loaded)
    if runtime.load_error:
        raise RuntimeError(f"model failed to load: {runtime.load_error}")
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=count_lines(text), unit="req", file=sys.stderr, desc="run-batch")

    def progress(counts: dict) -> None:
        if bar is not None:
            bar.update(counts["completed"] + counts["failed"] - bar.n)
            bar.set_postfix(failed=counts["failed"], refresh=False)

    started = time.perf_counter()
    try:
        record, output, errors = asyncio.run(_run(runtime, text, first_endpoint(text), tenant, progress))
    finally:
        if bar is not None:
            bar.close()
        runtime.close()
    seconds = time.perf_counter() - started
    if error_path is not None:
        Path(output_path).write_text(output, encoding="utf-8")
        Path(error_path).write_text(errors, encoding="utf-8")
    else:
        lines = [json.loads(line) for line in (output + errors).splitlines() if line.strip()]
        lines.sort(key=lambda item: int(item["id"].rsplit("_", 1)[1]))  # the line number ends every id
        Path(output_path).write_text("".join(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n"
                                             for item in lines), encoding="utf-8")
    counts = record["request_counts"]
    return RunBatchResult(counts["total"], counts["completed"], counts["failed"], seconds)
