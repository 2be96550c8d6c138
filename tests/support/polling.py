"""Polling a resource over HTTP until a condition holds (a batch, a tuning job), with a deadline."""

from __future__ import annotations

import time
from collections.abc import Callable


def poll_json(client, path: str, check: Callable[[dict], bool], timeout: float, *, headers: dict | None = None,
              interval: float = 0.05) -> dict:
    """GET `path` (JSON) until `check` holds for it; returns that body. AssertionError with the last body
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = client.get(path, headers=headers).json()
        if check(body):
            return body
        time.sleep(interval)
    raise AssertionError(f"{path}: not there after {timeout:.0f} s; last: {str(body)[:2000]}")
