"""The web console's server side, in process (no browser): static files, --no-ui, and the /ui/api
helpers (session, stats scoped to the key's tenant, roll-back). Browser flows: test_console_browser.py."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Histogram
from safetensors.torch import save

from softserve.service.runtime import LoadedModel
from softserve.app import create_app
from softserve.service.auth import add_key
from softserve.cli import build_parser
from softserve.config import Settings
from softserve.ui.routes import STATIC_DIR
from softserve.ui.stats import StatsHistory


def _blob(seed: int, k: int, hidden: int) -> bytes:
    return save({"prompt_embeddings": torch.randn(k, hidden, generator=torch.Generator().manual_seed(seed))})


def _upload(c, name: str, blob: bytes, headers) -> dict:
    r = c.put(f"/v1/prompts/{name}", files={"adapter_model": ("a.safetensors", blob)}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture()
def console(tiny_model, tokenizer, tmp_path):
    keyfile = tmp_path / "keys.yaml"
    keys = {"a": add_key(keyfile, "acme"), "b": add_key(keyfile, "beta"), "admin": add_key(keyfile, "ops", role="admin")}
    app = create_app(Settings(store=str(tmp_path / "store"), api_keys=str(keyfile), max_model_len=256),
                     loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as c:
        c.h = {who: {"Authorization": f"Bearer {key}"} for who, key in keys.items()}
        c.hidden = tiny_model.config.hidden_size
        yield c


def test_page_and_assets_are_served_with_a_strict_policy(console):
    r = console.get("/ui", follow_redirects=False)
    assert r.status_code == 308 and r.headers["location"] == "/ui/"
    page = console.get("/ui/")  # no key needed: the page holds no data
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
    # Every script the page loads, and every module those import, is ours and is served.
    pending = re.findall(r'src="assets/([\w.]+)"', page.text) + re.findall(r'href="assets/([\w.]+)"', page.text)
    seen = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        r = console.get(f"/ui/assets/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-security-policy"] == csp
        if name.endswith(".js"):
            assert "javascript" in r.headers["content-type"], r.headers["content-type"]
            pending += re.findall(r'from "\./([\w.]+)"', r.text)
    assert {"app.js", "api.js", "charts.js", "registry.js", "releases.js", "playground.js", "tuning.js", "batches.js", "metrics.js",
            "style.css"} <= seen
    assert seen == {p.name for p in STATIC_DIR.iterdir()} - {"index.html"}  # nothing unused ships
    # Offline: nothing is fetched from another origin (the SVG namespace is a name, not a fetch).
    for path in STATIC_DIR.iterdir():
        urls = set(re.findall(r"https?://[^\s\"'`)]+", path.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (path.name, urls)


def test_no_ui_turns_the_console_off(tiny_model, tokenizer, tmp_path):
    app = create_app(Settings(store=str(tmp_path / "store"), ui=False), loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as c:
        for path in ("/ui", "/ui/", "/ui/assets/app.js", "/ui/api/session", "/ui/api/stats"):
            assert c.get(path).status_code == 404, path
        assert c.get("/v1/models").status_code == 200


def test_cli_flag_and_env(monkeypatch):
    assert build_parser().parse_args(["serve", "--no-ui"]).ui is False
    assert build_parser().parse_args(["serve"]).ui is None  # then SOFTSERVE_UI / the default decide
    assert Settings().ui is True
    monkeypatch.setenv("SOFTSERVE_UI", "false")
    assert Settings().ui is False


def test_session_needs_the_key_and_names_the_tenant(console):
    for path in ("/ui/api/session", "/ui/api/stats"):
        assert console.get(path).status_code == 401
        assert console.get(path, headers={"Authorization": "Bearer sk-ss-wrong"}).status_code == 401
    s = console.get("/ui/api/session", headers=console.h["a"]).json()
    assert (s["tenant"], s["role"], s["auth"], s["model"], s["hidden_size"]) == ("acme", "user", True, "tiny", console.hidden)
    assert console.get("/ui/api/session", headers=console.h["admin"]).json()["role"] == "admin"


def test_whether_a_key_is_needed_is_answered_without_one(console, tiny_model, tokenizer, tmp_path):
    """The signed-out page asks this before any keyed call, so it logs no 401 (issue #26)."""
    r = console.get("/ui/api/auth")
    assert r.status_code == 200 and r.json() == {"auth": True}
    app = create_app(Settings(store=str(tmp_path / "open-store")), loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as open_server:
        assert open_server.get("/ui/api/auth").json() == {"auth": False}
        assert open_server.get("/ui/api/session").json()["tenant"] == "default"


def _complete(c, headers, n: int) -> int:
    tokens = 0
    for _ in range(n):
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 3, "temperature": 0},
                   headers=headers)
        assert r.status_code == 200, r.text
        tokens += r.json()["usage"]["completion_tokens"]
    return tokens


def test_stats_show_only_what_the_key_may_see(console):
    tokens_a = _complete(console, console.h["a"], 2)
    tokens_b = _complete(console, console.h["b"], 3)
    for _ in range(3):  # console-style polling is not load
        assert console.get("/v1/prompts", headers=console.h["a"]).status_code == 200
        assert console.get("/ui/api/stats", headers=console.h["a"]).status_code == 200
    a = console.get("/ui/api/stats", headers=console.h["a"]).json()
    b = console.get("/ui/api/stats", headers=console.h["b"]).json()
    admin = console.get("/ui/api/stats", headers=console.h["admin"]).json()
    assert (a["scope"], b["scope"], admin["scope"]) == ("tenant acme", "tenant beta", "all tenants")
    assert (a["totals"]["requests"], a["totals"]["generated_tokens"]) == (2, tokens_a)
    assert (b["totals"]["requests"], b["totals"]["generated_tokens"]) == (3, tokens_b)
    assert (admin["totals"]["requests"], admin["totals"]["generated_tokens"]) == (5, tokens_a + tokens_b)
    assert "beta" not in json.dumps(a) and "acme" not in json.dumps(b)  # no other tenant is named
    deadline = time.monotonic() + 20
    while not a["points"]:  # the sampler thread takes one every 2 s
        assert time.monotonic() < deadline, "no stats points after 20 s"
        time.sleep(0.2)
        a = console.get("/ui/api/stats", headers=console.h["a"]).json()
    point = a["points"][-1]
    assert {"requests_per_s", "tokens_per_s", "queue_depth", "batch_size", "prompt_cache_hit_rate", "kv_cache_hit_rate",
            "ttft_s", "kv_pool_used"} <= set(point)
    assert 0 <= point["kv_pool_used"] <= 1  # the engine's preallocated pool exists on this server
    assert console.get("/ui/api/stats", params={"since": -1}, headers=console.h["a"]).status_code == 400


def test_rollback_makes_an_old_version_latest_within_the_tenant(console):
    a, b, admin = console.h["a"], console.h["b"], console.h["admin"]
    v1 = _upload(console, "greeter", _blob(1, 4, console.hidden), a)["version"]
    v2 = _upload(console, "greeter", _blob(2, 6, console.hidden), a)["version"]
    assert console.get("/v1/prompts/greeter", headers=a).json()["version"] == v2
    assert console.post("/ui/api/prompts/greeter/rollback", json={"version": v1}, headers=b).status_code == 404
    assert console.post("/ui/api/prompts/acme/greeter/rollback", json={"version": v1}, headers=b).status_code == 404
    assert console.post("/ui/api/prompts/greeter/rollback", json={"version": v1}).status_code == 401
    assert console.post(f"/ui/api/prompts/greeter@{v1}/rollback", json={"version": v1}, headers=a).status_code == 400
    assert console.post("/ui/api/prompts/greeter/rollback", json={"version": "ffffffffffff"}, headers=a).status_code == 404
    assert console.post("/ui/api/prompts/greeter/rollback", json={"version": "abc"}, headers=a).status_code == 400
    r = console.post("/ui/api/prompts/greeter/rollback", json={"version": v1}, headers=a)
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["num_virtual_tokens"]) == (v1, 4)
    assert console.get("/v1/prompts/greeter", headers=a).json()["version"] == v1
    assert [v["version"] for v in console.get("/v1/prompts/greeter/versions", headers=a).json()["data"]] == [v1, v2]
    out = console.post("/v1/completions", json={"model": "greeter", "prompt": "hi", "max_tokens": 2}, headers=a).json()
    assert out["usage"]["virtual_tokens"] == 4
    # public prompts: everyone reads, only admins roll back
    p1 = _upload(console, "public/shared", _blob(3, 2, console.hidden), admin)["version"]
    _upload(console, "public/shared", _blob(4, 3, console.hidden), admin)
    r = console.post("/ui/api/prompts/public/shared/rollback", json={"version": p1}, headers=a)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = console.post("/ui/api/prompts/public/shared/rollback", json={"version": p1}, headers=admin)
    assert r.status_code == 200 and r.json()["version"] == p1


def test_releases_view_data_is_per_tenant_and_side_by_side(console):
    a, b, admin = console.h["a"], console.h["b"], console.h["admin"]
    v1 = _upload(console, "support", _blob(1, 4, console.hidden), a)["version"]
    v2 = _upload(console, "support", _blob(2, 4, console.hidden), a)["version"]
    console.put("/v1/prompts/support/aliases/prod", json={"split": [{"version": v1, "weight": 3}, {"version": v2, "weight": 1}]},
                headers=a)
    served = [console.post("/v1/completions", json={"model": "support@prod", "prompt": "hi", "max_tokens": 2, "user": f"u{i}"},
                           headers=a).json()["model"] for i in range(8)]
    r = console.get("/ui/api/prompts/support/releases", headers=a)
    assert r.status_code == 200, r.text
    data = r.json()
    assert [x["id"] for x in data["aliases"]] == ["support@prod"]
    rows = {v["version"]: v for v in data["versions"]}
    assert [v["version"] for v in data["versions"]] == [v2, v1] and data["versions"][0]["latest"]
    assert rows[v1]["aliases"] == {"prod": 0.75} and rows[v2]["aliases"] == {"prod": 0.25}
    for version, row in rows.items():  # this replica's numbers per version match what the answers said
        assert row["numbers"].get("requests", 0) == served.count(f"support@{version}")
    assert sum(row["numbers"]["generation_tokens"] for row in rows.values() if row["numbers"]) == 16
    assert console.get("/ui/api/prompts/support/releases", headers=b).status_code == 404
    assert console.get("/ui/api/prompts/acme/support/releases", headers=b).status_code == 404
    assert console.get("/ui/api/prompts/support/releases").status_code == 401
    # another tenant's traffic on a public prompt shows in its own view only
    p1 = _upload(console, "public/shared", _blob(3, 2, console.hidden), admin)["version"]
    console.put("/v1/prompts/public/shared/aliases/prod", json={"version": p1}, headers=admin)
    console.post("/v1/completions", json={"model": "public/shared@prod", "prompt": "hi", "max_tokens": 2}, headers=b)
    seen_by_b = console.get("/ui/api/prompts/public/shared/releases", headers=b).json()
    assert seen_by_b["aliases"][0]["id"] == "public/shared@prod" and seen_by_b["versions"][0]["numbers"]["requests"] == 1
    assert console.get("/ui/api/prompts/public/shared/releases", headers=a).json()["versions"][0]["numbers"] == {}


def test_stats_history_rates_and_tenant_filter():
    registry = CollectorRegistry()
    requests = Counter("softserve_requests", "", ["tenant", "endpoint", "status"], registry=registry)
    tokens = Counter("softserve_generation_tokens", "", ["tenant"], registry=registry)
    batch = Histogram("softserve_engine_batch_size", "", registry=registry, buckets=(1, 2, 4))
    history = StatsHistory(registry, interval_s=2.0, window_s=60.0)
    history.sample(now=100.0)
    requests.labels("a", "/v1/completions", "200").inc(4)
    requests.labels("a", "/v1/chat/completions", "429").inc(2)
    requests.labels("a", "/v1/prompts", "200").inc(50)  # not generation: not counted
    requests.labels("b", "/v1/completions", "200").inc(10)
    tokens.labels("a").inc(40)
    tokens.labels("b").inc(7)
    Counter("softserve_virtual_tokens", "", registry=registry).inc(9)  # no tenant label: admins' totals only
    for rows in (2, 4):
        batch.observe(rows)
    history.sample(now=102.0)
    first = history.view("a")["points"][0]
    assert (first["t"], first["requests_per_s"], first["errors_per_s"], first["tokens_per_s"]) == (102.0, 3.0, 1.0, 20.0)
    assert first["batch_size"] == 3.0 and first["ttft_s"] is None and first["kv_cache_hit_rate"] is None
    everyone = history.view(None)["points"][0]
    assert (everyone["requests_per_s"], everyone["tokens_per_s"]) == (8.0, 23.5)
    assert history.view("nobody")["points"][0]["requests_per_s"] == 0.0
    assert history.view(None)["totals"]["virtual_tokens"] == 9
    assert history.view("a")["totals"]["virtual_tokens"] == 0
    assert all(p["t"] > 102.0 for p in history.view("a", since=102.0)["points"])
    for i in range(100):  # bounded: only window_s / interval_s + 1 samples are kept
        history.sample(now=104.0 + 2 * i)
    assert len(history._samples) == 31
