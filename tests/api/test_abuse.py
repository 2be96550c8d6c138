"""Abuse resistance in process (tiny model): bounded work per request, hostile inputs answered 4xx."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from softserve.service.runtime import LoadedModel
from softserve.app import create_app
from softserve.config import Settings


def _app(tiny_model, tokenizer, tmp_path, **overrides):
    settings = Settings(**{"store": str(tmp_path / "store"), "max_model_len": 256, **overrides})
    return create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))


@pytest.fixture()
def client(tiny_model, tokenizer, tmp_path):
    with TestClient(_app(tiny_model, tokenizer, tmp_path, max_request_tokens=10_000)) as c:
        blob = save({"prompt_embeddings": torch.randn(4, tiny_model.config.hidden_size)})
        assert c.put("/v1/prompts/p1", files={"adapter_model": ("a.safetensors", blob)}).status_code == 201
        yield c


def _error(r, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- 1. bounded work per request -------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, n, code, names", [
    ([[1]] * 1_000_000, 1, "invalid_parameter", "at most 2048"),  # schema cap, before item-wise validation
    ([1] * 200_000, 1, "invalid_parameter", "at most 131072"),
    ([[1, 2]] * 100, 2, "too_many_choices", "--max-choices-per-request"),  # 200 sequences > 128
    (["a"] * 129, 1, "too_many_choices", "--max-choices-per-request"),
    ("hello", 17, "invalid_parameter", "--max-n"),
    ([[5] * 200] * 100, 1, "request_too_large", "--max-request-tokens"),  # 20,000 prompt tokens > 10,000
    ([[5] * 200] * 10, 8, "request_too_large", "--max-request-tokens"),  # 2,000 x n=8 = 16,000
])
def test_request_size_limits_name_the_limit(client, prompt, n, code, names):
    r = client.post("/v1/completions", json={"model": "p1", "prompt": prompt, "n": n, "max_tokens": 1})
    assert names in _error(r, 400, code)["message"]
    assert client.get("/health").status_code == 200


def test_fan_out_is_checked_before_the_prompt_is_resolved_or_tokenized(client, monkeypatch):
    import softserve.api.openai_routes as routes

    def boom(*_a, **_k):
        raise AssertionError("work done for a request that is refused")

    monkeypatch.setattr(routes, "resolve_model", boom)
    monkeypatch.setattr(routes, "_tokenize_prompts", boom)
    r = client.post("/v1/completions", json={"model": "p1", "prompt": ["a"] * 2000, "n": 16})
    _error(r, 400, "too_many_choices")
    r = client.post("/v1/chat/completions", json={"model": "p1", "messages": [{"role": "user", "content": "x"}], "n": 17})
    _error(r, 400)


def test_requests_within_the_limits_still_work(client):
    r = client.post("/v1/completions", json={"model": "p1", "prompt": ["a", "b"], "n": 3, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 6


# ---- 2. the key is checked before any body byte; uploads are capped ---------------------------------------
class RawCall:
    """Drives the ASGI app directly, to see exactly how much of a body the server reads."""

    def __init__(self, app, method: str, path: str, headers: dict[str, str], chunks, *, hang: bool = False,
                 disconnect: bool = False) -> None:
        self.app, self.method, self.path = app, method, path
        self.headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self.chunks, self.hang, self.disconnect = list(chunks), hang, disconnect
        self.received = 0
        self.status: int | None = None
        self.body = b""

    async def receive(self):
        import asyncio

        if self.received < len(self.chunks):
            self.received += 1
            return {"type": "http.request", "body": self.chunks[self.received - 1],
                    "more_body": self.received < len(self.chunks) or self.hang or self.disconnect}
        if self.disconnect:
            return {"type": "http.disconnect"}
        await asyncio.Event().wait()  # a client that never finishes sending

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")

    async def run(self):
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": self.method,
                 "path": self.path, "raw_path": self.path.encode(), "query_string": b"", "root_path": "",
                 "headers": self.headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http"}
        await self.app(scope, self.receive, self.send)
        return self


@pytest.fixture()
def keyed_app(tiny_model, tokenizer, tmp_path):
    from softserve.service.auth import add_key

    keyfile = tmp_path / "keys.yaml"
    keys = {"a": add_key(keyfile, "acme"), "a2": add_key(keyfile, "acme"), "b": add_key(keyfile, "beta")}
    app = _app(tiny_model, tokenizer, tmp_path, api_keys=str(keyfile), max_concurrent_uploads=3,
               max_concurrent_uploads_per_tenant=2)
    return app, keys


MB = b"x" * (1024 * 1024)


@pytest.mark.parametrize("method, path, ctype", [
    ("PUT", "/v1/prompts/p", "multipart/form-data; boundary=zzz"),
    ("POST", "/v1/files", "multipart/form-data; boundary=zzz"),
    ("POST", "/v1/completions", "application/json"),
    ("POST", "/v1/tuning/jobs", "application/json"),
])
@pytest.mark.parametrize("key", [None, "sk-ss-wrong"])
def test_no_key_is_401_before_any_body_byte_is_read(keyed_app, method, path, ctype, key):
    import asyncio

    app, _ = keyed_app
    headers = {"content-type": ctype, **({"authorization": f"Bearer {key}"} if key else {})}
    for chunked in (True, False):  # chunked: the middleware used to buffer all of it before the 401
        hdrs = headers if chunked else {**headers, "content-length": str(64 * len(MB))}
        call = asyncio.run(RawCall(app, method, path, hdrs, [MB] * 64).run())
        assert call.status == 401, call.body
        assert call.received == 0, f"read {call.received} MB of an unauthenticated body"
        assert b"invalid_api_key" in call.body


def test_malformed_json_without_a_key_is_401_not_400(keyed_app):
    app, keys = keyed_app
    with TestClient(app) as c:
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert _error(r, 401, "invalid_api_key") and r.headers["www-authenticate"] == "Bearer"
        r = c.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json",
                                                                    "authorization": f"Bearer {keys['a']}"})
        _error(r, 400, "invalid_json")
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200


def test_concurrent_uploads_are_capped_per_tenant_and_in_total(keyed_app):
    import asyncio

    app, keys = keyed_app

    def upload(who: str, hang: bool = True) -> RawCall:
        return RawCall(app, "PUT", "/v1/prompts/p", {"authorization": f"Bearer {keys[who]}",
                                                     "content-type": "multipart/form-data; boundary=zzz"},
                       [b"--zzz\r\n"], hang=hang)

    async def scenario():
        slow = [upload("a"), upload("a2")]  # two keys of one tenant: the tenant's two slots
        tasks = [asyncio.ensure_future(c.run()) for c in slow]
        await asyncio.sleep(0.05)
        assert all(c.received == 1 and c.status is None for c in slow)  # in progress, holding slots
        third = await asyncio.wait_for(upload("a").run(), 5)  # answered from the headers, never waits for a body
        assert third.status == 429 and third.received == 0 and b"too_many_uploads" in third.body
        other = upload("b")  # another tenant still gets the last of the 3 total slots...
        tasks.append(asyncio.ensure_future(other.run()))
        await asyncio.sleep(0.05)
        assert other.status is None and other.received == 1
        fourth = await asyncio.wait_for(upload("b").run(), 5)  # ...and then the total cap answers
        assert fourth.status == 429 and b"--max-concurrent-uploads" in fourth.body
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert app.state.admission.uploads.in_use == 0  # slots come back when the upload ends, however

    asyncio.run(scenario())


# ---- 3. /metrics: admin only on the API port, tenant names only when asked for --------------------------
def test_metrics_need_an_admin_key_and_name_no_tenant_by_default(tiny_model, tokenizer, tmp_path):
    from softserve.service.auth import add_key

    keyfile = tmp_path / "keys.yaml"
    user, admin = add_key(keyfile, "acme-secret-customer"), add_key(keyfile, "ops", role="admin")
    with TestClient(_app(tiny_model, tokenizer, tmp_path, api_keys=str(keyfile))) as c:
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {user}"})
        assert r.status_code == 200, r.text
        _error(c.get("/metrics"), 401, "invalid_api_key")
        _error(c.get("/metrics", headers={"Authorization": f"Bearer {user}"}), 403, "forbidden")
        r = c.get("/metrics", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 200
        assert 'softserve_requests_total{endpoint="/v1/completions",status="200"} 1.0' in r.text
        assert "softserve_generation_tokens_total 2.0" in r.text
        assert "acme-secret-customer" not in r.text and "tenant=" not in r.text


def test_metrics_tenant_labels_are_opt_in(tiny_model, tokenizer, tmp_path):
    with TestClient(_app(tiny_model, tokenizer, tmp_path, metrics_tenant_labels=True)) as c:
        c.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        text = c.get("/metrics").text  # no --api-keys: everything is open, /metrics too
        assert 'softserve_requests_total{endpoint="/v1/completions",status="200",tenant="default"} 1.0' in text


def test_metrics_port_serves_prometheus_without_a_key_on_loopback(tiny_model, tokenizer, tmp_path):
    import httpx

    from softserve.service.auth import add_key
    from tests.support.live_server import free_port

    keyfile = tmp_path / "keys.yaml"
    add_key(keyfile, "ops", role="admin")
    port = free_port()
    with TestClient(_app(tiny_model, tokenizer, tmp_path, api_keys=str(keyfile), metrics_port=port)) as c:
        assert c.get("/metrics").status_code == 401
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 200 and "softserve_ready 1.0" in r.text
    with pytest.raises(httpx.TransportError):  # stopped with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_every_limit_has_a_serve_flag():
    import argparse

    from softserve.config import add_settings_flags

    parser = argparse.ArgumentParser()
    add_settings_flags(parser)
    assert set(Settings.model_fields) <= {action.dest for action in parser._actions}


# ---- 4. a cut multipart body is refused; the version covers the tensor and the config -------------------
def _multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    out = bytearray()
    for field, data in parts:
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{field}"\r\n'.encode()
        out += b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"content-type": f"multipart/form-data; boundary={boundary}"}


P_TUNING = b'{"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "encoder_hidden_size": 32}'


@pytest.mark.parametrize("cut", [len(b"--\r\n"), len(b"-\r\n"), 40])
def test_multipart_body_without_its_closing_boundary_is_refused(client, tiny_model, cut):
    blob = save({"prompt_embeddings": torch.randn(4, tiny_model.config.hidden_size)})
    body, headers = _multipart([("adapter_model", blob), ("adapter_config", P_TUNING)])
    r = client.put("/v1/prompts/cut", content=body[:-cut], headers=headers)  # Content-Length matches what is sent
    assert "closing boundary" in _error(r, 400, "invalid_multipart")["message"]
    _error(client.get("/v1/prompts/cut"), 404)  # nothing stored
    r = client.post("/v1/files", content=_multipart([("file", b'{"prompt": "a", "completion": "b"}\n')])[0][:-4],
                    headers={"content-type": "multipart/form-data; boundary=b0undary"})
    _error(r, 400, "invalid_multipart")
    assert client.put("/v1/prompts/cut", content=body, headers=headers).status_code == 201  # the whole body is fine


def test_same_tensor_with_another_config_is_a_new_version(client, tiny_model):
    import io
    import json
    import zipfile

    blob = save({"prompt_embeddings": torch.randn(4, tiny_model.config.hidden_size)})
    first = client.put("/v1/prompts/pt", files={"adapter_model": ("a", blob)}).json()
    assert first["peft_type"] == "PROMPT_TUNING"
    second = client.put("/v1/prompts/pt", files={"adapter_model": ("a", blob), "adapter_config": ("c", P_TUNING)}).json()
    assert second["peft_type"] == "P_TUNING" and second["version"] != first["version"]
    assert second["sha256"] == first["sha256"]  # one tensor, stored once
    zf = zipfile.ZipFile(io.BytesIO(client.get("/v1/prompts/pt/download").content))
    cfg = json.loads(zf.read("adapter_config.json"))
    assert cfg["peft_type"] == "P_TUNING" and cfg["encoder_hidden_size"] == 32
    again = client.put("/v1/prompts/pt", files={"adapter_model": ("a", blob), "adapter_config": ("c", P_TUNING)}).json()
    assert again["version"] == second["version"] and again["created_at"] == second["created_at"]  # same bytes, same version
    back = client.put("/v1/prompts/pt", files={"adapter_model": ("a", blob)}).json()
    assert back["version"] == first["version"]  # rolling back still works
    assert client.get(f"/v1/prompts/pt@{first['version']}").json()["peft_type"] == "PROMPT_TUNING"


def test_versions_stored_before_config_aware_ids_still_resolve_and_are_reused(tmp_path, monkeypatch):
    import softserve.store.format as fmt
    from softserve.store.backends import LocalBackend
    from softserve.store.store import PromptStore
    from softserve.store.types import ModelInfo

    store = PromptStore(LocalBackend(tmp_path / "data"), ModelInfo("tiny", 64, 2, 4))
    blob = save({"prompt_embeddings": torch.randn(4, 64)})
    with monkeypatch.context() as m:
        m.setattr(fmt, "version_id", lambda sha, _cfg: sha)  # the old scheme: id = sha256[:12]
        legacy, _ = store.put("acme", "p", blob, None)
    assert legacy.version == legacy.sha256[:12]
    assert store.resolve("acme", "p", legacy.version) == legacy
    again, _ = store.put("acme", "p", blob, None)  # same tensor, same config: the stored version, not a twin
    assert again.version == legacy.version and [v.version for v in store.versions("acme", "p")] == [legacy.version]
    changed, _ = store.put("acme", "p", blob, P_TUNING)
    assert changed.version != legacy.version and changed.peft_type == "P_TUNING"
    assert store.resolve("acme", "p", legacy.version).peft_type == "PROMPT_TUNING"
    assert store.load_tensor(changed).equal(store.load_tensor(legacy))


# ---- 6. hostile input is a 4xx, never a 500 ----------------------------------------------------------------
def _st_with_header(header: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(header)) + header


DEEP = b"[" * 100_000 + b"]" * 100_000
BIG_INT = b"1" * 4300 + b"1"


@pytest.mark.parametrize("model, config", [
    (_st_with_header(b'{"a": ' + DEEP + b"}"), None),  # nested header
    (_st_with_header(b'{"__metadata__": ' + DEEP + b"}"), None),
    (None, b'{"peft_type": "PROMPT_TUNING", "x": ' + DEEP + b"}"),  # nested adapter_config
    (None, b'{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": ' + BIG_INT + b"}"),
])
def test_hostile_adapter_files_are_4xx(client, tiny_model, model, config):
    good = save({"prompt_embeddings": torch.randn(4, tiny_model.config.hidden_size)})
    files = {"adapter_model": ("a", model if model is not None else good)}
    if config is not None:
        files["adapter_config"] = ("c", config)
    r = client.put("/v1/prompts/hostile", files=files)
    assert 400 <= r.status_code < 500, r.text
    _error(r, r.status_code)


@pytest.mark.parametrize("line", [
    DEEP,  # nested 100,000 deep
    b'{"prompt": "a", "completion": "b", "n": ' + BIG_INT + b"}",  # a 4,301-digit integer
    b'{"prompt": "\\ud800", "completion": "b"}',  # a lone surrogate
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}',
])
def test_hostile_jsonl_lines_are_400_with_the_line_number(client, line):
    data = b'{"prompt": "ok", "completion": " fine"}\n' + line + b"\n"
    r = client.post("/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "tune"})
    assert "line 2" in _error(r, 400, "invalid_training_data")["message"]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "p1", "prompt": "\ud800 hi"}),
    ("/v1/completions", {"model": "p1", "prompt": ["ok", "\udc00"]}),
    ("/v1/chat/completions", {"model": "p1", "messages": [{"role": "user", "content": "a\ud800b"}]}),
    ("/v1/chat/completions", {"model": "p1", "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}),
    ("/v1/completions", {"model": "p1", "prompt": "x", "stop": ["\ud800"]}),
    ("/v1/tuning/jobs", {"name": "t", "training_data": [{"prompt": "\ud800", "completion": "b"}]}),
    ("/v1/tuning/jobs", {"name": "t", "training_data": [{"prompt": "a", "completion": "b"}], "init_text": "\ud800"}),
])
def test_lone_surrogates_are_400(client, path, body):
    import json

    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a valid JSON escape
    r = client.post(path, content=raw, headers={"content-type": "application/json"})
    _error(r, 400)
    assert client.get("/health").status_code == 200


def test_huge_integer_in_a_json_body_is_400(client):
    r = client.post("/v1/completions", content=b'{"model": "p1", "prompt": "x", "seed": ' + BIG_INT + b"}",
                    headers={"content-type": "application/json"})
    _error(r, 400)


# ---- 7. JSONL splits on "\n" only ---------------------------------------------------------------------------
@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\r"])
def test_jsonl_strings_may_hold_unicode_line_separators(separator):
    import json

    from softserve.tuning.data import parse_jsonl

    lines = [json.dumps({"prompt": f"a{separator}b", "completion": f" c{separator}d"}, ensure_ascii=False),
             json.dumps({"prompt": "x", "completion": " y"}), ""]
    examples = parse_jsonl("\r\n".join(lines) if separator != "\r" else "\n".join(lines))
    assert [(e.line, e.prompt) for e in examples] == [(1, f"a{separator}b"), (2, "x")]


# ---- 8. a client that goes away mid-upload is a client abort, not a server error ---------------------------
@pytest.mark.parametrize("path, chunked", [("/v1/prompts/p", False), ("/v1/prompts/p", True), ("/v1/files", False)])
def test_disconnect_mid_upload_counts_as_client_abort(client, caplog, path, chunked):
    import asyncio

    caplog.set_level("INFO", logger="softserve.api")
    method = "PUT" if path.startswith("/v1/prompts") else "POST"
    headers = {"content-type": "multipart/form-data; boundary=zzz", **({} if chunked else {"content-length": "100000"})}
    asyncio.run(RawCall(client.app, method, path, headers, [b"--zzz\r\n" + b"x" * 1000], disconnect=True).run())
    text = client.get("/metrics").text
    assert 'status="499"} 1.0' in text, [l for l in text.splitlines() if l.startswith("softserve_requests_total")]
    assert 'status="500"' not in text
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


# ---- 9. P_TUNING settings are validated -------------------------------------------------------------------
@pytest.mark.parametrize("settings", [
    {"encoder_hidden_size": "big"}, {"encoder_hidden_size": 0}, {"encoder_hidden_size": 10**9},
    {"encoder_hidden_size": 3.5}, {"encoder_num_layers": -1}, {"encoder_num_layers": True},
    {"encoder_dropout": 1.5}, {"encoder_dropout": "0.1"}, {"encoder_dropout": -0.1},
    {"encoder_reparameterization_type": "GRU"}, {"encoder_reparameterization_type": 3},
])
def test_bad_p_tuning_settings_are_422(client, tiny_model, settings):
    import json

    blob = save({"prompt_embeddings": torch.randn(4, tiny_model.config.hidden_size)})
    cfg = json.dumps({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", **settings}).encode()
    r = client.put("/v1/prompts/pt", files={"adapter_model": ("a", blob), "adapter_config": ("c", cfg)})
    assert next(iter(settings)) in _error(r, 422)["message"]


def test_valid_p_tuning_settings_download_as_a_config_peft_builds(client, tiny_model, tmp_path):
    import io
    import json
    import zipfile

    from peft import PeftConfig
    from peft.tuners.p_tuning import PromptEncoder

    blob = save({"prompt_embeddings": torch.randn(4, tiny_model.config.hidden_size)})
    cfg = json.dumps({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "encoder_hidden_size": 16,
                      "encoder_num_layers": 1, "encoder_dropout": 0, "encoder_reparameterization_type": "LSTM"}).encode()
    assert client.put("/v1/prompts/pt", files={"adapter_model": ("a", blob), "adapter_config": ("c", cfg)}).status_code == 201
    zipfile.ZipFile(io.BytesIO(client.get("/v1/prompts/pt/download").content)).extractall(tmp_path / "pt")
    stored = json.loads((tmp_path / "pt" / "adapter_config.json").read_text())
    assert (stored["encoder_hidden_size"], stored["encoder_num_layers"], stored["encoder_dropout"],
            stored["encoder_reparameterization_type"]) == (16, 1, 0.0, "LSTM")
    config = PeftConfig.from_pretrained(str(tmp_path / "pt"))
    config.inference_mode = False  # build the full encoder, as PEFT does to train from these settings
    encoder = PromptEncoder(config)
    assert encoder.lstm_head.hidden_size == 16


# ---- 11. no server paths in stored or downloaded adapter configs -------------------------------------------
def _download_config(client, ref: str) -> dict:
    import io
    import json
    import zipfile

    r = client.get(f"/v1/prompts/{ref}/download")
    assert r.status_code == 200, r.text
    return json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read("adapter_config.json"))


def test_tuned_adapter_config_names_the_public_model_not_the_install_path(client, tokenizer):
    import time

    assert tokenizer.name_or_path.startswith("/")  # the server's install path: must not leak
    body = {"name": "tuned", "training_data": [{"prompt": "a", "completion": " b"}] * 4, "steps": 1, "batch_size": 2,
            "init": "text", "init_text": "Say b", "num_virtual_tokens": 2}
    job = client.post("/v1/tuning/jobs", json=body).json()
    deadline = time.monotonic() + 120
    while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.2)
        job = client.get(f"/v1/tuning/jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    cfg = _download_config(client, job["fine_tuned_model"])
    assert cfg["prompt_tuning_init"] == "TEXT"
    assert cfg["tokenizer_name_or_path"] == cfg["base_model_name_or_path"] == "tiny"
    assert tokenizer.name_or_path not in str(cfg)


@pytest.mark.parametrize("path", ["/srv/models/llama", "./models/llama", "~/llama", "C:\\models\\llama", "..\\llama"])
def test_uploaded_local_paths_are_replaced_by_the_public_model_name(client, tiny_model, path):
    import json

    blob = save({"prompt_embeddings": torch.randn(4, tiny_model.config.hidden_size)})
    cfg = json.dumps({"peft_type": "PROMPT_TUNING", "base_model_name_or_path": path, "prompt_tuning_init": "TEXT",
                      "prompt_tuning_init_text": "hi", "tokenizer_name_or_path": path}).encode()
    r = client.put("/v1/prompts/up", files={"adapter_model": ("a", blob), "adapter_config": ("c", cfg)})
    assert r.status_code == 201, r.text
    out = _download_config(client, "up")
    assert out["base_model_name_or_path"] == out["tokenizer_name_or_path"] == "tiny"
    hub = json.dumps({"peft_type": "PROMPT_TUNING", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"}).encode()
    client.put("/v1/prompts/hub", files={"adapter_model": ("a", blob), "adapter_config": ("c", hub)})
    assert _download_config(client, "hub")["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"  # hub ids stay
