"""Prompt HTTP API: upload/list/get/versions/download/delete, tenant isolation, public namespace."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from softserve.store.backends import LocalBackend
from softserve.store.cache import PromptCache
from softserve.store.store import PromptStore
from softserve.api import deps
from softserve.api.errors import install_error_handlers
from softserve.api.prompts import router as prompts_router
from softserve.service.auth import ApiKeyRegistry, add_key
from tests.support.prompts import CFG, H, MODEL, blob, tensor


class Env:
    def __init__(self, tmp_path) -> None:
        keyfile = tmp_path / "keys.yaml"
        self.keys = {
            "a": add_key(keyfile, "acme"),
            "a_admin": add_key(keyfile, "acme", role="admin"),
            "b": add_key(keyfile, "beta"),
        }
        registry = ApiKeyRegistry.load(keyfile)
        self.store = PromptStore(LocalBackend(tmp_path / "data"), MODEL, max_upload_bytes=64 * 1024)
        self.cache = PromptCache(self.store, device="cpu", dtype=torch.float32, budget_bytes=1 << 20)
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(prompts_router)  # on a store and cache of its own, without a model or engine
        app.dependency_overrides[deps.get_store] = lambda: self.store
        app.dependency_overrides[deps.get_cache] = lambda: self.cache
        app.dependency_overrides[deps.get_registry] = lambda: registry
        self.client = TestClient(app)

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def upload(self, who: str, name: str, model: bytes, config: bytes | None = CFG, description: str | None = None):
        files = {"adapter_model": ("adapter_model.safetensors", model, "application/octet-stream")}
        if config is not None:
            files["adapter_config"] = ("adapter_config.json", config, "application/json")
        data = {"description": description} if description else None
        return self.client.put(f"/v1/prompts/{name}", files=files, data=data, headers=self.h(who))


@pytest.fixture
def env(tmp_path) -> Env:
    return Env(tmp_path)


def test_requires_auth(env):
    r = env.client.get("/v1/prompts")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert env.client.get("/v1/prompts", headers={"Authorization": "Bearer sk-ss-wrong"}).status_code == 401


def test_upload_get_versions_download_delete(env):
    r = env.upload("a", "greeter", blob(1), description="says hi")
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert v1["name"] == "greeter" and v1["id"] == "greeter" and not v1["public"]
    assert (v1["num_virtual_tokens"], v1["token_dim"], v1["dtype"], v1["peft_type"]) == (4, H, "float32", "PROMPT_TUNING")
    assert len(v1["version"]) == 12 and v1["version"] != v1["sha256"][:12] and v1["warnings"] == [] and v1["description"] == "says hi"

    again = env.upload("a", "greeter", blob(1)).json()
    assert again["version"] == v1["version"]
    v2 = env.upload("a", "greeter", blob(2), config=None).json()
    assert v2["version"] != v1["version"]

    assert env.client.get("/v1/prompts/greeter", headers=env.h("a")).json()["version"] == v2["version"]
    pinned = env.client.get(f"/v1/prompts/greeter@{v1['version']}", headers=env.h("a")).json()
    assert pinned["version"] == v1["version"] and pinned["ref"] == f"greeter@{v1['version']}"
    vs = env.client.get("/v1/prompts/greeter/versions", headers=env.h("a")).json()
    assert [v["version"] for v in vs["data"]] == [v2["version"], v1["version"]]
    listing = env.client.get("/v1/prompts", headers=env.h("a")).json()
    assert [(p["name"], p["version"]) for p in listing["data"]] == [("greeter", v2["version"])]

    for url in (f"/v1/prompts/greeter/download?version={v1['version']}", f"/v1/prompts/greeter@{v1['version']}/download"):
        r = env.client.get(url, headers=env.h("a"))
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
            cfg = json.loads(zf.read("adapter_config.json"))
            t = st_load(zf.read("adapter_model.safetensors"))["prompt_embeddings"]
        assert torch.equal(t, tensor(1)) and cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 4

    # Warm the cache, then delete: cached entries are dropped, everything 404s.
    env.cache.release(env.cache.acquire(env.store.resolve("acme", "greeter")))
    r = env.client.delete("/v1/prompts/greeter", headers=env.h("a"))
    assert r.status_code == 200 and r.json() == {"object": "prompt.deleted", "id": "greeter", "deleted": True}
    assert env.cache.stats().entries == 0
    for url in ("/v1/prompts/greeter", f"/v1/prompts/greeter@{v1['version']}", "/v1/prompts/greeter/versions", "/v1/prompts/greeter/download"):
        r = env.client.get(url, headers=env.h("a"))
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert env.client.delete("/v1/prompts/greeter", headers=env.h("a")).status_code == 404
    assert env.client.get("/v1/prompts", headers=env.h("a")).json()["data"] == []


def test_tenant_isolation(env):
    assert env.upload("a", "secret", blob(1)).status_code == 201
    v = env.store.resolve("acme", "secret").version
    for url in ("/v1/prompts/secret", f"/v1/prompts/secret@{v}", "/v1/prompts/secret/versions", "/v1/prompts/secret/download",
                "/v1/prompts/acme/secret", "/v1/prompts/acme/secret/download"):
        r = env.client.get(url, headers=env.h("b"))
        assert r.status_code == 404, url
    assert env.client.delete("/v1/prompts/secret", headers=env.h("b")).status_code == 404
    assert env.client.delete("/v1/prompts/acme/secret", headers=env.h("b")).status_code == 404
    assert env.upload("b", "acme/secret", blob(2)).status_code == 404
    assert env.client.get("/v1/prompts", headers=env.h("b")).json()["data"] == []
    # B's own prompt of the same name is independent.
    assert env.upload("b", "secret", blob(3)).status_code == 201
    assert env.client.get("/v1/prompts/secret", headers=env.h("a")).json()["version"] == v
    assert env.store.resolve("acme", "secret").version == v


def test_public_namespace(env):
    r = env.upload("a", "public/shared", blob(1))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    r = env.upload("a_admin", "public/shared", blob(1))
    assert r.status_code == 201 and r.json()["id"] == "public/shared" and r.json()["public"]
    for who in ("a", "b"):
        got = env.client.get("/v1/prompts/public/shared", headers=env.h(who))
        assert got.status_code == 200 and got.json()["id"] == "public/shared"
        listing = env.client.get("/v1/prompts", headers=env.h(who)).json()["data"]
        assert [(p["id"], p["public"]) for p in listing] == [("public/shared", True)]
        assert env.client.get("/v1/prompts/public/shared/download", headers=env.h(who)).status_code == 200
        assert env.client.get("/v1/prompts/public/shared/versions", headers=env.h(who)).status_code == 200
    assert env.client.delete("/v1/prompts/public/shared", headers=env.h("b")).status_code == 403
    assert env.client.delete("/v1/prompts/public/nope", headers=env.h("b")).status_code == 404
    assert env.client.delete("/v1/prompts/public/shared", headers=env.h("a_admin")).status_code == 200
    assert env.client.get("/v1/prompts/public/shared", headers=env.h("b")).status_code == 404


def test_upload_validation_errors(env):
    cases = [
        (env.upload("a", "x", st_save({"prompt_embeddings": torch.randn(4, 32)})), 422, "hidden_size"),
        (env.upload("a", "x", b"garbage" * 10), 400, "safetensors"),
        (env.upload("a", "x", blob(1), config=b'{"peft_type": "LORA"}'), 422, "unsupported peft_type"),
        (env.upload("a", "x", blob(1), config=b'{"peft_type": "PREFIX_TUNING"}'), 422, "prefix tensor has"),
        (env.upload("a", "bad name!", blob(1)), 400, "invalid"),
        (env.upload("a", "x@abc", blob(1)), 400, "versions are assigned"),
        (env.upload("a", "x", b"\0" * (70 * 1024), config=None), 413, "limit"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, r.text
        body = r.json()["error"]
        assert text in body["message"] and set(body) == {"message", "type", "param", "code"}
    r = env.client.put("/v1/prompts/x", content=blob(1), headers={**env.h("a"), "Content-Type": "application/octet-stream"})
    assert r.status_code == 415
    r = env.client.put("/v1/prompts/x", files={"adapter_config": ("c.json", CFG)}, headers=env.h("a"))
    assert r.status_code == 400 and "adapter_model" in r.json()["error"]["message"]
    # Oversized body is refused even when the client sends no (or a lying) Content-Length.
    big = b"\0" * (3 * 1024 * 1024)

    def chunks():
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = env.client.put(
        "/v1/prompts/x", content=chunks(), headers={**env.h("a"), "Content-Type": "multipart/form-data; boundary=zzz"}
    )
    assert r.status_code == 413
    assert env.client.get("/v1/prompts", headers=env.h("a")).json()["data"] == []


def test_base_model_warning_returned(env):
    cfg = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": "other/Model"}).encode()
    r = env.upload("a", "w", blob(1), config=cfg)
    assert r.status_code == 201 and len(r.json()["warnings"]) == 1
