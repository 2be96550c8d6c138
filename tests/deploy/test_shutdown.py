"""Process-level hardening against a tiny-model server subprocess: SIGTERM drain, disconnect frees a row."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import pytest

from tests.support.live_server import LiveServer, tiny_model_dir

pytestmark = pytest.mark.process  # a live server subprocess


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return tiny_model_dir(tmp_path_factory, tokenizer)


def _gauge(client: httpx.Client, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", client.get("/metrics").text, re.M)
    assert match, name
    return float(match.group(1))


def test_sigterm_drains_in_flight_then_exits_zero(model_dir, tmp_path):
    server = LiveServer(tmp_path / "store", model=model_dir, extra_args=["--shutdown-timeout", "60"]).start()
    try:
        body = {"model": server_model_name(server), "prompt": "hello", "max_tokens": 300, "ignore_eos": True,
                "temperature": 0, "stream": True}
        chunks: list[str] = []
        first_chunk = threading.Event()

        def stream() -> None:
            with httpx.Client(base_url=server.url, timeout=120) as c, c.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
                        first_chunk.set()

        worker = threading.Thread(target=stream)
        worker.start()
        assert first_chunk.wait(60)
        server.proc.send_signal(signal.SIGTERM)
        with httpx.Client(base_url=server.url, timeout=10) as c:
            deadline = time.monotonic() + 5
            while c.get("/ready").status_code != 503:  # turns 503 at once (we poll a few ms at most)
                assert time.monotonic() < deadline
            refused = c.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "not_ready"
        worker.join(120)
        assert chunks[-1] == "[DONE]"
        finish = [json.loads(c)["choices"][0]["finish_reason"] for c in chunks[:-1] if c != "[DONE]"]
        assert finish[-1] == "length"  # the in-flight request ran to its full length
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def _request_logs(server: LiveServer) -> list[dict]:
    lines = (server._stderr_path.read_text(errors="replace") if server._stderr_path else "").splitlines()
    return [json.loads(line) for line in lines if '"softserve.request"' in line]


def _wait_row_freed(c: httpx.Client, server: LiveServer, count: int, max_tokens: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        cancelled = [r for r in _request_logs(server) if r["status"] == "cancelled"]
        if len(cancelled) >= count and _gauge(c, "softserve_running_requests") == 0.0:
            break
        assert time.monotonic() < deadline, "row was not freed"
        time.sleep(0.05)
    assert cancelled[-1]["completion_tokens"] < max_tokens  # stopped early, did not run to the end


def test_client_disconnect_frees_the_batch_row(model_dir, tmp_path):
    max_tokens = 1500
    with LiveServer(tmp_path / "store", model=model_dir) as server, server.client() as c:
        body = {"model": server_model_name(server), "prompt": "hello", "max_tokens": max_tokens, "ignore_eos": True,
                "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        # Closed mid-stream: the engine drops the row at its next step.
        _wait_row_freed(c, server, 1, max_tokens)
        # Non-streaming too: the request is aborted when the client goes away.
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/completions", json={**body, "stream": False}, timeout=0.3)
        _wait_row_freed(c, server, 2, max_tokens)
        assert c.get("/ready").status_code == 200


def server_model_name(server: LiveServer) -> str:
    with server.client() as c:
        return c.get("/v1/models").json()["data"][0]["id"]
