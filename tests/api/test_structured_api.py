"""API: no silently ignored fields, structured output (response_format, guided_*), echo + prompt logprobs."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from softserve.service.runtime import LoadedModel
from softserve.app import create_app
from softserve.config import Settings

C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "Classify: great film"}]
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["pos", "neg"]}, "score": {"type": "integer", "maximum": 9}},
          "required": ["label", "score"], "additionalProperties": False}
TEXT = "The quick brown fox jumps"


@pytest.fixture(scope="module")
def soft(tiny_model):
    return torch.randn(4, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def client(tiny_model, tokenizer, soft, tmp_path_factory):
    settings = Settings(store=str(tmp_path_factory.mktemp("store")), max_model_len=256, max_tokens_limit=100,
                        guided_sandbox=False)  # in-process; the sandbox process: tests/api/test_grammar_abuse.py
    app = create_app(settings, loaded=LoadedModel(tiny_model, tokenizer, "tiny"))
    with TestClient(app) as c:
        assert c.put("/v1/prompts/p1", files={"adapter_model": ("a.safetensors", save({"prompt_embeddings": soft}))}).status_code == 201
        yield c


def _error(r, param):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert param.split(".")[-1] in err["message"]
    return err


# ---- A: every field we do not implement is a 400 naming it ---------------------------------------------
@pytest.mark.parametrize("path,extra,param", [
    (CHAT, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    (CHAT, {"tool_choice": "auto"}, "tool_choice"),
    (CHAT, {"functions": [{"name": "f"}]}, "functions"),
    (CHAT, {"function_call": "auto"}, "function_call"),
    (CHAT, {"logit_bias": {"5": 10}}, "logit_bias"),
    (C, {"logit_bias": {"5": 10}}, "logit_bias"),
    (C, {"suffix": " end"}, "suffix"),
    (C, {"best_of": 3}, "best_of"),
    (C, {"frequency_penalty": 0.5}, "frequency_penalty"),
    (CHAT, {"presence_penalty": 1.0}, "presence_penalty"),
    (C, {"repetition_penalty": 1.2}, "repetition_penalty"),
    (C, {"no_such_field": 1}, "no_such_field"),
    (CHAT, {"echo": True}, "echo"),
    (CHAT, {"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "x"}]}]}, "messages.0.tool_calls"),
    (C, {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "extra": 1}}},
     "response_format.json_schema.extra"),
])
def test_unsupported_field_is_400_naming_it(client, path, extra, param):
    body = {"model": "tiny", "max_tokens": 2, **({"messages": USER} if path == CHAT else {"prompt": "hi"}), **extra}
    assert _error(client.post(path, json=body), param)["code"] == "unsupported_parameter"


@pytest.mark.parametrize("path", [C, CHAT])
def test_neutral_values_of_unsupported_fields_are_accepted(client, path):
    """What clients send when a feature is off must keep working (the openai SDK, lm-eval)."""
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "tools": [], "tool_choice": "none",
               "best_of": 1, "user": "u1"}
    body = {"model": "tiny", "max_tokens": 2, **({"messages": USER} if path == CHAT else {"prompt": "hi", "suffix": None}),
            **neutral}
    assert client.post(path, json=body).status_code == 200


def test_stop_token_ids_are_honoured(client, tokenizer):
    body = {"model": "tiny", "prompt": TEXT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    free = client.post(C, json=body).json()["choices"][0]
    ids = tokenizer(free["text"], add_special_tokens=False).input_ids
    stopped = client.post(C, json={**body, "stop_token_ids": [ids[2]]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert free["text"].startswith(stopped["text"]) and len(stopped["text"]) < len(free["text"])


# ---- B: structured output ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [C, CHAT])
@pytest.mark.parametrize("model", ["tiny", "p1"])
def test_response_format_json_schema_gives_valid_json(client, path, model):
    body = {"model": model, "max_tokens": 40, "temperature": 1.0, "seed": 5, "n": 3,
            "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}},
            **({"messages": USER} if path == CHAT else {"prompt": TEXT})}
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        text = choice["message"]["content"] if path == CHAT else choice["text"]
        jsonschema.validate(json.loads(text), SCHEMA)
        assert choice["finish_reason"] == "stop"


def test_json_object_streamed(client):
    body = {"model": "tiny", "messages": USER, "max_tokens": 60, "temperature": 0, "stream": True,
            "response_format": {"type": "json_object"}}
    text = ""
    with client.stream("POST", CHAT, json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    text += ch["delta"].get("content") or ""
    assert text.startswith("{")  # may be cut by max_tokens; the engine tests check complete objects


@pytest.mark.parametrize("field,value,check", [
    ("guided_choice", ["alpha", "beta gamma", "δ"], lambda t: t in ["alpha", "beta gamma", "δ"]),
    ("guided_regex", r"[0-9]{2}-[a-z]{3}", lambda t: len(t) == 6 and t[2] == "-" and t[:2].isdigit()),
    ("guided_json", SCHEMA, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    ("structured_outputs", {"choice": ["up", "down"]}, lambda t: t in ["up", "down"]),
    ("structured_outputs", {"regex": "(yes|no)!"}, lambda t: t in ["yes!", "no!"]),
])
def test_vllm_guided_fields(client, field, value, check):
    body = {"model": "p1", "prompt": TEXT, "max_tokens": 30, "temperature": 1.2, "seed": 1, "n": 4, field: value}
    r = client.post(C, json=body)
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert all(check(t) for t in texts), texts


def test_logprobs_with_a_constraint_list_only_allowed_tokens(client):
    """Past the grammar's end only EOS is allowed: the other top-N alternatives are -inf and are left out."""
    r = client.post(C, json={"model": "tiny", "prompt": "hi", "max_tokens": 5, "logprobs": 5, "guided_choice": ["ab"]})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert all(len(top) >= 1 for top in lp["top_logprobs"])
    assert len(lp["top_logprobs"][-1]) == 1  # the EOS step
    r = client.post(CHAT, json={"model": "tiny", "messages": USER, "max_tokens": 5, "logprobs": True, "top_logprobs": 5,
                                "guided_choice": ["ab"]})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("extra,param", [
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "x"}}, "structured_outputs.regex"),
    ({"guided_regex": "[a-z"}, "guided_regex"),
    ({"guided_json": {"type": "objectx"}}, "guided_json"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"guided_choice": ["a"], "ignore_eos": True}, "ignore_eos"),
    ({"guided_choice": ["a"], "min_tokens": 3}, "min_tokens"),
])
def test_bad_constraints_are_400(client, extra, param):
    _error(client.post(C, json={"model": "tiny", "prompt": "hi", "max_tokens": 4, **extra}), param)


@pytest.mark.parametrize("path", [C, CHAT])
def test_a_guided_choice_item_has_a_length_cap(client, path):
    """Issue #26 ("also"): one long item under --guided-max-bytes is refused (the grammar grows with it)."""
    body = {"model": "tiny", "max_tokens": 4, "guided_choice": ["short", "x" * 1025],
            **({"prompt": "hi"} if path == C else {"messages": USER})}
    err = _error(client.post(path, json=body), "guided_choice")
    assert err["code"] == "invalid_grammar" and "the limit is 1024" in err["message"], err
    body["guided_choice"] = ["short", "x" * 1024]
    assert client.post(path, json=body).status_code == 200


# ---- C: echo, logprobs over the prompt, max_tokens 0, prompt_logprobs ------------------------------------
@torch.inference_mode()
def _reference(model, ids, soft):
    embed = model.get_input_embeddings()(torch.tensor([ids]))
    x = torch.cat([soft.unsqueeze(0), embed], dim=1) if soft is not None else embed
    logits = model(inputs_embeds=x).logits[0, -len(ids):]
    return torch.log_softmax(logits[:-1].float(), dim=-1)  # row j predicts token j + 1


@pytest.mark.parametrize("model", ["tiny", "p1"])
def test_echo_logprobs_max_tokens_0_scores_the_prompt(client, tiny_model, tokenizer, soft, model):
    """What lm-eval's loglikelihood sends: echo, logprobs=1, max_tokens=0."""
    ids = tokenizer(TEXT).input_ids
    r = client.post(C, json={"model": model, "prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"]) == TEXT
    ref = _reference(tiny_model, ids, soft if model == "p1" else None)
    for j in range(1, len(ids)):
        assert lp["token_logprobs"][j] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        (best_token, best_lp), = lp["top_logprobs"][j].items()
        assert best_lp == pytest.approx(float(ref[j - 1].max()), abs=1e-4)
    assert lp["text_offset"][:3] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]


def test_echo_with_generation_and_streaming(client, tokenizer):
    ids = tokenizer(TEXT).input_ids
    body = {"model": "p1", "prompt": TEXT, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    choice = client.post(C, json=body).json()["choices"][0]
    plain = client.post(C, json={**body, "echo": False}).json()["choices"][0]
    assert choice["text"] == TEXT + plain["text"]
    assert len(choice["logprobs"]["tokens"]) == len(ids) + 4
    assert choice["logprobs"]["token_logprobs"][len(ids):] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    streamed, tokens = "", []
    with client.stream("POST", C, json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    streamed += ch["text"]
                    tokens += (ch["logprobs"] or {}).get("tokens", [])
    assert streamed == choice["text"] and tokens == choice["logprobs"]["tokens"]


def test_echo_without_logprobs_and_token_prompts(client, tokenizer):
    ids = tokenizer(TEXT).input_ids
    r = client.post(C, json={"model": "tiny", "prompt": [ids, ids[:3]], "echo": True, "max_tokens": 0})
    texts = [c["text"] for c in r.json()["choices"]]
    assert texts == [tokenizer.decode(ids), tokenizer.decode(ids[:3])]
    assert all(c["logprobs"] is None for c in r.json()["choices"])


def test_vllm_prompt_logprobs(client, tiny_model, tokenizer, soft):
    ids = tokenizer(TEXT).input_ids
    r = client.post(C, json={"model": "p1", "prompt": TEXT, "prompt_logprobs": 2, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    got = choice["prompt_logprobs"]
    assert len(got) == len(ids) and got[0] is None
    ref = _reference(tiny_model, ids, soft)
    for j in range(1, len(ids)):
        entry = got[j]
        assert str(ids[j]) in entry and 2 <= len(entry) <= 3
        assert entry[str(ids[j])]["logprob"] == pytest.approx(float(ref[j - 1, ids[j]]), abs=1e-4)
        top = ref[j - 1].topk(2)
        for rank, (tid, lp) in enumerate(zip(top.indices.tolist(), top.values.tolist()), start=1):
            assert entry[str(tid)]["rank"] == rank and entry[str(tid)]["logprob"] == pytest.approx(lp, abs=1e-4)
    assert len(choice["text"]) > 0  # the one generated token is still returned
    assert client.post(C, json={"model": "tiny", "prompt": "hi", "max_tokens": 1}).json()["choices"][0]["prompt_logprobs"] is None
