"""Prompt releases over HTTP on the tiny model: alias routes, `model: name@alias` (single, split, in a
composition, streamed), the served version in the body and a header, pinned versions winning, 409 on
deleting an aliased prompt, per-version metrics and feedback, and tenant isolation on every route."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from softserve.app import create_app
from softserve.config import Settings
from softserve.service.auth import add_key
from softserve.service.runtime import LoadedModel
from tests.support.prompts import CFG, blob

SERVED = "x-softserve-served-model"


@pytest.fixture()
def api(tiny_model, tokenizer, tmp_path):
    keys = tmp_path / "keys.json"
    who = {"acme": add_key(keys, "acme"), "beta": add_key(keys, "beta"), "admin": add_key(keys, "ops", role="admin")}
    settings = Settings(store=str(tmp_path / "store"), api_keys=str(keys), max_model_len=128,
                        version_metrics_max_series=8)
    app = create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as client:
        yield Api(client, who)


class Api:
    def __init__(self, client: TestClient, keys: dict[str, str]) -> None:
        self.client, self.keys = client, keys

    def h(self, who: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}", **extra}

    def upload(self, who: str, name: str, seed: int) -> str:
        files = {"adapter_model": ("adapter_model.safetensors", blob(seed)),
                 "adapter_config": ("adapter_config.json", CFG, "application/json")}
        r = self.client.put(f"/v1/prompts/{name}", files=files, headers=self.h(who))
        assert r.status_code == 201, r.text
        return r.json()["version"]

    def alias(self, who: str, name: str, alias: str, body: dict):
        return self.client.put(f"/v1/prompts/{name}/aliases/{alias}", json=body, headers=self.h(who))

    def complete(self, who: str, model: str, *, user: str | None = None, headers: dict | None = None, stream=False):
        body = {"model": model, "prompt": "hello world", "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        if user is not None:
            body["user"] = user
        return self.client.post("/v1/completions", json=body, headers=self.h(who, **(headers or {})))


def _stream_chunks(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_alias_routes_and_history(api):
    v1, v2 = api.upload("acme", "task", 1), api.upload("acme", "task", 2)
    r = api.alias("acme", "task", "prod", {"version": v1})
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "prompt.alias", "id": "task@prod", "name": "task", "alias": "prod",
                        "split": [{"version": v1, "weight": 1.0}], "updated_at": r.json()["updated_at"],
                        "updated_by": r.json()["updated_by"], "history": None}
    assert r.json()["updated_by"].startswith("acme:key-")
    split = {"split": [{"version": v1, "weight": 90}, {"version": v2[:8], "weight": 10}]}
    assert api.alias("acme", "task", "prod", split).json()["split"] == [{"version": v1, "weight": 90.0},
                                                                        {"version": v2, "weight": 10.0}]
    listed = api.client.get("/v1/prompts/task/aliases", headers=api.h("acme")).json()
    assert [a["id"] for a in listed["data"]] == ["task@prod"]
    one = api.client.get("/v1/prompts/task/aliases/prod", headers=api.h("acme")).json()
    assert [(c["seq"], c["from"], c["to"]) for c in one["history"]] == [
        (1, None, [{"version": v1, "weight": 1.0}]),
        (2, [{"version": v1, "weight": 1.0}], [{"version": v1, "weight": 90.0}, {"version": v2, "weight": 10.0}])]
    assert api.client.delete("/v1/prompts/task/aliases/prod", headers=api.h("acme")).json() == {
        "object": "prompt.alias.deleted", "id": "task@prod", "deleted": True}
    assert api.client.get("/v1/prompts/task/aliases/prod", headers=api.h("acme")).status_code == 404
    assert api.client.get("/v1/prompts/task/aliases", headers=api.h("acme")).json()["data"] == []


@pytest.mark.parametrize("alias, body, status, code", [
    ("abc123", {"version": "V1"}, 400, "invalid_alias"),  # hex: could be a version id
    ("Prod", {"version": "V1"}, 400, "invalid_alias"),
    ("prod", {"split": [{"version": "V1", "weight": -1}]}, 400, None),
    ("prod", {"split": [{"version": "V1", "weight": 0}]}, 400, "invalid_split"),
    ("prod", {"split": [{"version": "V1", "weight": 1}] * 9}, 400, "invalid_split"),
    ("prod", {"version": "V1", "split": [{"version": "V1", "weight": 1}]}, 400, None),
    ("prod", {}, 400, None),
    ("prod", {"version": "0123456789ab"}, 404, None),
    ("prod", {"version": "V1", "extra": 1}, 400, None),
])
def test_alias_validation(api, alias, body, status, code):
    v1 = api.upload("acme", "task", 1)
    body = json.loads(json.dumps(body).replace("V1", v1))
    r = api.alias("acme", "task", alias, body)
    assert r.status_code == status, r.text
    if code:
        assert r.json()["error"]["code"] == code
    assert api.alias("acme", "nope", "prod", {"version": v1}).status_code == 404


def test_model_through_an_alias_reports_the_served_version(api):
    v1, v2 = api.upload("acme", "task", 1), api.upload("acme", "task", 2)
    api.alias("acme", "task", "prod", {"version": v1})
    pinned = api.complete("acme", f"task@{v1}").json()
    r = api.complete("acme", "task@prod")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == f"task@{v1}" and r.headers[SERVED] == f"task@{v1}"
    assert r.json()["choices"][0]["text"] == pinned["choices"][0]["text"]
    # moved: the next request serves v2 (this replica's own write is visible at once)
    api.alias("acme", "task", "prod", {"version": v2})
    r = api.complete("acme", "task@prod")
    assert r.json()["model"] == f"task@{v2}" and r.json()["choices"][0]["text"] == api.complete("acme", f"task@{v2}").json()["choices"][0]["text"]
    # a pinned version still wins, and echoes what was asked; the header names it too
    r = api.complete("acme", f"task@{v1}")
    assert r.json()["model"] == f"task@{v1}" and r.headers[SERVED] == f"task@{v1}"
    r = api.complete("acme", "task")  # latest, unaliased: `model` echoes the request, the header pins it
    assert r.json()["model"] == "task" and r.headers[SERVED] == f"task@{v2}"
    assert api.complete("acme", "task@staging").status_code == 404
    chat = api.client.post("/v1/chat/completions", headers=api.h("acme"), json={
        "model": "task@prod", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.json()["model"] == f"task@{v2}" and chat.headers[SERVED] == f"task@{v2}"


def test_streamed_completion_reports_the_served_version(api):
    v1 = api.upload("acme", "task", 1)
    api.alias("acme", "task", "prod", {"version": v1})
    r = api.complete("acme", "task@prod", stream=True)
    chunks = _stream_chunks(r)
    assert chunks and {c["model"] for c in chunks} == {f"task@{v1}"} and r.headers[SERVED] == f"task@{v1}"
    r = api.client.post("/v1/chat/completions", headers=api.h("acme"), json={
        "model": "task@prod", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    assert {c["model"] for c in _stream_chunks(r)} == {f"task@{v1}"} and r.headers[SERVED] == f"task@{v1}"


def test_an_alias_in_a_composition(api):
    va, vb = api.upload("acme", "a", 1), api.upload("acme", "b", 2)
    api.upload("acme", "a", 3)  # latest of a is another version: the alias must win over latest
    api.alias("acme", "a", "prod", {"version": va})
    r = api.complete("acme", "a@prod+b")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == f"a@{va}+b@{vb}" and r.headers[SERVED] == f"a@{va}+b@{vb}"
    assert r.json()["choices"][0]["text"] == api.complete("acme", f"a@{va}+b").json()["choices"][0]["text"]
    assert r.json()["choices"][0]["text"] != api.complete("acme", "a+b").json()["choices"][0]["text"]


def test_split_assignment_is_sticky_per_user_and_header(api):
    v1, v2 = api.upload("acme", "task", 1), api.upload("acme", "task", 2)
    api.alias("acme", "task", "prod", {"split": [{"version": v1, "weight": 1}, {"version": v2, "weight": 1}]})
    for user in ("alice", "bob", "carol"):
        served = {api.complete("acme", "task@prod", user=user).json()["model"] for _ in range(3)}
        assert len(served) == 1
        by_header = api.complete("acme", "task@prod", headers={"X-Softserve-Assignment": user}).json()["model"]
        assert served == {by_header}  # the header and `user` are one assignment key
    seen = {api.complete("acme", "task@prod", user=f"u{i}").json()["model"] for i in range(24)}
    assert seen == {f"task@{v1}", f"task@{v2}"}


def test_deleting_an_aliased_prompt_is_409_and_it_keeps_serving(api):
    v1 = api.upload("acme", "task", 1)
    api.alias("acme", "task", "prod", {"version": v1})
    r = api.client.delete("/v1/prompts/task", headers=api.h("acme"))
    assert r.status_code == 409 and r.json()["error"]["code"] == "alias_in_use"
    assert api.complete("acme", "task@prod").status_code == 200
    api.client.delete("/v1/prompts/task/aliases/prod", headers=api.h("acme"))
    assert api.client.delete("/v1/prompts/task", headers=api.h("acme")).status_code == 200


def test_per_version_metrics_and_feedback(api):
    v1, v2 = api.upload("acme", "task", 1), api.upload("acme", "task", 2)
    api.alias("acme", "task", "prod", {"version": v1})
    completion = api.complete("acme", "task@prod").json()
    api.complete("acme", f"task@{v2}")  # not through an alias: counted as "other"
    r = api.client.post("/v1/feedback", headers=api.h("acme"), json={"id": completion["id"], "score": 0.75})
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "feedback", "id": completion["id"], "score": 0.75, "served": [f"task@{v1}"]}
    metrics = api.client.get("/metrics", headers=api.h("admin")).text
    assert f'softserve_version_requests_total{{prompt="task",version="{v1}"}} 1.0' in metrics
    assert 'softserve_version_requests_total{prompt="other",version="other"} 1.0' in metrics
    assert f'softserve_version_feedback_score_sum{{prompt="task",version="{v1}"}} 0.75' in metrics
    assert f'softserve_version_generation_tokens_total{{prompt="task",version="{v1}"}} 5.0' in metrics
    assert f'softserve_version_time_to_first_token_seconds_count{{prompt="task",version="{v1}"}} 1.0' in metrics
    assert "tenant=" not in metrics  # tenant names stay out of what is scraped (--metrics-tenant-labels)
    bad = api.client.post("/v1/feedback", headers=api.h("acme"), json={"id": completion["id"], "score": "nan"})
    assert bad.status_code == 400
    assert api.client.post("/v1/feedback", headers=api.h("acme"), json={"id": "cmpl-nope", "score": 1}).status_code == 404


def test_tenant_isolation_on_every_route(api):
    v1 = api.upload("acme", "task", 1)
    api.alias("acme", "task", "prod", {"version": v1})
    completion = api.complete("acme", "task@prod").json()
    missing = {
        "list": api.client.get("/v1/prompts/task/aliases", headers=api.h("beta")),
        "get": api.client.get("/v1/prompts/task/aliases/prod", headers=api.h("beta")),
        "put": api.alias("beta", "task", "prod", {"version": v1}),
        "delete": api.client.delete("/v1/prompts/task/aliases/prod", headers=api.h("beta")),
        "model": api.complete("beta", "task@prod"),
        "composition": api.complete("beta", "acme/task@prod+task"),
        "feedback": api.client.post("/v1/feedback", headers=api.h("beta"), json={"id": completion["id"], "score": 1}),
        "other namespace": api.client.get("/v1/prompts/acme/task/aliases", headers=api.h("beta")),
    }
    assert {k: r.status_code for k, r in missing.items()} == dict.fromkeys(missing, 404)
    # beta's own prompt of the same name is its own world
    api.upload("beta", "task", 2)
    assert api.client.get("/v1/prompts/task/aliases", headers=api.h("beta")).json()["data"] == []
    assert api.client.get("/v1/prompts/task/aliases/prod", headers=api.h("acme")).status_code == 200  # untouched
    assert api.client.get("/v1/prompts/task/aliases/prod", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_public_aliases_are_admin_written_and_everyone_reads(api):
    version = api.upload("admin", "public/shared", 1)
    assert api.alias("acme", "public/shared", "prod", {"version": version}).status_code == 403
    r = api.alias("admin", "public/shared", "prod", {"version": version})
    assert r.status_code == 200 and r.json()["id"] == "public/shared@prod"
    assert api.client.delete("/v1/prompts/public/shared/aliases/prod", headers=api.h("acme")).status_code == 403
    assert [a["id"] for a in api.client.get("/v1/prompts/public/shared/aliases", headers=api.h("acme")).json()["data"]] == [
        "public/shared@prod"]
    r = api.complete("beta", "public/shared@prod")
    assert r.status_code == 200 and r.json()["model"] == f"public/shared@{version}"


def test_client_methods(api):
    from softserve.client import AsyncClient, Client, ConflictError, NotFoundError

    v1, v2 = api.upload("acme", "task", 1), api.upload("acme", "task", 2)
    with Client("http://testserver", api_key=api.keys["acme"], http_client=api.client, max_retries=0) as ss:
        single = ss.prompts.set_alias("task", "prod", v1)
        assert single.id == "task@prod" and [(a.version, a.weight) for a in single.split] == [(v1, 1.0)]
        split = ss.prompts.set_alias("task", "prod", split={v1: 3, v2: 1})
        assert [(a.version, a.weight) for a in split.split] == [(v1, 3.0), (v2, 1.0)]
        assert [a.id for a in ss.prompts.aliases("task")] == ["task@prod"]
        history = ss.prompts.get_alias("task", "prod").history
        assert [(c.seq, c.from_, [a.version for a in c.to]) for c in history][0] == (1, None, [v1])
        out = ss.complete("task@prod", "hello", max_tokens=2, user="u-1")
        assert out.model in (f"task@{v1}", f"task@{v2}")
        assert ss.feedback(out.id, 1).served == [out.model]
        with pytest.raises(ConflictError):
            ss.prompts.delete("task")
        assert ss.prompts.delete_alias("task", "prod").id == "task@prod"
        with pytest.raises(NotFoundError):
            ss.prompts.get_alias("task", "prod")
        with pytest.raises(ValueError):
            ss.prompts.set_alias("task", "prod", v1, split={v1: 1})
    assert issubclass(AsyncClient, type(ss).__mro__[1])  # the async twin shares every method
