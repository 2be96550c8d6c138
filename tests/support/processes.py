"""Processes the tests start: waited for until they answer, stopped by their PID only."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable


def free_port() -> int:
    """A port the OS considers free right now on 127.0.0.1 (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
    """Signal exactly this PID, wait, SIGKILL it if it will not go; returns its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def wait_until_ready(probe: Callable[[], str | None], proc: subprocess.Popen, what: str, logs: Callable[[], str],
                     timeout: float, interval: float = 0.1, error: type[Exception] = RuntimeError) -> None:
    """Call `probe` until it returns None (ready) or the deadline; it returns why not ready otherwise.
    Raises `error` with the last reason and the process's logs, at once if the process has exited."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"{what} exited with {proc.returncode} before it was ready\n{logs()}")
        reason = probe()
        if reason is None:
            return
        last = reason
        time.sleep(interval)
    raise error(f"{what} not ready after {timeout:.0f} s (last: {last})\n{logs()}")


def http_probe(client, url: str) -> Callable[[], str | None]:
    """A `wait_until_ready` probe: ready when `url` answers 200."""
    import httpx

    def probe() -> str | None:
        try:
            r = client.get(url)
        except httpx.TransportError as exc:
            return repr(exc)
        return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"

    return probe
