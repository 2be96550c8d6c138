"""Structured output against hostile grammars (issue #26 F1, F2): a grammar can neither kill the server
(llguidance overflowed its stack: SIGSEGV) nor stall other tenants (compiles on the engine thread,
once per choice). The crashing shapes are only ever compiled in subprocesses: the sandbox child, or
a live server."""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest

from tests.support import deep_grammars as D
from tests.support.live_server import LiveServer, tiny_model_dir
from softserve.engine.grammar_sandbox import GrammarSandbox, TokenizerSpec
from softserve.engine.guided import GuidedSpecError

pytestmark = pytest.mark.process  # the sandbox child, a live server

# Loose enough that the crashing shapes get past the static bounds and reach the sandbox.
LOOSE = ["--guided-max-bytes", "1000000", "--guided-max-rules", "100000", "--guided-max-definitions", "100000",
         "--guided-compile-timeout", "30"]


def test_sandbox_refuses_grammars_that_crash_it_and_keeps_serving(tokenizer):
    sandbox = GrammarSandbox(TokenizerSpec.of(tokenizer), timeout_s=30)
    try:
        for name, n in D.CRASHERS:
            with pytest.raises(GuidedSpecError, match="crashed the grammar compiler"):
                sandbox.check(*D.GENERATORS[name](n))
        assert sandbox.crashes == len(D.CRASHERS)
        assert sandbox.check(*D.ref_chain(10))  # a fresh child took the dead one's place
        with pytest.raises(GuidedSpecError, match="unknown name"):
            sandbox.check("grammar", "start: missing")  # an ordinary error is an answer, not a crash
        assert sandbox.crashes == len(D.CRASHERS)
    finally:
        sandbox.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("grammar-abuse")
    srv = LiveServer(root / "store", model=tiny_model_dir(tmp_path_factory, tokenizer), max_model_len=256,
                     log_dir=root, extra_args=LOOSE).start()
    try:
        yield srv
    finally:
        srv.stop()


def _post_guided(c: httpx.Client, model: str, kind: str, value: str, n: int = 1) -> httpx.Response:
    """The constraint goes into the body as text: Python's json cannot even load the deepest ones."""
    field = {"json_schema": "guided_json", "grammar": "guided_grammar", "regex": "guided_regex",
             "choice": "guided_choice"}[kind]
    payload = value if kind in ("json_schema", "choice") else json.dumps(value)
    head = json.dumps({"model": model, "prompt": "x", "max_tokens": 1, "n": n})
    body = head[:-1] + f', "{field}": {payload}}}'
    return c.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("name,n", D.CATALOGUE)
def test_server_survives_every_hostile_grammar(server, name, n):
    with server.client(timeout=120) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        r = _post_guided(c, model, *D.GENERATORS[name](n))
        assert r.status_code in (200, 400), r.text[:300]
        if r.status_code == 400:  # a body too deep for the JSON parser is refused before it is a grammar
            err = r.json()["error"]
            assert err["code"] == "invalid_grammar" or "parsing the body" in err["message"], err
        assert server.is_alive(), server.logs()
        assert c.get("/health").status_code == 200



# A latency ratio of millisecond requests on the tiny model: the brief keeps timed asserts out of the default
# suite (it failed at 2.1x on a CI-sized machine while another process installed packages). Run it with
# `pytest -m slow tests/api/test_grammar_abuse.py`; the survival checks above stay in `make test`.
@pytest.mark.slow
def test_hostile_grammars_do_not_stall_other_tenants(server):
    """F2-class requests (5,000 required properties, n=16, a new schema each time so nothing is cached) and
    F1-class ones (chains that crash the compiler) keep arriving; meanwhile a plain 1-token request stays
    within 2x its idle latency (medians) and /health answers within 1 s."""
    with server.client(timeout=60) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
    plain = {"model": model, "prompt": "hello", "max_tokens": 1}

    def victim_latencies(c: httpx.Client, count: int) -> list[float]:
        out = []
        for _ in range(count):
            started = time.monotonic()
            assert c.post("/v1/completions", json=plain).status_code == 200
            out.append(time.monotonic() - started)
        return out

    with server.client(timeout=60) as c:
        victim_latencies(c, 3)  # warm
        idle = statistics.median(victim_latencies(c, 9))

    stop = threading.Event()
    statuses: list[int] = []

    def hostile(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            i = 0
            while not stop.is_set():
                i += 1
                if i % 3 == 0:
                    kind, value = D.GENERATORS[D.CRASHERS[i % len(D.CRASHERS)][0]](3000)
                else:
                    kind, value = D.many_properties(5000)
                    value = value.replace("property_", f"w{worker}i{i}_")  # uncached: a real compile each time
                statuses.append(_post_guided(c, model, kind, value, n=16).status_code)

    threads = [threading.Thread(target=hostile, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # the first compiles are under way
        busy, health = [], []
        with server.client(timeout=60) as c, httpx.Client(base_url=server.url, timeout=1.0) as probe:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                busy += victim_latencies(c, 1)
                started = time.monotonic()
                assert probe.get("/health").status_code == 200  # a 1 s timeout: a stall fails here
                health.append(time.monotonic() - started)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) <= {200, 400, 429}, statuses
    assert any(s == 400 for s in statuses) and server.is_alive()
    during = statistics.median(busy)
    print(f"idle median {idle * 1000:.0f} ms, during median {during * 1000:.0f} ms ({during / idle:.2f}x), "
          f"health max {max(health) * 1000:.0f} ms, hostile requests {len(statuses)}")
    assert during <= 2 * idle, (idle, sorted(busy))
