"""Abuse resistance in process (tiny model): bounded work per request, hostile inputs answered 4xx."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from server.api.state import LoadedModel
from server.app import create_app
from server.config import Settings


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
    import server.api.openai_routes as routes

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
