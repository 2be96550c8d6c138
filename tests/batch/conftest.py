"""Fixtures of the Batch API tests: the API over a tiny model, two tenants' keys in `client.h`."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.support.polling import poll_json


def make_api(tiny_model, tokenizer, tmp_path, **settings):
    from softserve.app import create_app
    from softserve.config import Settings
    from softserve.service.auth import add_key
    from softserve.service.runtime import LoadedModel

    keyfile = tmp_path / "keys.yaml"
    keys = {"a": add_key(keyfile, "acme"), "b": add_key(keyfile, "beta")}
    settings = {"store": str(tmp_path / "store"), "api_keys": str(keyfile), "max_model_len": 256,
                "batch_scan_seconds": 0.2, "batch_flush_seconds": 0.1} | settings
    app = create_app(Settings(**settings), loaded=LoadedModel(tiny_model, tokenizer, "tiny-llama"))
    return app, keys


@pytest.fixture
def api(tiny_model, tokenizer, tmp_path):
    app, keys = make_api(tiny_model, tokenizer, tmp_path)
    with TestClient(app) as client:
        client.h = {w: {"Authorization": f"Bearer {k}"} for w, k in keys.items()}
        yield client


def jsonl(lines) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def completion_line(custom_id: str, prompt: str, max_tokens: int = 4, model: str = "tiny-llama", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0} | body}


def upload(client, headers, data: bytes, purpose: str = "batch") -> str:
    resp = client.post("/v1/files", headers=headers, files={"file": ("in.jsonl", data)}, data={"purpose": purpose})
    assert resp.status_code == 200, resp.text
    return resp.json()["id"]


def wait_batch(client, headers, batch_id: str, statuses=("completed", "failed", "cancelled", "expired"),
               timeout: float = 60.0) -> dict:
    return poll_json(client, f"/v1/batches/{batch_id}", lambda batch: batch["status"] in statuses, timeout, headers=headers)


def read_lines(client, headers, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    resp = client.get(f"/v1/files/{file_id}/content", headers=headers)
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.text.splitlines() if line.strip()]
