"""`softserve.client`: against a live tiny-model server (sync + async, prompts, typed errors, auth) and
against a local stub HTTP server (retries, Retry-After, headers, timeouts, in-stream errors, tuning)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from softserve import client as C
from softserve.api.schemas import (ChatCompletionResponse, CompletionResponse, ModelList, PromptDeleted, PromptInfo,
                                   PromptUploadResponse)
from softserve.service.auth import add_key
from tests.support.live_server import TINY_HIDDEN, LiveServer, adapter_config, free_port, prompt_tensor, tiny_model_dir

K = 4
NAME = "client-task"
TEXT = "The capital of France is"
GEN = dict(max_tokens=6, temperature=0, ignore_eos=True)


# ---- live server -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory, tokenizer):
    """One tiny-model server with API keys (so 401 is testable); yields (server, key, adapter dir)."""
    root = tmp_path_factory.mktemp("client-live")
    model_dir = tiny_model_dir(tmp_path_factory, tokenizer)
    key = add_key(root / "keys.yaml", "acme")
    srv = LiveServer(root / "store", model=model_dir, api_keys=root / "keys.yaml", max_model_len=256,
                     log_dir=root).start()
    adapter = root / "adapter"
    adapter.mkdir()
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": prompt_tensor(3, K, TINY_HIDDEN)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_bytes(adapter_config(K))
    try:
        yield srv, key, adapter
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ss(live):
    srv, key, adapter = live
    with C.Client(srv.base_url, api_key=key, timeout=60) as client:  # ".../v1" is accepted
        up = client.prompts.push(adapter, NAME, description="from the client")
        assert isinstance(up, PromptUploadResponse)
        yield client


@pytest.mark.process
def test_complete_chat_and_streams_sync(ss):
    r = ss.complete(NAME, TEXT, **GEN)
    assert isinstance(r, CompletionResponse) and r.model == NAME
    assert r.choices[0].text and r.usage.completion_tokens == 6 and r.usage.virtual_tokens == K
    assert "".join(ss.stream_complete(NAME, TEXT, **GEN)) == r.choices[0].text

    msgs = [{"role": "user", "content": "Say hi"}]
    c = ss.chat(NAME, msgs, **GEN)
    assert isinstance(c, ChatCompletionResponse) and c.choices[0].message.content
    assert "".join(ss.stream_chat(NAME, msgs, **GEN)) == c.choices[0].message.content

    models = ss.models()
    assert isinstance(models, ModelList) and NAME in {m.id for m in models.data}
    assert ss.ready()


@pytest.mark.process
def test_async_client(live, ss):
    srv, key, _ = live
    expected = ss.complete(NAME, TEXT, **GEN).choices[0].text
    msgs = [{"role": "user", "content": "Say hi"}]
    expected_chat = ss.chat(NAME, msgs, **GEN).choices[0].message.content

    async def main():
        async with C.AsyncClient(srv.url, api_key=key) as ac:
            r, c = await asyncio.gather(ac.complete(NAME, TEXT, **GEN), ac.chat(NAME, msgs, **GEN))
            streamed = [d async for d in ac.stream_complete(NAME, TEXT, **GEN)]
            streamed_chat = [d async for d in ac.stream_chat(NAME, msgs, **GEN)]
            infos = await ac.prompts.list()
            got = await ac.prompts.get(NAME)
            with pytest.raises(C.NotFoundError):
                await ac.complete("nope", TEXT, max_tokens=2)
            return r, c, streamed, streamed_chat, infos, got

    r, c, streamed, streamed_chat, infos, got = asyncio.run(main())
    assert r.choices[0].text == expected == "".join(streamed)
    assert c.choices[0].message.content == expected_chat == "".join(streamed_chat)
    assert NAME in {p.id for p in infos} and got.name == NAME


@pytest.mark.process
def test_prompts_roundtrip_and_peft_load(live, ss, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    srv, _, adapter = live
    info = ss.prompts.get(NAME)
    assert isinstance(info, PromptInfo) and info.num_virtual_tokens == K and info.token_dim == TINY_HIDDEN
    assert info.description == "from the client"
    assert NAME in {p.id for p in ss.prompts.list()}
    assert ss.prompts.versions(NAME).data[0].version == info.version

    # A second version from a bare safetensors file; the first stays pullable by version.
    bare = tmp_path / "v2.safetensors"
    from safetensors.torch import save_file

    save_file({"prompt_embeddings": prompt_tensor(4, K, TINY_HIDDEN)}, str(bare))
    name2 = "client-roundtrip"
    v1 = ss.prompts.push(adapter, name2)
    v2 = ss.prompts.push(bare, name2)
    assert v1.version != v2.version and ss.prompts.get(name2).version == v2.version

    out = ss.prompts.pull(name2, tmp_path / "pulled", version=v1.version)
    base = LlamaForCausalLM.from_pretrained(srv.model, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out))
    learned = peft_model.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(learned, prompt_tensor(3, K, TINY_HIDDEN))

    deleted = ss.prompts.delete(name2)
    assert isinstance(deleted, PromptDeleted) and deleted.deleted
    with pytest.raises(C.NotFoundError):
        ss.prompts.get(name2)


@pytest.mark.process
def test_typed_errors(live, ss):
    srv, _, _ = live
    with pytest.raises(C.NotFoundError) as e:
        ss.complete("no-such-prompt", TEXT, max_tokens=2)
    assert e.value.status_code == 404 and e.value.message and e.value.request_id
    with pytest.raises(C.NotFoundError):
        ss.prompts.pull("no-such-prompt", "unused-dir")
    with pytest.raises(C.BadRequestError) as e:
        ss.complete(NAME, TEXT, max_tokens=2, temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature" and e.value.code == "invalid_parameter"
    with pytest.raises(C.BadRequestError) as e:
        ss.complete(NAME, "", max_tokens=2)
    with pytest.raises(C.BadRequestError):
        "".join(ss.stream_complete(NAME, TEXT, max_tokens=2, top_p=0))  # errors surface on iteration
    for key in (None, "sk-ss-wrong"):
        with C.Client(srv.url, api_key=key or "") as anon, pytest.raises(C.AuthenticationError) as e:
            anon.models()
        assert e.value.status_code == 401 and e.value.type == "authentication_error"


@pytest.mark.process
def test_tuning_if_available(ss):
    paths = httpx.get(ss.base_url + "/openapi.json").json()["paths"]
    if "/v1/tuning/jobs" not in paths:
        pytest.skip("server has no /v1/tuning/jobs yet")
    data = [{"prompt": f"Q{i}:", "completion": " yes"} for i in range(4)]
    job = ss.tuning.create(name="client-tuned", training_data=data, num_virtual_tokens=2, steps=2, batch_size=2)
    assert job["id"] and job["status"] in ("validating_files", "queued", "running", "succeeded")
    assert job["id"] in {j["id"] for j in ss.tuning.list(limit=50)}
    done = ss.tuning.wait(job["id"], poll_interval=0.1, timeout=60)
    assert done["status"] == "succeeded", done
    assert ss.complete(done["fine_tuned_model"], "Q9:", max_tokens=2).usage.virtual_tokens == 2
    events = ss.tuning.events(job["id"], order="asc", limit=100)
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == [1, 2]
    assert ss.tuning.events(job["id"], limit=1)[0]["message"].startswith("Job succeeded")  # newest first
    assert ss.tuning.events(job["id"], after=events[1]["id"], order="asc", limit=100) == events[2:]
    ckpts = ss.tuning.checkpoints(job["id"])
    assert [c["step_number"] for c in ckpts] == [2, 1]  # auto: every ceil(2 / 10) = 1 step
    assert ss.complete(ckpts[-1]["fine_tuned_model_checkpoint"], "Q9:", max_tokens=1).usage.virtual_tokens == 2
    with pytest.raises(C.ConflictError):
        ss.tuning.cancel(job["id"])  # already finished
    with pytest.raises(C.NotFoundError):
        ss.tuning.get("ftjob-does-not-exist")
    with pytest.raises(C.BadRequestError):
        ss.tuning.create(name="client-tuned", training_data=[{"prompt": "x"}])


# ---- stub server ------------------------------------------------------------------------------------
COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "extra_field": 1,
              "choices": [{"index": 0, "text": "ok", "finish_reason": "length", "logprobs": None}],
              "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class Stub:
    """Scripted HTTP server: each request pops (status, headers, body, delay) from `script`
    (the last entry repeats) and is recorded as (method, path, headers, body)."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict, bytes | dict, float]] = []
        self.calls: list[tuple[str, str, dict, bytes]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _any(self):
                n = int(self.headers.get("content-length") or 0)
                stub.calls.append((self.command, self.path, dict(self.headers), self.rfile.read(n)))
                status, headers, body, delay = stub.script.pop(0) if len(stub.script) > 1 else stub.script[0]
                if delay:
                    threading.Event().wait(delay)
                data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
                self.send_response(status)
                headers = {"Content-Type": "application/json", **headers}
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:
                    pass

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def _err(status: int, code: str = "x", etype: str = "invalid_request_error") -> dict:
    return {"error": {"message": f"boom {status}", "type": etype, "param": None, "code": code}}


def fast_client(url: str, **kw) -> C.Client:
    return C.Client(url, retry=C.RetryPolicy(max_retries=kw.pop("max_retries", 3), base_delay=0.01, max_delay=0.02), **kw)


def test_retries_429_with_retry_after_then_succeeds(stub):
    stub.script = [(429, {"Retry-After": "0"}, _err(429, "queue_full", "rate_limit_error"), 0)] * 2 + [(200, {}, COMPLETION, 0)]
    with C.Client(stub.url, api_key="k") as c:  # default policy: Retry-After 0 means no wait
        r = c.complete("my-task", "hi", max_tokens=1, request_id="req-42")
    assert r.choices[0].text == "ok"
    assert len(stub.calls) == 3
    for method, path, headers, body in stub.calls:
        assert (method, path) == ("POST", "/v1/completions")
        assert headers["X-Softserve-Prompt"] == "my-task" and headers["X-Request-ID"] == "req-42"
        assert headers["Authorization"] == "Bearer k"
        assert json.loads(body) == {"model": "my-task", "prompt": "hi", "max_tokens": 1}


def test_request_id_defaults_to_uuid4_per_call(stub):
    import uuid

    stub.script = [(200, {}, COMPLETION, 0)]
    with C.Client(stub.url) as c:
        c.complete("m", "a")
        c.complete("m", "b")
    ids = [h["X-Request-ID"] for _, _, h, _ in stub.calls]
    assert ids[0] != ids[1] and all(uuid.UUID(i).version == 4 for i in ids)
    assert "Authorization" not in stub.calls[0][2]


def test_retry_after_is_honoured(stub, monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    stub.script = [(503, {"Retry-After": "7"}, _err(503, "not_ready", "service_unavailable"), 0), (200, {}, COMPLETION, 0)]
    with C.Client(stub.url) as c:
        c.complete("m", "x")
    assert slept == [7.0]
    assert C.RetryPolicy(max_retry_after=5).delay(0, httpx.Response(429, headers={"Retry-After": "100"})) == 5
    date = httpx.Response(429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})  # in the past
    assert C.RetryPolicy().delay(0, date) == 0
    d = [C.RetryPolicy(base_delay=1, max_delay=4).delay(i) for i in range(5)]
    assert 0.5 <= d[0] <= 1 and 1 <= d[1] <= 2 and all(2 <= x <= 4 for x in d[2:])


def test_exhausted_retries_raise_typed_error(stub):
    stub.script = [(503, {"Retry-After": "0"}, _err(503, "not_ready", "service_unavailable"), 0)]
    with fast_client(stub.url, max_retries=2) as c, pytest.raises(C.ServiceUnavailableError) as e:
        c.chat("m", [{"role": "user", "content": "x"}])
    assert len(stub.calls) == 3 and e.value.status_code == 503 and e.value.code == "not_ready"


@pytest.mark.parametrize("status,cls", [(400, C.BadRequestError), (401, C.AuthenticationError), (403, C.PermissionDeniedError),
                                        (404, C.NotFoundError), (413, C.PayloadTooLargeError), (500, C.InternalServerError)])
def test_other_errors_not_retried(stub, status, cls):
    stub.script = [(status, {"Retry-After": "0"}, _err(status, "bad"), 0), (200, {}, COMPLETION, 0)]
    with fast_client(stub.url) as c, pytest.raises(cls) as e:
        c.complete("m", "x")
    assert len(stub.calls) == 1
    assert e.value.status_code == status and e.value.code == "bad" and e.value.message == f"boom {status}"


def test_non_json_error_body(stub):
    stub.script = [(502, {"Content-Type": "text/html"}, b"<html>bad gateway</html>", 0)]
    with fast_client(stub.url) as c, pytest.raises(C.InternalServerError) as e:
        c.models()
    assert e.value.status_code == 502 and "bad gateway" in e.value.message and len(stub.calls) == 1


def test_connection_refused_is_retried_then_raises():
    port = free_port()  # nothing listens there
    attempts = []

    class Counting(httpx.HTTPTransport):
        def handle_request(self, request):
            attempts.append(request)
            return super().handle_request(request)

    with C.Client(f"http://127.0.0.1:{port}", retry=C.RetryPolicy(max_retries=2, base_delay=0.01),
                  http_client=httpx.Client(transport=Counting())) as c, pytest.raises(C.APIConnectionError) as e:
        c.complete("m", "x")
    assert len(attempts) == 3 and e.value.status_code is None


def test_per_call_timeout_override_not_retried(stub):
    stub.script = [(200, {}, COMPLETION, 1.0)]
    with fast_client(stub.url, timeout=30) as c:
        with pytest.raises(C.APITimeoutError):
            c.complete("m", "x", timeout=0.2)
    assert len(stub.calls) == 1


def test_stream_parsing_and_in_stream_error(stub):
    events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
              {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
              {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    stub.script = [(429, {"Retry-After": "0"}, _err(429), 0), (200, {"Content-Type": "text/event-stream"}, sse.encode(), 0)]
    with fast_client(stub.url) as c:
        assert list(c.stream_chat("m", [{"role": "user", "content": "x"}])) == ["Hel", "lo"]
        assert len(stub.calls) == 2 and json.loads(stub.calls[0][3])["stream"] is True
        bad = 'data: {"choices": [{"index": 0, "text": "a"}]}\n\n' + f"data: {json.dumps(_err(503, 'x', 'service_unavailable'))}\n\n"
        stub.script = [(200, {"Content-Type": "text/event-stream"}, bad.encode(), 0)]
        got = []
        with pytest.raises(C.ServiceUnavailableError):
            for d in c.stream_complete("m", "x"):
                got.append(d)
        assert got == ["a"]
        with pytest.raises(ValueError):
            c.complete("m", "x", stream=True)


def test_async_retries(stub):
    stub.script = [(429, {"Retry-After": "0"}, _err(429), 0), (200, {}, COMPLETION, 0)]

    async def main():
        async with C.AsyncClient(stub.url + "/v1") as ac:
            r = await ac.complete("m", "x")
            stub.script = [(400, {}, _err(400), 0), (200, {}, COMPLETION, 0)]
            with pytest.raises(C.BadRequestError):
                await ac.complete("m", "x")
            return r

    assert asyncio.run(main()).choices[0].text == "ok"
    assert len(stub.calls) == 3


def test_tuning_methods_against_stub(stub):
    job = {"id": "ftjob-1", "object": "tuning.job", "status": "running", "new_field": [1]}
    stub.script = [(200, {}, job, 0), (200, {}, job, 0), (200, {}, {**job, "status": "succeeded"}, 0),
                   (200, {}, {"object": "list", "data": [job]}, 0), (200, {}, {**job, "status": "cancelled"}, 0),
                   (200, {}, {"object": "list", "data": [{"id": "e1"}], "has_more": False}, 0),
                   (200, {}, {"object": "list", "data": [{"id": "c1"}], "has_more": False}, 0)]
    with fast_client(stub.url) as c:
        assert c.tuning.create(model="base", training_file="f.jsonl", request_id="r1")["id"] == "ftjob-1"
        assert c.tuning.wait("ftjob-1", poll_interval=0.01)["status"] == "succeeded"
        assert c.tuning.list()[0]["new_field"] == [1]
        assert c.tuning.cancel("ftjob-1")["status"] == "cancelled"
        assert c.tuning.events("ftjob-1", after="e0", limit=5, order="asc") == [{"id": "e1"}]
        assert c.tuning.checkpoints("ftjob-1") == [{"id": "c1"}]
    calls = [(m, p) for m, p, _, _ in stub.calls]
    assert calls == [("POST", "/v1/tuning/jobs"), ("GET", "/v1/tuning/jobs/ftjob-1"), ("GET", "/v1/tuning/jobs/ftjob-1"),
                     ("GET", "/v1/tuning/jobs"), ("POST", "/v1/tuning/jobs/ftjob-1/cancel"),
                     ("GET", "/v1/tuning/jobs/ftjob-1/events?after=e0&limit=5&order=asc"),
                     ("GET", "/v1/tuning/jobs/ftjob-1/checkpoints")]
    assert json.loads(stub.calls[0][3]) == {"model": "base", "training_file": "f.jsonl"}
    assert stub.calls[0][2]["X-Request-ID"] == "r1"


def test_tuning_list_follows_every_page(stub):
    page1 = {"object": "list", "data": [{"id": "ftjob-3"}, {"id": "ftjob-2"}], "has_more": True}
    page2 = {"object": "list", "data": [{"id": "ftjob-1"}], "has_more": False}
    stub.script = [(200, {}, page1, 0), (200, {}, page2, 0)]
    with fast_client(stub.url) as c:
        assert [j["id"] for j in c.tuning.list(limit=2)] == ["ftjob-3", "ftjob-2", "ftjob-1"]
    assert [p for _, p, _, _ in stub.calls] == ["/v1/tuning/jobs?limit=2", "/v1/tuning/jobs?after=ftjob-2&limit=2"]


def test_both_streams_stop_at_done(stub):
    """Whatever follows `data: [DONE]` is never read, by the sync and the async stream alike."""
    sse = ('data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: [DONE]\n\n'
           'data: {"choices": [{"index": 0, "text": "after"}]}\n\ndata: not json\n\n')
    stub.script = [(200, {"Content-Type": "text/event-stream"}, sse.encode(), 0)]
    with fast_client(stub.url) as c:
        sync = list(c.stream_complete("m", "x"))

    async def main():
        async with C.AsyncClient(stub.url) as ac:
            return [d async for d in ac.stream_complete("m", "x")]

    assert sync == asyncio.run(main()) == ["a"]


def public_methods() -> set[str]:
    def names(cls, prefix=""):
        return {prefix + n for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}

    return (names(C.Client) - {"close"}) | names(C.Prompts, "prompts.") | names(C.Tuning, "tuning.")


@pytest.mark.process
def test_every_method_sync_and_async_loads_no_torch_or_fastapi():
    """A fresh interpreter imports the client, runs every public method of both clients against a mocked
    server, and has still not imported torch, fastapi or the API's route modules; sync == async results."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "support" / "client_every_method.py"
    out = subprocess.run([sys.executable, str(script)], check=True, capture_output=True, text=True, timeout=120)
    report = json.loads(out.stdout)
    assert set(report["methods"]) == public_methods()
    assert report["same_sync_async"] == report["methods"]
    assert report["heavy"] == []
