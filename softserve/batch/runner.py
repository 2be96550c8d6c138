"""Runs batches: takes them up from the store (under a lease), feeds their lines to the engine as
background rows, commits results in input order, and writes the output and error files.

Every replica runs a `BatchManager` on its event loop. Its scan (at start-up, every `scan_seconds`, and
at once after a create or cancel here) lists batches/active/ and takes up, while it runs fewer than
`max_running` batches, every unfinished batch nobody holds a live lease on: after a kill -9, on this
replica after a restart or on another one once the lease expired. Taking a batch up bumps the record's
`run` (compare-and-swap), which fences the previous run's writes; the new run resumes at `next_line`.

A run keeps `window` lines in flight (the engine's background queue never holds more); each line's
answer waits in memory until every earlier line has one, then is committed with them (about every
`flush_seconds`). Answers that say "later" (429, 503, 504) are retried, not reported: the tenant's rate
limits slow a batch down instead of failing its lines. Cancel stops feeding, aborts the lines in flight
and finishes with what is committed; past `expires_at` the rest of the lines become `batch_expired`
errors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from softserve.batch.lines import BatchLine, InvalidLine, LineResult, error_line, output_line, parse_input
from softserve.batch.persist import BatchStore, HeldLease, RunLost
from softserve.batch.records import FINISHED, error_file_id, output_file_id

log = logging.getLogger("softserve.batch")

__all__ = ["LineExecutor", "BatchManager", "BatchRun", "RETRY_STATUSES"]

RETRY_STATUSES = (429, 503, 504)  # "not now": the line is retried, never reported as failed
SWEEP_SECONDS = 60.0  # retention sweeps at most this often (each lists batches/finished/)
MAX_LISTED_ERRORS = 100  # of a batch whose every line is invalid, `errors.data` names this many


class LineExecutor(Protocol):
    """How a line's body becomes an answer: the API layer's completions / chat completions."""

    def check(self, endpoint: str, body: dict[str, Any]) -> str | None:
        """Why the body is not a valid request for `endpoint` (None: it is)."""

    async def run(self, tenant: str, role: str, endpoint: str, body: dict[str, Any], request_id: str) -> LineResult:
        """Answer one line as a background request."""


@dataclass
class _Progress:
    committed: int  # lines [0, committed) are in the store
    results: dict[int, tuple[str, str, bool]] = field(default_factory=dict)  # position -> (output, error, ok)


class BatchRun:
    """One run of one batch on this replica, while it holds the lease."""

    def __init__(self, manager: "BatchManager", tenant: str, batch_id: str, lease: HeldLease) -> None:
        self.manager, self.tenant, self.batch_id, self.lease = manager, tenant, batch_id, lease
        self.store = manager.store
        self.run_number = 0
        self.cancelled = asyncio.Event()  # a cancel was requested (seen in the record)
        self.lost = False

    async def _io(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def run(self) -> None:
        record = await self._io(self.store.read, self.tenant, self.batch_id)
        if record["status"] in FINISHED:  # finished, but its clean-up was cut short
            await self._io(self._clean_up, record)
            return
        record = await self._io(self.store.update, self.tenant, self.batch_id, self._take_up)
        self.run_number = record["run"]
        text = await self._io(self.store.read_input, self.tenant, self.batch_id)
        items, _ = parse_input(text, record["endpoint"], self.manager.executor.check)
        if record["status"] == "validating":
            record = await self._io(self.store.update, self.tenant, self.batch_id, lambda r: self._validated(r, items))
        log.info("batch %s run %d on %s: %s from line %d of %d", self.batch_id, self.run_number, self.store.owner,
                 record["status"], record["next_line"], len(items))
        if record["errors"] is not None:
            await self._finalize(record, "failed", items)
            return
        if record["cancel_requested"]:
            self.cancelled.set()
        outcome = await self._process(record, items)
        if outcome is not None:
            record = await self._io(self.store.read, self.tenant, self.batch_id)
            await self._finalize(record, outcome, items)

    # ---- record changes (run under compare-and-swap) --------------------------------------------
    def _take_up(self, record: dict) -> dict:
        record["run"] += 1
        record["runs"].append({"run": record["run"], "replica": self.store.owner, "from_line": record["next_line"],
                               "started_at": int(time.time())})
        return record

    def _fenced(self, record: dict) -> dict:
        if record["run"] != self.run_number:
            self.lost = True
            raise RunLost(f"batch {self.batch_id}: run {record['run']} took over from run {self.run_number}")
        if record["cancel_requested"]:
            self.cancelled.set()
        return record

    def _validated(self, record: dict, items: list[BatchLine | InvalidLine]) -> dict:
        record = self._fenced(record)
        if record["status"] != "validating":
            return record
        record["request_counts"]["total"] = len(items)
        invalid = [i for i in items if isinstance(i, InvalidLine)]
        if items and len(invalid) == len(items):  # nothing to run: say why, as OpenAI does (failed once the files are written)
            record.update(errors={"object": "list", "data": [
                {"code": i.code, "message": i.message, "param": None, "line": i.index + 1}
                for i in invalid[:MAX_LISTED_ERRORS]]})
        elif not record["cancel_requested"]:
            record.update(status="in_progress", in_progress_at=int(time.time()))
        return record

    # ---- the lines ------------------------------------------------------------------------------
    async def _process(self, record: dict, items: list[BatchLine | InvalidLine]) -> str | None:
        """Run lines from `next_line` on; returns the final status to finish with, or None when this run
        stops without finishing the batch (lost it, or the replica shuts down)."""
        manager = self.manager
        progress = _Progress(committed=record["next_line"])
        position = progress.committed
        tasks: set[asyncio.Task] = set()
        last_flush = time.monotonic()
        expires_at = record["expires_at"]
        outcome = None
        try:
            while True:
                if self.lost or manager.stopping.is_set():
                    return None
                if self.cancelled.is_set():
                    outcome = "cancelled"
                    break
                if time.time() >= expires_at:
                    outcome = "expired"
                    break
                while position < len(items) and len(tasks) < manager.window:
                    item = items[position]
                    if isinstance(item, InvalidLine):
                        progress.results[position] = ("", error_line(self.batch_id, item.index, item.custom_id,
                                                                     item.code, item.message), False)
                    else:
                        tasks.add(asyncio.ensure_future(self._line(position, item, record)))
                    position += 1
                if tasks:
                    done, tasks = await asyncio.wait(tasks, timeout=manager.flush_seconds,
                                                     return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        pos, out, err, ok = task.result()
                        progress.results[pos] = (out, err, ok)
                finished = position >= len(items) and not tasks
                if finished or time.monotonic() - last_flush >= manager.flush_seconds:
                    await self._commit(progress)
                    last_flush = time.monotonic()
                if finished:
                    return "completed"
        except RunLost:
            log.warning("batch %s: another run took it over; this one stops", self.batch_id)
            return None
        finally:
            for task in tasks:  # cancel, lost, shutdown: their engine requests are aborted
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        await self._commit(progress)  # what is done before the cancel or expiry counts
        return outcome

    async def _line(self, position: int, line: BatchLine, record: dict) -> tuple[int, str, str, bool]:
        rid_base = f"{self.batch_id}-{line.index + 1}"
        delay = 0.5
        while True:
            result = await self.manager.executor.run(record["tenant"], record.get("role", "user"), record["endpoint"],
                                                     line.body, rid_base)
            if result.status_code not in RETRY_STATUSES:
                break
            if self.manager.stopping.is_set():  # shutting down: never commit "not now" as this line's answer
                await asyncio.Event().wait()  # until the run cancels this task
            await asyncio.sleep(delay)  # rate limit or not ready: later, not an error
            delay = min(delay * 2, 10.0)
        if result.ok:
            return position, output_line(self.batch_id, line, result), "", True
        error = result.body.get("error") or {}
        return position, "", error_line(self.batch_id, line.index, line.custom_id, error.get("code") or "request_failed",
                                        error.get("message") or f"status {result.status_code}", result), False

    async def _commit(self, progress: _Progress) -> None:
        """Store the results of the longest run of finished lines after the committed ones, then the
        record that lists them (fenced). With nothing new, still read the record (a cancel shows there)."""
        first = progress.committed
        end = first
        while end in progress.results:
            end += 1
        if end == first:
            record = await self._io(self.store.read, self.tenant, self.batch_id)
            self._fenced(record)
            return
        parts = [progress.results.pop(i) for i in range(first, end)]
        ok = sum(1 for p in parts if p[2])
        await self._io(self.store.write_chunk, self.tenant, self.batch_id, first, self.run_number,
                       "".join(p[0] for p in parts), "".join(p[1] for p in parts))

        def commit(record: dict) -> dict:
            record = self._fenced(record)
            record["next_line"] = end
            record["chunks"].append([first, end, self.run_number])
            counts = record["request_counts"]
            counts["completed"] += ok
            counts["failed"] += len(parts) - ok
            return record

        await self._io(self.store.update, self.tenant, self.batch_id, commit)
        progress.committed = end

    # ---- the end --------------------------------------------------------------------------------
    async def _finalize(self, record: dict, outcome: str, items: list) -> None:
        if outcome == "completed":
            record = await self._io(self.store.update, self.tenant, self.batch_id, lambda r: self._fenced(r) | {
                "status": "finalizing", "finalizing_at": r["finalizing_at"] or int(time.time())})
        await self._io(self._write_results, record, outcome, items)

    def _write_results(self, record: dict, outcome: str, items: list) -> None:
        files = self.manager.files
        output = self.store.read_results(record, "output")
        errors = self.store.read_results(record, "error")
        expired = 0
        if outcome == "failed":  # every line is invalid (_validated): each is an error line, with its number
            errors += "".join(error_line(self.batch_id, i.index, i.custom_id, i.code, i.message) for i in items)
        if outcome == "expired":  # every line not answered in time is an error line (OpenAI's batch_expired)
            for item in items[record["next_line"]:]:
                errors += error_line(self.batch_id, item.index, item.custom_id, "batch_expired",
                                     "this line was not run before the batch expired")
                expired += 1
        out_id = output_file_id(self.batch_id) if output else None
        err_id = error_file_id(self.batch_id) if errors else None
        if out_id is not None:
            files.create_result(self.tenant, out_id, f"{self.batch_id}_output.jsonl", output.encode("utf-8"))
        if err_id is not None:
            files.create_result(self.tenant, err_id, f"{self.batch_id}_error.jsonl", errors.encode("utf-8"))
        now = int(time.time())

        def final(r: dict) -> dict:
            r = self._fenced(r)
            r.update(status=outcome, output_file_id=out_id, error_file_id=err_id)
            r[{"completed": "completed_at", "failed": "failed_at", "cancelled": "cancelled_at",
               "expired": "expired_at"}[outcome]] = now
            if outcome in ("expired", "failed"):
                r["request_counts"]["failed"] += expired if outcome == "expired" else len(items) - r["next_line"]
                r["next_line"] = len(items)
            return r

        record = self.store.update(self.tenant, self.batch_id, final)
        log.info("batch %s %s: %s", self.batch_id, outcome, record["request_counts"])
        self._clean_up(record)

    def _clean_up(self, record: dict) -> None:
        finished_at = max(record.get(f) or 0 for f in ("completed_at", "failed_at", "cancelled_at", "expired_at"))
        self.store.mark_finished(self.tenant, self.batch_id, finished_at or time.time())  # for the retention sweep
        self.store.delete_work(self.tenant, self.batch_id)
        self.store.deactivate(self.batch_id)


class BatchManager:
    """Takes batches up and runs them, on the event loop that serves requests (the engine's
    asyncio side needs one)."""

    def __init__(self, store: BatchStore, files, executor: LineExecutor, *, window: int, max_running: int,
                 scan_seconds: float, flush_seconds: float, retention_seconds: float = 0.0) -> None:
        self.store = store
        self.files = files  # FileRegistry: output and error files
        self.executor = executor
        self.window = max(1, window)
        self.max_running = max(1, max_running)
        self.scan_seconds = scan_seconds
        self.flush_seconds = flush_seconds
        self.retention_seconds = retention_seconds  # 0: finished batches are kept forever
        self._next_sweep = 0.0
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._running: dict[str, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Scan now (a batch was created or cancelled); callable from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            try:
                await self.scan()
            except Exception:
                log.exception("batch scan failed")
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + max(self.scan_seconds, SWEEP_SECONDS)
                try:
                    await asyncio.to_thread(self.sweep)
                except Exception:
                    log.exception("batch retention sweep failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self.scan_seconds)
            except TimeoutError:
                pass
            self._wake.clear()

    async def scan(self) -> None:
        active = await asyncio.to_thread(self.store.active)
        # Fairness between tenants: a tenant with a batch running here goes after those without one.
        running_tenants = {t for t, b in active if b in self._running}
        for tenant, batch_id in sorted(active, key=lambda tb: tb[0] in running_tenants):
            if batch_id in self._running:
                continue
            if len(self._running) >= self.max_running:
                return
            lease = await asyncio.to_thread(self.store.acquire, tenant, batch_id)
            if lease is None:
                continue  # another replica runs it
            self._running[batch_id] = asyncio.ensure_future(self._run(tenant, batch_id, lease))

    def sweep(self, now: float | None = None) -> int:
        """Delete every batch that finished more than `retention_seconds` before `now` (unix seconds),
        with its output and error files (BatchStore.remove). Any number of replicas may sweep at once.
        Returns the number removed."""
        self.store.index_legacy_finished()
        if self.retention_seconds <= 0:
            return 0
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        old = [entry for entry in self.store.finished() if entry.finished_at < cutoff]
        for entry in sorted(old, key=lambda e: e.finished_at):
            self.store.remove(entry, self.files)
        if old:
            log.info("batch retention: removed %d batches finished over %.0f s ago", len(old), self.retention_seconds)
        return len(old)

    async def _run(self, tenant: str, batch_id: str, lease: HeldLease) -> None:
        run = BatchRun(self, tenant, batch_id, lease)
        beat = asyncio.ensure_future(self._heartbeat(run))
        try:
            await run.run()
        except RunLost:
            log.warning("batch %s: another run took it over", batch_id)
        except Exception:
            log.exception("batch %s: run failed; a later scan retries it", batch_id)
        finally:
            beat.cancel()
            await asyncio.to_thread(self.store.leases.release, lease)
            self._running.pop(batch_id, None)
            self.wake()

    async def _heartbeat(self, run: BatchRun) -> None:
        while True:
            await asyncio.sleep(self.store.leases.lease_seconds / 3)
            try:
                if not await asyncio.to_thread(self.store.leases.renew, run.lease):
                    log.error("batch %s: lease lost; stopping here", run.batch_id)
                    run.lost = True
                    return
            except Exception:
                log.exception("batch %s: lease renewal failed", run.batch_id)

    async def close(self) -> None:
        """Stop: runs commit nothing more and release their leases; the batches resume elsewhere or later."""
        self.stopping.set()
        self._wake.set()
        tasks = list(self._running.values())
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    @property
    def running(self) -> list[str]:
        return list(self._running)
