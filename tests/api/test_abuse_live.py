"""Abuse resistance against a real `softserve serve` process (tiny model): hostile requests must cost
the server O(1), and everything else keeps answering meanwhile."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.support.live_server import LiveServer, assert_openai_error, tiny_model_dir

pytestmark = pytest.mark.process  # a live server subprocess


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("abuse-live")
    srv = LiveServer(root / "store", model=tiny_model_dir(tmp_path_factory, tokenizer), max_model_len=256,
                     log_dir=root).start()
    try:
        yield srv
    finally:
        srv.stop()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("num_prompts, limit", [
    (200_000, "at most 2048 prompts"),  # the schema's hard cap
    (2_000, "--max-choices-per-request"),  # 32,000 sequences: under the hard cap, over the configurable one
])
def test_amplified_completion_is_rejected_at_once_and_health_answers(server, num_prompts, limit):
    """200,000 one-token prompts x n=16 in a ~1 MB body: before the fix the server built 3.2 million
    requests on the event loop (/health silent for ~40 s, GBs of memory), then said 429."""
    with server.client(timeout=10) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]  # a real model: resolution must not end it early
    body = json.dumps({"model": model, "prompt": ["a"] * num_prompts, "n": 16, "max_tokens": 1}).encode()
    baseline = rss_bytes(server.pid)
    result: dict = {}

    def hostile() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            result["response"] = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})

    thread = threading.Thread(target=hostile)
    thread.start()
    peak, health_latencies = baseline, []
    with httpx.Client(base_url=server.url, timeout=5) as c:
        while thread.is_alive() or not health_latencies:
            started = time.monotonic()
            assert c.get("/health").status_code == 200  # a 5 s timeout: a stalled loop fails here
            health_latencies.append(time.monotonic() - started)
            peak = max(peak, rss_bytes(server.pid))
            time.sleep(0.02)
    thread.join()
    err = assert_openai_error(result["response"], 400, param="prompt")
    assert limit in err["message"], err
    assert max(health_latencies) < 2.0, health_latencies
    assert peak - baseline < 100 * 1024 * 1024, f"RSS grew by {(peak - baseline) / 2**20:.0f} MB"
    with server.client(timeout=30) as c:  # and the server still serves
        r = c.post("/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_idle_connections_are_bounded_and_released(tmp_path_factory, tokenizer):
    """--max-connections: idle clients (slowloris) cannot hold the server; past the limit a new
    connection gets 503 at once, and the server answers again as soon as they leave."""
    import socket

    root = tmp_path_factory.mktemp("conn-limit")
    srv = LiveServer(root / "store", model=tiny_model_dir(tmp_path_factory, tokenizer), max_model_len=256,
                     log_dir=root, extra_args=["--max-connections", "4"]).start()
    idle: list[socket.socket] = []
    try:
        with srv.client(timeout=5) as c:
            assert c.get("/health").status_code == 200
        for _ in range(4):  # connected, never send a byte
            idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        time.sleep(0.5)
        with httpx.Client(base_url=srv.url, timeout=5) as c:
            r = c.get("/health")
        assert r.status_code == 503
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + 10
        while True:
            with httpx.Client(base_url=srv.url, timeout=5) as c:
                if c.get("/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not recover after the idle connections closed"
            time.sleep(0.2)
    finally:
        for s in idle:
            s.close()
        srv.stop()
