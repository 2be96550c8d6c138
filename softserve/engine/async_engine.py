"""Runs the engine loop in its own thread; asyncio code talks to it only through queues.

    HTTP handler --(add/abort commands, thread-safe queue)--> engine thread
    engine thread --(a step's RequestOutput deltas, ONE loop.call_soon_threadsafe per event loop
                     per step)--> per-request asyncio.Queue

One wake-up per step, not one per request: each call_soon_threadsafe writes the loop's self-pipe and
lets the event loop take the GIL while the engine thread is still delivering (measured in
bench/loop_overhead.py, docs/performance.md "Around the forward").

A handler that is cancelled (client disconnect) or stops iterating aborts its request; the row leaves
the batch at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from softserve.engine.compute_threads import enter_compute_thread
from softserve.engine.engine import EngineStats, LLMEngine
from softserve.engine.outputs import RequestOutput
from softserve.engine.request import ErrorKind, FinishReason, Request
from softserve.engine.scheduler import QueueFullError

log = logging.getLogger("softserve.engine")


class EngineDeadError(RuntimeError):
    pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    """Runs on the event loop: one step's deltas into their request queues."""
    for out_queue, output in items:
        out_queue.put_nowait(output)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step=None, on_death=None) -> None:
        self.engine = engine
        self._on_step = on_step  # (seconds, rows in the step's forward) after every step, for metrics
        self._on_death = on_death  # (reason) if the loop itself dies
        # Held around every engine step; other users of the model (tuning jobs) take it between steps.
        self.step_lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._streams_lock = threading.Lock()
        self._pending = 0  # submitted but not yet taken in by the engine thread (counts toward max_queue)
        self._pending_by_tenant: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dead_reason: str | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="softserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_reason is None

    @property
    def model(self):
        """The frozen model the engine serves (tuning jobs train soft prompts on it, under step_lock)."""
        return self.engine.model

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    def stats(self) -> EngineStats:
        """Counts queued requests the engine thread has not taken in yet as waiting."""
        return dataclasses.replace(self.engine.stats(), num_waiting=self.num_waiting)

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting + self._pending

    # ---- engine thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        enter_compute_thread()
        idle = 0.0  # seconds the last (empty) step said nothing will run unless a request arrives
        try:
            while not self._stop.is_set():
                self._drain_commands(timeout=0.5 if not self.engine.has_unfinished() else idle or None)
                if self._stop.is_set():
                    break
                if self.engine.has_unfinished():
                    started = time.perf_counter()
                    with self.step_lock:
                        outputs = self.engine.step()
                    self._deliver(outputs)
                    # Batch rows held back for interactive traffic: wait for a request instead of spinning.
                    idle = self.engine.scheduler.idle_seconds() if self.engine.last_step_rows == 0 and not outputs else 0.0
                    if self._on_step is not None:
                        self._on_step(time.perf_counter() - started, self.engine.last_step_rows)
        except BaseException as exc:  # the loop itself died: fail everyone, report not-ready
            self.dead_reason = f"{type(exc).__name__}: {exc}"
            log.exception("engine loop died")
            self._fail_all(self.dead_reason)
            if self._on_death is not None:
                self._on_death(self.dead_reason)

    def _drain_commands(self, timeout: float | None) -> None:
        """Take in every queued command; wait up to `timeout` seconds for the first (None: do not wait)."""
        try:
            command = self._commands.get(timeout=timeout) if timeout else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = command
            if kind == "add":
                with self._streams_lock:
                    self._pending -= 1
                    self._pending_by_tenant[payload.tenant] -= 1
                try:
                    self.engine.add_request(payload)
                except (QueueFullError, ValueError) as exc:
                    kind = ErrorKind.QUEUE_FULL if isinstance(exc, QueueFullError) else ErrorKind.REJECTED
                    self.engine.reject(payload, str(exc), kind)  # its error delta comes with the next step
            elif kind == "abort":
                self.engine.abort_request(payload)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's deltas to their streams: one callback per event loop, deltas in step order."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._streams_lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if output.finished:
                    self._streams.pop(output.request_id, None)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the callers' event loop is gone: nobody to deliver to
                for _, output in items:
                    self._commands.put(("abort", output.request_id))

    def _fail_all(self, reason: str) -> None:
        with self._streams_lock:
            streams, self._streams = self._streams, {}
        for request_id, stream in streams.items():
            out = RequestOutput(request_id=request_id, text="", token_ids=(), finished=True,
                                finish_reason=FinishReason.ERROR, error=reason, error_kind=ErrorKind.ENGINE_DEAD)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)

    # ---- asyncio side -------------------------------------------------------------------------
    def submit(self, request: Request) -> asyncio.Queue:
        """Queue a request; raises QueueFullError (-> 429) or EngineDeadError (-> 503) at once."""
        stream = self._hand_over(request, with_stream=True)
        assert stream is not None
        return stream.queue

    def submit_detached(self, request: Request) -> None:
        """Queue a request whose deltas nobody reads (the service's prompt-KV warm-ups): it reports only
        through `request.on_finish`. Raises like `submit`."""
        self._hand_over(request, with_stream=False)

    def _hand_over(self, request: Request, *, with_stream: bool) -> _Stream | None:
        if not self.is_alive:
            raise EngineDeadError(self.dead_reason or "engine is not running")
        # Read without the engine's lock: a request that loses the race is failed with QUEUE_FULL at add.
        self.engine.scheduler.check_admission(request.tenant, also_waiting=self._pending,
                                              also_waiting_for_tenant=self._pending_by_tenant.get(request.tenant, 0),
                                              background=request.background)
        stream = _Stream(loop=asyncio.get_running_loop(), queue=asyncio.Queue()) if with_stream else None
        with self._streams_lock:
            if stream is not None:
                self._streams[request.request_id] = stream
            self._pending += 1
            self._pending_by_tenant[request.tenant] = self._pending_by_tenant.get(request.tenant, 0) + 1
        self._commands.put(("add", request))
        return stream

    def abort(self, request_id: str) -> None:
        with self._streams_lock:
            self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        out_queue = self.submit(request)
        finished = False
        try:
            while True:
                output = await out_queue.get()
                yield output
                if output.finished:
                    finished = True
                    return
        finally:
            if not finished:  # cancelled, disconnected, or the consumer stopped early
                self.abort(request.request_id)
