"""Fixtures of the tuning tests: the API over a tiny model, with two tenants' keys in `client.h`."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient


@pytest.fixture
def api(tiny_model, tokenizer, tmp_path):
    from softserve.service.runtime import LoadedModel
    from softserve.app import create_app
    from softserve.service.auth import add_key
    from softserve.config import Settings

    keyfile = tmp_path / "keys.yaml"
    keys = {"a": add_key(keyfile, "acme"), "b": add_key(keyfile, "beta")}
    app = create_app(Settings(store=str(tmp_path / "store"), api_keys=str(keyfile), max_model_len=256),
                     loaded=LoadedModel(tiny_model, tokenizer, "tiny-llama"))
    with TestClient(app) as client:
        client.h = {w: {"Authorization": f"Bearer {k}"} for w, k in keys.items()}
        yield client
