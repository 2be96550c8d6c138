"""`softserve serve` with timers around the engine step's parts, for bench/loop_overhead.py.

    PYTHONPATH=CODE_ROOT python bench/loop_probe.py STATS_FILE serve --port ... (the CLI's arguments)

Wraps (never edits) methods by name, so it measures any checkout's code as shipped: the checkout on
PYTHONPATH is the one imported (this file adds nothing to sys.path but its own folder). Every 0.2 s a
thread writes cumulative counters to STATS_FILE (atomically): wall seconds and calls per wrapped part,
gaps between engine steps, tokens delivered, and CPU seconds per thread (event loop, engine, other).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import defaultdict

# (module, class, method, label): the parts of an engine step; missing ones are skipped.
PARTS = [
    ("softserve.engine.engine", "LLMEngine", "step", "step"),
    ("softserve.engine.scheduler", "Scheduler", "schedule", "schedule"),
    ("softserve.engine.model_runner", "ModelRunner", "run", "forward"),
    ("softserve.engine.engine", "LLMEngine", "postprocess", "postprocess"),
    ("softserve.engine.detokenizer", "Detokenizer", "step", "detokenize"),
    # per request, in the thread pool (class None: a function the routes module calls by name)
    ("softserve.api.openai_routes", None, "resolve_model", "resolve_model"),
    ("softserve.api.openai_routes", None, "_tokenize_prompts", "tokenize"),
    ("softserve.store.cache", "PromptCache", "acquire", "pin_prompt"),
]
GAP_LIMIT_S = 0.05  # a longer pause between steps is the engine idling for work, not loop overhead

_wall: dict[str, float] = defaultdict(float)
_cpu: dict[str, float] = defaultdict(float)  # CPU seconds of the calling thread (all of the forward at 1 torch thread)
_calls: dict[str, int] = defaultdict(int)
_state: dict = {"engine_tid": None, "tokens": 0, "steps": 0, "gap_s": 0.0, "last_step_end": None, "at_step_end": None}


def _wrap(cls, attr: str, label: str) -> None:
    fn = getattr(cls, attr)

    def timed(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _wall[label] += time.perf_counter() - t0
            _cpu[label] += time.thread_time() - c0
            _calls[label] += 1

    setattr(cls, attr, timed)


def _wrap_step(cls) -> None:
    fn = cls.step

    def step(self):
        t0, c0 = time.perf_counter(), time.thread_time()
        if _state["engine_tid"] is None:
            _state["engine_tid"] = threading.get_ident()
        last = _state["last_step_end"]
        if last is not None and t0 - last < GAP_LIMIT_S:
            _state["gap_s"] += t0 - last
        outputs = fn(self)
        t1 = time.perf_counter()
        _wall["step"] += t1 - t0
        _cpu["step"] += time.thread_time() - c0
        _calls["step"] += 1
        _state["tokens"] += sum(len(o.token_ids) for o in outputs)
        _state["steps"] += 1
        _state["last_step_end"] = t1
        _state["at_step_end"] = _snapshot()  # deltas between two of these cover whole steps
        return outputs

    cls.step = step


def _thread_cpu() -> dict[str, float]:
    """CPU seconds per thread group: the event loop (the main thread), the engine thread, the rest
    (per-thread CPU clocks: exact, unlike /proc's 10 ms ticks)."""
    def clock(ident) -> float:
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (OSError, TypeError):
            return 0.0

    loop = clock(threading.main_thread().ident)
    engine = clock(_state["engine_tid"]) if _state["engine_tid"] is not None else 0.0
    return {"event_loop": loop, "engine": engine, "other": time.process_time() - loop - engine}


def _snapshot() -> dict:
    return {"t": time.perf_counter(), "wall": dict(_wall), "part_cpu": dict(_cpu), "calls": dict(_calls),
            "cpu": _thread_cpu(), "tokens": _state["tokens"], "steps": _state["steps"], "gap_s": _state["gap_s"]}


def _dump(path: str) -> None:
    """The counters as of the last step's end (as of now before the first step)."""
    while True:
        snap = _state.get("at_step_end") or _snapshot()
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(snap, f)
        os.replace(tmp, path)
        time.sleep(0.2)


def install() -> None:
    import importlib

    for module, cls_name, attr, label in PARTS:
        mod = importlib.import_module(module)
        cls = mod if cls_name is None else getattr(mod, cls_name, None)
        if cls is None or not hasattr(cls, attr):
            continue
        if label == "step":
            _wrap_step(cls)
        else:
            _wrap(cls, attr, label)


def main() -> int:
    stats_path, argv = sys.argv[1], sys.argv[2:]
    install()
    threading.Thread(target=_dump, args=(stats_path,), name="loop-probe", daemon=True).start()
    from softserve.cli import main as cli_main

    profile_path = os.environ.get("LOOP_PROBE_CPROFILE")  # profile the event loop (main) thread to this file
    if not profile_path:
        return cli_main(argv)
    import cProfile

    profiler = cProfile.Profile()
    try:
        return profiler.runcall(cli_main, argv)
    finally:
        profiler.dump_stats(profile_path)


if __name__ == "__main__":
    raise SystemExit(main())
