"""Prefix tuning (PEFT PREFIX_TUNING) in the store and the API, and composed prompts ("a+b"), on the tiny model.

PEFT parity on the real SmolLM2 is in test_parity_prefix.py; here: upload validation, download round trip
through PEFT, composition semantics (== one prompt holding the concatenated tensor), limits and tenants.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save

from softserve.store.compose import compose_meta, composed_sha256
from softserve.store.format import parse_upload
from softserve.store.types import ModelInfo, PromptMeta, PromptValidationError
from softserve.service.runtime import LoadedModel
from softserve.app import create_app
from softserve.service.auth import add_key
from softserve.config import Settings

# The tiny model: 2 layers, hidden 64, 4 query heads, 2 KV heads -> head_dim 16, prefix width 2*2*2*16 = 128.
TINY = ModelInfo(name="tiny", hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=None)
PREFIX_WIDTH = 128


def peft_prefix_adapter(model, directory, k: int, seed: int, projection: bool = False):
    """A PREFIX_TUNING adapter made and saved by peft itself; returns (config bytes, model bytes)."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k, prefix_projection=projection,
                                encoder_hidden_size=32)
    peft_model = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.prompt_encoder["default"].parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(directory)
    return (directory / "adapter_config.json").read_bytes(), (directory / "adapter_model.safetensors").read_bytes()


def tuning_config(k: int) -> bytes:
    return json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": k}).encode()


def files(model_bytes: bytes, config: bytes | None = None) -> dict:
    out = {"adapter_model": ("adapter_model.safetensors", model_bytes)}
    if config is not None:
        out["adapter_config"] = ("adapter_config.json", config, "application/json")
    return out


# ---- format --------------------------------------------------------------------------------------

def test_peft_prefix_files_are_accepted_with_and_without_projection(tiny_model, tmp_path):
    for projection in (False, True):
        cfg, blob = peft_prefix_adapter(tiny_model, tmp_path / str(projection), 5, 1, projection)
        parsed = parse_upload(blob, cfg, TINY)
        assert parsed.peft_type == "PREFIX_TUNING" and tuple(parsed.tensor.shape) == (5, PREFIX_WIDTH)
        # PEFT writes the KV width and KV head count for this GQA model; we store the same.
        assert json.loads(cfg)["token_dim"] == parsed.adapter_config["token_dim"] == 32
        assert parsed.adapter_config["num_attention_heads"] == 2 and parsed.adapter_config["num_layers"] == 2
        assert parsed.adapter_config["prefix_projection"] is projection


@pytest.mark.parametrize("change, message", [
    ({"width": 130}, "130 columns; this model needs num_layers * 2 * num_key_value_heads * head_dim = 2 * 2 * 2 * 16 = 128"),
    ({"num_layers": 3}, "num_layers 3 does not match: this model has 2 layers"),
    ({"token_dim": 64}, "token_dim 64 does not match: this model's num_key_value_heads * head_dim is 2 * 16 = 32"),
    ({"num_attention_heads": 4}, "num_attention_heads 4 does not match: this model has 2 key-value heads"),
    ({"num_virtual_tokens": 6}, "num_virtual_tokens 6 does not match: the tensor has 5 rows"),
    ({"task_type": "SEQ_CLS"}, "unsupported task_type SEQ_CLS"),
    ({"k": 300}, "num_virtual_tokens 300 out of range"),
    ({"nan": True}, "non-finite"),
])
def test_prefix_upload_errors_name_the_numbers(change, message):
    k, width = change.get("k", 5), change.get("width", PREFIX_WIDTH)
    tensor = torch.randn(k, width)
    if change.get("nan"):
        tensor[0, 0] = float("nan")
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": k, "token_dim": 32,
           "num_attention_heads": 2, "num_layers": 2}
    cfg.update({key: v for key, v in change.items() if key in cfg})
    with pytest.raises(PromptValidationError) as info:
        parse_upload(save({"prompt_embeddings": tensor}), json.dumps(cfg).encode(), TINY)
    assert info.value.status_code == 422 and message in info.value.message


def test_model_info_prefix_width_for_smollm2_numbers():
    smol = ModelInfo("SmolLM2", hidden_size=576, num_layers=30, num_attention_heads=9, num_key_value_heads=3)
    assert smol.prefix_width == 11520  # the measured [10, 11520]


def _meta(name: str, sha: str, k: int, peft_type: str = "PROMPT_TUNING", width: int = 64) -> PromptMeta:
    return PromptMeta(tenant="t", name=name, version=sha[:12], sha256=sha, num_virtual_tokens=k, token_dim=width,
                      dtype="float32", peft_type=peft_type, created_at=1, description=None)


def test_composition_hash_is_ordered_and_never_a_parts_hash():
    a, b = _meta("a", "a" * 64, 3), _meta("b", "b" * 64, 4)
    ab, ba = compose_meta([a, b], label="a+b", tenant="t", max_virtual_tokens=10), compose_meta([b, a], label="b+a", tenant="t", max_virtual_tokens=10)
    assert ab.sha256 == composed_sha256([a, b]) != ba.sha256
    assert ab.sha256 not in (a.sha256, b.sha256) and ab.num_virtual_tokens == 7 and ab.kind == "prompt_tuning"
    with pytest.raises(PromptValidationError, match="3 \\+ 4 = 7 virtual tokens; the limit is 6"):
        compose_meta([a, b], label="a+b", tenant="t", max_virtual_tokens=6)
    prefix = _meta("p", "c" * 64, 2, "PREFIX_TUNING", 128)
    with pytest.raises(PromptValidationError, match="cannot compose prefix-tuning prompt 'p' with prompt-tuning prompt 'a'"):
        compose_meta([a, prefix], label="a+p", tenant="t", max_virtual_tokens=10)
    mixed = compose_meta([a, _meta("pt", "d" * 64, 2, "P_TUNING")], label="a+pt", tenant="t", max_virtual_tokens=10)
    assert mixed.kind == "prompt_tuning"  # P_TUNING is served like prompt tuning: composable with it


# ---- API -----------------------------------------------------------------------------------------

@pytest.fixture()
def app_client(tiny_model, tokenizer, tmp_path):
    keys = tmp_path / "keys.json"
    acme, beta, admin = add_key(keys, "acme"), add_key(keys, "beta"), add_key(keys, "ops", role="admin")
    settings = Settings(store=str(tmp_path / "store"), api_keys=str(keys), max_model_len=256, max_virtual_tokens=40,
                        max_prompt_parts=3)
    app = create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as client:
        yield client, {"acme": acme, "beta": beta, "admin": admin}


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _complete(client, key, model, prompt="hello world", n_tokens=6, stream=False):
    body = {"model": model, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    r = client.post("/v1/completions", json=body, headers=_auth(key))
    if not stream:
        return r
    assert r.status_code == 200, r.text
    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
    return text


@torch.inference_mode()
def peft_reference(base, adapter_dir, ids: list[int], n: int) -> list[int]:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    ids, out = list(ids), []
    for _ in range(n):
        logits = peft_model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
        out.append(int(logits[0, -1].argmax()))
        ids.append(out[-1])
    return out


def test_prefix_upload_serve_list_and_download_round_trip_through_peft(app_client, tiny_model, tokenizer, tmp_path):
    client, keys = app_client
    cfg, blob = peft_prefix_adapter(tiny_model, tmp_path / "made", 5, 3, projection=True)
    r = client.put("/v1/prompts/pfx", files=files(blob, cfg), headers=_auth(keys["acme"]))
    assert r.status_code == 201, r.text
    assert r.json()["peft_type"] == "PREFIX_TUNING" and r.json()["kind"] == "prefix_tuning"
    assert r.json()["num_virtual_tokens"] == 5
    listed = client.get("/v1/prompts", headers=_auth(keys["acme"])).json()["data"]
    assert [(p["id"], p["kind"]) for p in listed] == [("pfx", "prefix_tuning")]
    models = client.get("/v1/models", headers=_auth(keys["acme"])).json()["data"]
    assert {m["id"]: m["kind"] for m in models} == {"tiny": None, "pfx": "prefix_tuning"}

    # Download -> PEFT loads it, and PEFT's output from the downloaded files == PEFT's from its own files == ours.
    z = zipfile.ZipFile(io.BytesIO(client.get("/v1/prompts/pfx/download", headers=_auth(keys["acme"])).content))
    down = tmp_path / "downloaded"
    z.extractall(down)
    assert torch.equal(load((down / "adapter_model.safetensors").read_bytes())["prompt_embeddings"],
                       load(blob)["prompt_embeddings"])
    ids = tokenizer("hello world").input_ids
    expected = peft_reference(tiny_model, tmp_path / "made", ids, 6)
    assert peft_reference(tiny_model, down, ids, 6) == expected
    r = _complete(client, keys["acme"], "pfx")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tokenizer.decode(expected)
    assert r.json()["usage"]["virtual_tokens"] == 5


def test_prefix_upload_with_wrong_shape_is_422_naming_the_numbers(app_client):
    client, keys = app_client
    cfg = json.dumps({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}).encode()
    r = client.put("/v1/prompts/bad", files=files(save({"prompt_embeddings": torch.randn(4, 64)}), cfg), headers=_auth(keys["acme"]))
    assert r.status_code == 422 and "2 * 2 * 2 * 16 = 128" in r.json()["error"]["message"]


def _upload_tuning(client, key, name, tensor):
    r = client.put(f"/v1/prompts/{name}", files=files(save({"prompt_embeddings": tensor}), tuning_config(tensor.shape[0])), headers=_auth(key))
    assert r.status_code == 201, r.text
    return r.json()


def test_composition_equals_one_prompt_holding_the_concatenation(app_client, tiny_model, tmp_path):
    client, keys = app_client
    acme, admin = keys["acme"], keys["admin"]
    a, b = torch.randn(3, 64) * 2, torch.randn(4, 64) * 2
    _upload_tuning(client, admin, "public/fmt", a)
    info_b = _upload_tuning(client, acme, "task", b)
    _upload_tuning(client, acme, "task", torch.randn(4, 64))  # a newer latest: the pinned version must be used
    _upload_tuning(client, acme, "joined", torch.cat([a, b]))
    composed = f"public/fmt+task@{info_b['version']}"
    expected = _complete(client, acme, "joined").json()["choices"][0]["text"]
    r = _complete(client, acme, composed)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == composed and r.json()["usage"]["virtual_tokens"] == 7
    assert r.json()["choices"][0]["text"] == expected
    assert _complete(client, acme, composed, stream=True) == expected
    assert _complete(client, acme, "task+public/fmt").json()["choices"][0]["text"] != expected  # order matters

    # Prefix tuning: the composed prefix == one prefix holding both, concatenated along k.
    cfg1, blob1 = peft_prefix_adapter(tiny_model, tmp_path / "p1", 2, 5)
    cfg2, blob2 = peft_prefix_adapter(tiny_model, tmp_path / "p2", 3, 6)
    for name, cfg, blob in (("p1", cfg1, blob1), ("p2", cfg2, blob2)):
        assert client.put(f"/v1/prompts/{name}", files=files(blob, cfg), headers=_auth(acme)).status_code == 201
    both = torch.cat([load(blob1)["prompt_embeddings"], load(blob2)["prompt_embeddings"]])
    cfg = json.dumps({**json.loads(cfg1), "num_virtual_tokens": 5}).encode()
    assert client.put("/v1/prompts/p12", files=files(save({"prompt_embeddings": both}), cfg), headers=_auth(acme)).status_code == 201
    expected = _complete(client, acme, "p12").json()["choices"][0]["text"]
    assert _complete(client, acme, "p1+p2").json()["choices"][0]["text"] == expected
    assert _complete(client, acme, "p1+p2", stream=True) == expected
    assert _complete(client, acme, "p2").json()["choices"][0]["text"] != expected

    info = client.get("/v1/prompts/p1+p2", headers=_auth(acme)).json()
    assert info["kind"] == "prefix_tuning" and info["num_virtual_tokens"] == 5 and len(info["parts"]) == 2


def test_composition_limits_and_mixed_kinds_are_400(app_client, tiny_model, tmp_path):
    client, keys = app_client
    acme = keys["acme"]
    for name, k in (("a", 20), ("b", 20), ("c", 1)):
        _upload_tuning(client, acme, name, torch.randn(k, 64))
    cfg, blob = peft_prefix_adapter(tiny_model, tmp_path / "p", 2, 1)
    assert client.put("/v1/prompts/p", files=files(blob, cfg), headers=_auth(acme)).status_code == 201

    def error(model):
        r = _complete(client, acme, model)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_composition" and r.json()["error"]["param"] == "model"
        return r.json()["error"]["message"]

    assert "20 + 20 + 1 = 41 virtual tokens; the limit is 40" in error("a+b+c")
    assert "4 parts; the limit is 3" in error("c+c+c+c")
    assert "cannot compose prefix-tuning prompt 'p' with prompt-tuning prompt 'c'" in error("c+p")
    assert _complete(client, acme, "c+c+c").status_code == 200  # a part may repeat
    for malformed in ("a+", "+a", "a++b", "a+b@"):
        assert _complete(client, acme, malformed).status_code == 404


def test_composition_cannot_reach_another_tenants_prompt(app_client):
    client, keys = app_client
    _upload_tuning(client, keys["beta"], "secret", torch.randn(2, 64))
    _upload_tuning(client, keys["acme"], "mine", torch.randn(2, 64))
    acme = keys["acme"]

    def not_found(path_or_model, get=False):
        r = client.get(f"/v1/prompts/{path_or_model}", headers=_auth(acme)) if get else _complete(client, acme, path_or_model)
        assert r.status_code == 404, r.text
        return r.json()["error"]

    # beta's existing prompt reads exactly like a name nobody has, by name or by tenant path.
    for existing, missing in (("mine+secret", "mine+nosuch"), ("mine+beta/secret", "mine+beta/nosuch")):
        for get in (False, True):
            a, b = not_found(existing, get), not_found(missing, get)
            assert a["code"] == b["code"] and a["message"].replace("secret", "X") == b["message"].replace("nosuch", "X")
    assert _complete(client, keys["beta"], "secret+secret").status_code == 200  # beta itself may
