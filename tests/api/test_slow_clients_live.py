"""Idle and trickling connections against a real `softserve serve` (issue #26 F4): with
`--max-connections N`, N sockets that never finish a request head used to hold the server for ever
(every new connection, `/health` included, got 503). --header-timeout and --keep-alive-timeout close
them, and the server answers again."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from tests.support.live_server import LiveServer, iter_sse, tiny_model_dir

pytestmark = pytest.mark.process  # a live server subprocess

HEADER_TIMEOUT = 2.0

# The deadline subclasses whichever uvicorn protocol runs: the default stack (httptools + uvloop, installed
# with softserve) and the pure-Python one (h11 + asyncio) must both close these connections.
STACKS = pytest.mark.parametrize("stack", [["--http-parser", "httptools", "--event-loop", "uvloop"],
                                           ["--http-parser", "h11", "--event-loop", "asyncio"]], ids=["httptools", "h11"])


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True once the server has closed `sock` (EOF or reset); False if it is still open after `within` s."""
    sock.settimeout(within)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


class Trickler(threading.Thread):
    """Sends a request head one byte every `every` seconds and never finishes it (slowloris)."""

    def __init__(self, port: int, every: float = 0.3) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.every = every
        self.sent = 0
        self.stopped_by_server = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100_000
        while not self.stop.is_set() and self.sent < len(head):
            try:
                self.sock.send(head[self.sent:self.sent + 1])
            except OSError:
                self.stopped_by_server.set()
                return
            self.sent += 1
            self.stop.wait(self.every)


def _health(url: str) -> int:
    with httpx.Client(base_url=url, timeout=5) as c:
        return c.get("/health").status_code


@STACKS
def test_idle_and_trickling_connections_are_closed_and_health_answers_again(stack, tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("slow-clients")
    srv = LiveServer(root / "store", model=tiny_model_dir(tmp_path_factory, tokenizer), max_model_len=256,
                     log_dir=root, extra_args=["--max-connections", "4", "--header-timeout", str(HEADER_TIMEOUT),
                                               "--keep-alive-timeout", "1", *stack]).start()
    socks: list[socket.socket] = []
    tricklers: list[Trickler] = []
    try:
        assert _health(srv.url) == 200
        # Two sockets that never send a byte, two that trickle a request head: the limit, all held.
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]
        tricklers = [Trickler(srv.port) for _ in range(2)]
        for t in tricklers:
            t.start()
        time.sleep(0.5)
        assert _health(srv.url) == 503  # they do hold every connection now: what the timeouts must undo

        # All four are closed by the server (a trickler's bytes do not extend its deadline) ...
        for s in socks:
            assert _closed_by_peer(s, within=HEADER_TIMEOUT * 10), "an idle connection was never closed"
        for t in tricklers:
            assert _closed_by_peer(t.sock, within=HEADER_TIMEOUT * 10), "a trickling connection was never closed"
            assert t.sent < 1000  # closed mid-head, long before the head was done
        # ... and /health answers again, the tricklers still trying.
        deadline = time.monotonic() + HEADER_TIMEOUT * 10
        while _health(srv.url) != 200:
            assert time.monotonic() < deadline, "the server did not recover: " + srv.logs()
            time.sleep(0.2)
    finally:
        for t in tricklers:
            t.stop.set()
            t.sock.close()
        for s in socks:
            s.close()
        srv.stop()


@STACKS
def test_a_keep_alive_connection_gets_a_new_header_deadline_after_each_response(stack, tmp_path_factory, tokenizer):
    """After a response, silence is closed by --keep-alive-timeout; trickling the next head (each byte
    restarts uvicorn's keep-alive timer) by --header-timeout. A request that does arrive is answered, a
    streamed completion too."""
    root = tmp_path_factory.mktemp("keep-alive")
    srv = LiveServer(root / "store", model=tiny_model_dir(tmp_path_factory, tokenizer), max_model_len=256,
                     log_dir=root, extra_args=["--header-timeout", str(HEADER_TIMEOUT), "--keep-alive-timeout", "60", *stack]).start()
    try:
        # The stack streams a completion as it answers it whole (SSE events, then [DONE]).
        with srv.client() as c:
            model = c.get("/v1/models").json()["data"][0]["id"]
            body = {"model": model, "prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
            whole = c.post("/v1/completions", json=body)
            assert whole.status_code == 200, whole.text
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                events = list(iter_sse(resp.iter_lines()))
        assert events[-1] == "[DONE]" and len(events) > 2
        protocol, loop = {"httptools": ("HttpToolsProtocol", "uvloop"), "h11": ("H11Protocol", "asyncio")}[stack[1]]
        assert f"API server: {protocol}, {loop} event loop" in srv.logs()  # the stack asked for is the one running
        assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole.json()["choices"][0]["text"]
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first
        sent = 0
        closed = False
        deadline = time.monotonic() + HEADER_TIMEOUT * 10
        while time.monotonic() < deadline:  # keep-alive (60 s) would never fire: every byte restarts it
            try:
                s.send(b"G")
                sent += 1
            except OSError:
                closed = True
                break
            if _closed_by_peer(s, within=0.3):
                closed = True
                break
        assert closed, f"trickled {sent} bytes of the next head and the connection is still open"
        s.close()
    finally:
        srv.stop()


@STACKS
def test_an_oversized_request_head_is_refused_and_the_server_answers_on(stack, tmp_path_factory, tokenizer):
    """httptools buffers a request head of any size: past --max-header-bytes the server answers 431 (h11, held to
    the same limit, answers 400) and closes the connection, instead of buffering one header line for the whole
    header deadline. A head under the limit is served."""
    root = tmp_path_factory.mktemp("big-head")
    srv = LiveServer(root / "store", model=tiny_model_dir(tmp_path_factory, tokenizer), max_model_len=256, log_dir=root,
                     extra_args=["--max-header-bytes", "16384", "--header-timeout", "30", *stack]).start()
    try:
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200_000  # never finished
        try:
            s.sendall(head)
        except OSError:
            pass  # the server may close before it has read everything
        reply = b""
        try:
            while chunk := s.recv(4096):
                reply += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        s.close()
        expected = b"HTTP/1.1 431" if stack[1] == "httptools" else (b"HTTP/1.1 431", b"HTTP/1.1 400")
        assert reply.startswith(expected), reply[:200]
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.get("/health", headers={"X-Pad": "a" * 8000}).status_code == 200  # under the limit: served
    finally:
        srv.stop()
