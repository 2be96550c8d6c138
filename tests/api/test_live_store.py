"""Live end-to-end tests of the prompt store behind real server processes (tiny random Llama: fast).

(a) a new version uploaded while a stream on the old one runs; (b) SIGKILL in the middle of an
upload, then a restart on the same store; (c) tenant isolation over HTTP with API keys;
(d) a client that goes away mid-generation.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import openai
import pytest

from softserve.service.auth import add_key
from tests.support.live_server import (
    TINY_HIDDEN, LiveServer, adapter_config, assert_openai_error, iter_sse, multipart_body, prompt_bytes,
    tiny_model_dir, upload,
)

pytestmark = pytest.mark.process  # a live server subprocess

C, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    return tiny_model_dir(tmp_path_factory, tokenizer)


@pytest.fixture
def make_server(tmp_path, tiny_dir):
    """Start tiny-model servers; every one started here is stopped (by PID) at teardown."""
    started: list[LiveServer] = []

    def make(store=None, **kwargs) -> LiveServer:
        srv = LiveServer(store or tmp_path / "store", model=tiny_dir, log_dir=tmp_path / "logs", **kwargs)
        started.append(srv)
        return srv.start()

    yield make
    for srv in started:
        srv.stop()


def _completion(client: httpx.Client, model: str, **params) -> dict:
    r = client.post(C, json={"model": model, **params})
    assert r.status_code == 200, r.text
    return r.json()


# ---- (a) upload a new version while a stream on the old one runs ------------------------------------------
def test_upload_new_version_during_stream(make_server):
    srv = make_server()
    name = "story"
    params = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "temperature": 0}
    with srv.client() as c, srv.client() as c2:
        r1 = upload(c, name, prompt_bytes(1, 4, TINY_HIDDEN), adapter_config(4))
        assert r1.status_code == 201, r1.text
        v1 = r1.json()["version"]

        with c.stream("POST", C, json={"model": name, "stream": True, **params}) as resp:
            assert resp.status_code == 200
            events = iter_sse(resp.iter_lines())
            first = next(events)
            assert isinstance(first, dict) and first["choices"], first

            # A reader thread drains the rest as it arrives, so arrival times ~ generation times.
            arrivals: list[tuple[float, dict | str]] = []
            reader = threading.Thread(target=lambda: arrivals.extend((time.monotonic(), e) for e in events), daemon=True)
            reader.start()

            # The stream is in flight: publish v2 under the same name from another connection.
            r2 = upload(c2, name, prompt_bytes(2, 6, TINY_HIDDEN), adapter_config(6))
            uploaded_at = time.monotonic()
            assert r2.status_code == 201, r2.text
            v2 = r2.json()["version"]
            assert v2 != v1
            assert c2.get(f"/v1/prompts/{name}").json()["version"] == v2
            assert [m["version"] for m in c2.get(f"/v1/prompts/{name}/versions").json()["data"]] == [v2, v1]

            short = {**params, "max_tokens": 12}
            latest = _completion(c2, name, **short)
            pinned_v2 = _completion(c2, f"{name}@{v2}", **short)
            pinned_v1 = _completion(c2, f"{name}@{v1}", **short)
            assert latest["usage"]["virtual_tokens"] == 6, "a new request on the bare name must use v2"
            assert pinned_v2["usage"]["virtual_tokens"] == 6
            assert pinned_v1["usage"]["virtual_tokens"] == 4, "the old version stays addressable"
            assert latest["choices"][0]["text"] == pinned_v2["choices"][0]["text"]
            reader.join(60)
            assert not reader.is_alive()

        assert arrivals and arrivals[-1][1] == "[DONE]"
        assert uploaded_at < arrivals[-1][0], "the stream ended before v2 was uploaded: nothing overlapped"
        chunks = [first] + [e for _, e in arrivals[:-1]]
        streamed = "".join(ch["text"] for e in chunks for ch in e["choices"])
        finish = [ch["finish_reason"] for e in chunks for ch in e["choices"] if ch["finish_reason"]]
        assert finish == ["length"]

        fresh_v1 = _completion(c, f"{name}@{v1}", **params)
        fresh_v2 = _completion(c, f"{name}@{v2}", **params)
        assert fresh_v1["usage"]["completion_tokens"] == params["max_tokens"]
        assert streamed == fresh_v1["choices"][0]["text"], "the in-flight stream must finish on the version it started with"
        if fresh_v1["choices"][0]["text"] != fresh_v2["choices"][0]["text"]:
            assert streamed != fresh_v2["choices"][0]["text"]
    assert srv.is_alive()


# ---- (b) kill -9 in the middle of an upload ----------------------------------------------------------------------
def _temp_files(root) -> list[str]:
    """LocalBackend's temp files (`.tmp-*`); its persistent `.lock-*` files are not temp files."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.path.join(dirpath, n) for n in dirnames + filenames if n.startswith(".tmp")]
    return out


def test_sigkill_mid_upload_keeps_old_version(make_server, tmp_path):
    store = tmp_path / "store"
    name = "durable"
    params = {"prompt": "The quick brown fox", "max_tokens": 16, "ignore_eos": True, "temperature": 0, "logprobs": 0}

    srv = make_server(store)
    with srv.client() as c:
        r1 = upload(c, name, prompt_bytes(11, 4, TINY_HIDDEN), adapter_config(4))
        assert r1.status_code == 201, r1.text
        v1 = r1.json()["version"]
        before = _completion(c, name, **params)["choices"][0]
    before_tokens = before["logprobs"]["tokens"]
    assert len(before_tokens) == 16

    body, ctype = multipart_body(prompt_bytes(12, 32, TINY_HIDDEN), adapter_config(32))
    half = len(body) // 2
    sent_half, killed = threading.Event(), threading.Event()
    outcome: dict = {}

    def slow_body():
        yield body[:half]
        sent_half.set()
        killed.wait(30)  # the rest only after the server is dead
        time.sleep(0.2)
        yield body[half:]

    def uploader():
        try:
            with srv.client(timeout=30) as c:
                r = c.put(f"/v1/prompts/{name}", content=slow_body(),
                          headers={"content-type": ctype, "content-length": str(len(body))})
                outcome["response"] = r
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=uploader, daemon=True)
    thread.start()
    assert sent_half.wait(30), "the upload never started"
    time.sleep(0.5)  # let the server receive the first half
    assert srv.is_alive()
    rc = srv.kill9()
    killed.set()
    thread.join(30)
    assert not thread.is_alive()
    assert rc == -9
    assert "response" not in outcome, f"the upload cannot have succeeded: {outcome['response'].text}"

    srv2 = make_server(store)  # restart on the same store directory
    with srv2.client() as c:
        listed = c.get("/v1/prompts").json()["data"]
        assert [(p["id"], p["version"]) for p in listed] == [(name, v1)]
        versions = c.get(f"/v1/prompts/{name}/versions").json()["data"]
        assert [v["version"] for v in versions] == [v1]
        after = _completion(c, name, **params)
        assert after["usage"]["virtual_tokens"] == 4
        assert after["choices"][0]["logprobs"]["tokens"] == before_tokens
        assert after["choices"][0]["text"] == before["text"]
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert name in models and not any(m.startswith(".") for m in models)
        assert _temp_files(store) == [], "no temp files may be left in the store"
        assert len(os.listdir(store / "blobs" / "sha256")) == 1
        # the store is still writable after the crash
        r2 = upload(c, name, prompt_bytes(12, 32, TINY_HIDDEN), adapter_config(32))
        assert r2.status_code == 201, r2.text
        assert _completion(c, name, **params)["usage"]["virtual_tokens"] == 32


# ---- (c) tenant isolation over HTTP ----------------------------------------------------------------------------
def test_tenant_isolation(make_server, tmp_path):
    keyfile = tmp_path / "keys.yaml"
    key_a = add_key(keyfile, "acme")
    key_b = add_key(keyfile, "beta")
    key_admin = add_key(keyfile, "ops", role="admin")
    srv = make_server(api_keys=keyfile)
    a, b, admin = srv.client(key_a), srv.client(key_b), srv.client(key_admin)
    anon, wrong = srv.client(), srv.client("sk-ss-not-a-real-key")
    basic = httpx.Client(base_url=srv.url, headers={"Authorization": f"Basic {key_a}"}, timeout=60)
    try:
        r = upload(a, "secret", prompt_bytes(21, 4, TINY_HIDDEN), adapter_config(4))
        assert r.status_code == 201, r.text
        version = r.json()["version"]
        gen = {"prompt": "hello", "max_tokens": 4, "temperature": 0}
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}
        assert _completion(a, "secret", **gen)["usage"]["virtual_tokens"] == 4

        # tenant B cannot see or touch it, and cannot tell it exists
        for model in ("secret", f"secret@{version}", "acme/secret", f"acme/secret@{version}"):
            assert_openai_error(b.post(C, json={"model": model, **gen}), 404, "model_not_found")
            assert_openai_error(b.post(CHAT, json={"model": model, **chat}), 404, "model_not_found")
            assert_openai_error(b.post(C, json={"model": model, "stream": True, **gen}), 404, "model_not_found")
        for ref in ("secret", "acme/secret"):
            assert_openai_error(b.get(f"/v1/prompts/{ref}"), 404)
            assert_openai_error(b.get(f"/v1/prompts/{ref}/versions"), 404)
            assert_openai_error(b.get(f"/v1/prompts/{ref}/download"), 404)
            assert_openai_error(b.get(f"/v1/prompts/{ref}/download", params={"version": version}), 404)
            assert_openai_error(b.delete(f"/v1/prompts/{ref}"), 404)
        assert_openai_error(upload(b, "acme/secret", prompt_bytes(22, 4, TINY_HIDDEN)), 404)
        # same answer as for a name that exists nowhere (no existence oracle)
        hidden = b.post(C, json={"model": "secret", **gen}).json()["error"]
        missing = b.post(C, json={"model": "no-such", **gen}).json()["error"]
        assert (hidden["type"], hidden["code"], hidden["param"]) == (missing["type"], missing["code"], missing["param"])
        assert hidden["message"].replace("secret", "X") == missing["message"].replace("no-such", "X")
        assert all("secret" not in m["id"] for m in b.get("/v1/models").json()["data"])
        assert all("secret" not in p["id"] for p in b.get("/v1/prompts").json()["data"])
        oai_b = openai.OpenAI(base_url=srv.base_url, api_key=key_b, max_retries=0)
        assert all("secret" not in m.id for m in oai_b.models.list().data)
        with pytest.raises(openai.NotFoundError):
            oai_b.completions.create(model="secret", prompt="hi", max_tokens=2)

        # A still has it after B's DELETE attempts
        assert a.get("/v1/prompts/secret").json()["version"] == version
        assert "secret" in [m["id"] for m in a.get("/v1/models").json()["data"]]
        # B may own a prompt with the same name: its own, not A's
        assert upload(b, "secret", prompt_bytes(23, 6, TINY_HIDDEN), adapter_config(6)).status_code == 201
        assert _completion(b, "secret", **gen)["usage"]["virtual_tokens"] == 6
        assert _completion(a, "secret", **gen)["usage"]["virtual_tokens"] == 4

        # missing / wrong / malformed credentials: 401 everywhere except health probes
        for client in (anon, wrong, basic):
            for method, path, kwargs in (("POST", C, {"json": {"model": "secret", **gen}}),
                                         ("POST", CHAT, {"json": {"model": "secret", **chat}}),
                                         ("GET", "/v1/models", {}), ("GET", "/v1/prompts", {}),
                                         ("GET", "/v1/prompts/secret", {}), ("DELETE", "/v1/prompts/secret", {})):
                r = client.request(method, path, **kwargs)
                assert_openai_error(r, 401, "invalid_api_key")
                assert r.json()["error"]["type"] == "authentication_error"
            assert_openai_error(upload(client, "secret", prompt_bytes(24, 4, TINY_HIDDEN)), 401)
            assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0).models.list()
        assert a.get("/v1/prompts/secret").json()["version"] == version  # 401 writes changed nothing

        # the public namespace: admins write, everyone reads
        r = upload(admin, "public/shared", prompt_bytes(25, 3, TINY_HIDDEN), adapter_config(3))
        assert r.status_code == 201, r.text
        for client in (a, b):
            out = _completion(client, "public/shared", **gen)
            assert out["usage"]["virtual_tokens"] == 3 and out["model"] == "public/shared"
            r = client.post(CHAT, json={"model": "public/shared", **chat})
            assert r.status_code == 200 and r.json()["usage"]["virtual_tokens"] == 3
            assert "public/shared" in [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert client.get("/v1/prompts/public/shared").json()["public"] is True
        assert_openai_error(upload(b, "public/shared", prompt_bytes(26, 3, TINY_HIDDEN)), 403)
        assert_openai_error(b.delete("/v1/prompts/public/shared"), 403)
        assert _completion(a, "public/shared", **gen)["usage"]["virtual_tokens"] == 3
    finally:
        for client in (a, b, admin, anon, wrong, basic):
            client.close()


def _metric(text: str, name: str) -> float | None:
    """Value of an unlabelled sample in Prometheus text format (None if absent)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# ---- (d) client disconnects mid-generation -------------------------------------------------------------------------
def test_client_disconnect_frees_the_server(make_server):
    # One batch row: a generation that kept running after its client left would hold the only row
    # for ~2000 tokens each (three abandoned requests: ~25x the 200-token time), and the follow-up
    # request would queue behind them.
    srv = make_server(extra_args=["--max-batch-size", "1"])
    with srv.client() as c:
        base = c.get("/ready").json()["model"]
        long = {"model": base, "prompt": "Tell me a very long story", "max_tokens": 2000, "ignore_eos": True,
                "temperature": 0}
        quick = {"model": base, "prompt": "hi", "max_tokens": 5, "ignore_eos": True, "temperature": 0}
        start = time.monotonic()
        assert _completion(c, **{**long, "max_tokens": 200})["usage"]["completion_tokens"] == 200
        t200 = time.monotonic() - start  # an abandoned 2000-token row would cost ~10x this

    # streaming: read one chunk, then drop the connection
    with srv.client() as c:
        with c.stream("POST", C, json={**long, "stream": True}) as resp:
            assert resp.status_code == 200
            first = next(iter_sse(resp.iter_lines()))
            assert isinstance(first, dict)
    # non-streaming: give up waiting (the client closes the connection on its read timeout)
    with srv.client(timeout=httpx.Timeout(10.0, read=0.5)) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(C, json=long)
    # streaming chat, dropped after the role chunk
    with srv.client() as c:
        with c.stream("POST", CHAT, json={"model": base, "messages": [{"role": "user", "content": "go"}],
                                          "max_tokens": 2000, "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200
            next(iter_sse(resp.iter_lines()))

    with srv.client() as c:
        # Where the server exports Prometheus metrics, the batch and the queue must drain on their own.
        if c.get("/metrics").status_code == 200:
            deadline = time.monotonic() + 3 * t200 + 2.0
            while True:
                text = c.get("/metrics").text
                busy = {m: v for m in ("softserve_running_requests", "softserve_queue_depth")
                        if (v := _metric(text, m)) is not None}
                if not any(busy.values()) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert not any(busy.values()), f"abandoned requests still in the engine: {busy}"
        start = time.monotonic()
        r = c.post(C, json=quick)
        elapsed = time.monotonic() - start
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        assert c.get("/ready").status_code == 200
        assert elapsed < 3 * t200 + 0.5, (
            f"follow-up took {elapsed:.1f} s (200 tokens take {t200:.1f} s): abandoned generations still running?")
        r = c.post(CHAT, json={"model": base, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200
    assert srv.is_alive()
