"""One multi-threaded OpenMP pool in the process: the engine thread's (and a running tuning job's).

torch's CPU kernels parallelise with OpenMP. libgomp gives every thread that starts a parallel region
its own pool of worker threads, kept until that thread exits, and once the process holds more such
workers than it has CPUs, every pool stops spinning between regions and sleeps instead ("throttled").
Each of the hundreds of small regions of a decode step then pays a futex wake-up: measured on this
2-core box (torch 2.13, bf16), a 16-row linear took 64 us in a thread that owned the only pool and
130-165 us in a thread that started after another thread (here, the one that loaded the model) had
run one 2-thread region; a live server used ~1 core of 2.

So `configure` makes every thread single-threaded for torch by default (no extra pools: the loading
thread, the HTTP threads, the store's readers), and `enter_compute_thread` gives the calling thread
the configured count for itself only (its OpenMP and MKL counts are per thread), leaving the process
default at 1. The engine thread calls it; a tuning job runs in a short-lived thread that calls it, so
its pool is freed when the job ends. Where the OpenMP runtime cannot be found (not libgomp/libiomp),
it falls back to torch.set_num_threads, the plain behaviour.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

_threads = 0  # what a compute thread gets; 0: `configure` was not called (torch's own behaviour everywhere)


@functools.cache  # once per process: a library loaded by torch stays loaded; every compute thread asks
def _loaded_library(*names: str) -> ctypes.CDLL | None:
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if any(name in path.rsplit("/", 1)[-1] for name in names):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def _set_thread_count(n: int) -> bool:
    """The calling thread's OpenMP (and MKL) thread count, without touching the process default."""
    openmp = _loaded_library("libgomp", "libiomp")
    if openmp is None or not hasattr(openmp, "omp_set_num_threads"):
        return False
    torch.get_num_threads()  # torch's lazy per-thread init first: it would reset the count set below
    openmp.omp_set_num_threads(ctypes.c_int(n))
    mkl = _loaded_library("libtorch_cpu")
    setter = getattr(mkl, "mkl_set_num_threads_local", None) if mkl is not None else None
    if setter is not None:  # the exported symbol is MKL's Fortran entry point: it takes a pointer
        count = ctypes.c_int(n)
        setter(ctypes.byref(count))
    return True


def configure(threads: int) -> int:
    """Compute threads get `threads` (0: torch's default, the CPU count); every other thread gets 1.
    Call before the model is loaded, so that loading starts no pool. Returns the compute count."""
    global _threads
    _threads = threads or torch.get_num_threads()
    torch.set_num_threads(1)
    return _threads


def configured() -> bool:
    return _threads > 0


def enter_compute_thread() -> None:
    """Give the calling thread the configured thread count (see the module docstring)."""
    if _threads <= 0:
        return
    if not _set_thread_count(_threads):
        log.info("no OpenMP runtime found to set per-thread counts; torch.set_num_threads(%d) for the process", _threads)
        torch.set_num_threads(_threads)


def run_in_compute_thread(fn: Callable[..., T], *args: Any, name: str = "softserve-compute") -> T:
    """fn(*args) in a fresh compute thread, joined: its OpenMP pool is freed when it returns."""
    if _threads <= 0:
        return fn(*args)
    result: list[Any] = []
    error: list[BaseException] = []

    def target() -> None:
        enter_compute_thread()
        try:
            result.append(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
