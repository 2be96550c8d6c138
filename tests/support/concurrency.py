"""Run calls at the same time and collect what they raised: for tests of concurrent writers."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable


def run_together(calls: Iterable[Callable[[], object]]) -> list[BaseException]:
    """Start every call in its own thread, wait for all, return the exceptions raised (in call order)."""
    calls = list(calls)
    raised: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            calls[i]()
        except BaseException as exc:  # reported to the caller, which asserts on it
            raised[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [exc for exc in raised if exc is not None]
