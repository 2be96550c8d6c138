"""Live end-to-end tests: the real embedded SmolLM2 behind `python -m softserve serve`, driven by the
official `openai` client and raw httpx. One server for the whole module (~20 s to load on CPU)."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.live_server import (
    SMOLLM_HIDDEN, SMOLLM_NAME, LiveServer, adapter_config, assert_openai_error, iter_sse, prompt_bytes, upload,
)

pytestmark = pytest.mark.process  # a live server subprocess

MAX_MODEL_LEN = 1024
PROMPT = "greeter"
K = 5
TEXT = "The three primary colors are"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("live-openai")
    srv = LiveServer(root / "store", max_model_len=MAX_MODEL_LEN, log_dir=root).start()
    try:
        with srv.client() as c:
            r = upload(c, PROMPT, prompt_bytes(7, K, SMOLLM_HIDDEN, scale=0.05), adapter_config(K))
            assert r.status_code == 201, r.text
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


# ---- happy paths through the official client ------------------------------------------------------------
def test_models_list_has_base_model_and_prompt(oai):
    models = {m.id: m for m in oai.models.list().data}
    assert SMOLLM_NAME in models
    assert PROMPT in models
    extra = models[PROMPT].model_extra or {}
    assert extra.get("num_virtual_tokens") == K
    assert extra.get("root") == SMOLLM_NAME


def test_completion(oai):
    r = oai.completions.create(model=SMOLLM_NAME, prompt=TEXT, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == SMOLLM_NAME
    assert len(r.choices) == 1 and isinstance(r.choices[0].text, str) and r.choices[0].text
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat(oai):
    r = oai.chat.completions.create(model=PROMPT, messages=[{"role": "user", "content": "Say hello."}],
                                    max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.model == PROMPT
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and msg.content
    assert r.choices[0].finish_reason in ("length", "stop")


def test_pinned_version_same_as_latest(oai, http):
    version = http.get(f"/v1/prompts/{PROMPT}").json()["version"]
    kwargs = dict(prompt=TEXT, max_tokens=6, temperature=0)
    latest = oai.completions.create(model=PROMPT, **kwargs)
    pinned = oai.completions.create(model=f"{PROMPT}@{version}", **kwargs)
    assert pinned.model == f"{PROMPT}@{version}"
    assert pinned.choices[0].text == latest.choices[0].text


@pytest.mark.parametrize("model", [SMOLLM_NAME, PROMPT])
def test_streaming_completion_equals_greedy(oai, model):
    kwargs = dict(model=model, prompt=TEXT, max_tokens=16, temperature=0)
    full = oai.completions.create(**kwargs)
    deltas, finish = [], []
    for chunk in oai.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        for ch in chunk.choices:
            deltas.append(ch.text)
            if ch.finish_reason:
                finish.append(ch.finish_reason)
        if chunk.usage is not None:
            assert chunk.usage.completion_tokens == full.usage.completion_tokens
    assert "".join(deltas) == full.choices[0].text
    assert finish == [full.choices[0].finish_reason]


@pytest.mark.parametrize("model", [SMOLLM_NAME, PROMPT])
def test_streaming_chat_equals_greedy(oai, model):
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=16, temperature=0)
    full = oai.chat.completions.create(**kwargs)
    deltas, roles, finish = [], [], []
    for chunk in oai.chat.completions.create(**kwargs, stream=True):
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            if ch.delta.content:
                deltas.append(ch.delta.content)
            if ch.finish_reason:
                finish.append(ch.finish_reason)
    assert roles == ["assistant"]
    assert "".join(deltas) == full.choices[0].message.content
    assert finish == [full.choices[0].finish_reason]


def test_openai_error_mapping(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.completions.create(model="no-such-prompt", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-prompt", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=SMOLLM_NAME, prompt="hello " * (MAX_MODEL_LEN + 100), max_tokens=4)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=PROMPT, messages=[{"role": "user", "content": "hello " * (MAX_MODEL_LEN + 100)}])
    with pytest.raises(openai.NotFoundError):  # streaming requests fail before the stream starts
        oai.completions.create(model="no-such-prompt", prompt="hi", max_tokens=2, stream=True)


# ---- bad input over raw HTTP ---------------------------------------------------------------------------------
def _json(payload):
    return {"content": json.dumps(payload).encode(), "headers": {"content-type": "application/json"}}


C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = {
    # id: (path, request kwargs, status, code, param)
    "unknown-prompt": (C, _json({"model": "no-such-prompt", "prompt": "hi"}), 404, "model_not_found", "model"),
    "unknown-version": (C, _json({"model": f"{PROMPT}@000000000000", "prompt": "hi"}), 404, "model_not_found", "model"),
    "other-tenant": (C, _json({"model": f"acme/{PROMPT}", "prompt": "hi"}), 404, "model_not_found", "model"),
    "unknown-public": (C, _json({"model": "public/nothing", "prompt": "hi"}), 404, "model_not_found", "model"),
    "malformed-ref": (C, _json({"model": "a/b/c@", "prompt": "hi"}), 404, "model_not_found", "model"),
    "unknown-prompt-chat": (CHAT, _json({"model": "no-such-prompt", "messages": USER}), 404, "model_not_found", "model"),
    "unknown-prompt-stream": (C, _json({"model": "nope", "prompt": "hi", "stream": True}), 404, "model_not_found", "model"),
    "negative-max-tokens": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "max_tokens": -5}), 400, None, "max_tokens"),
    # max_tokens 0 is valid on /v1/completions (score the prompt only), not on chat.
    "zero-max-tokens-chat": (CHAT, _json({"model": SMOLLM_NAME, "messages": USER, "max_tokens": 0}), 400, None, "max_tokens"),
    "negative-max-tokens-chat": (CHAT, _json({"model": SMOLLM_NAME, "messages": USER, "max_tokens": -1}), 400, None, "max_tokens"),
    "max-tokens-over-context": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "max_tokens": 2 * MAX_MODEL_LEN}), 400,
                                "context_length_exceeded", "max_tokens"),
    "huge-max-tokens": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "max_tokens": 10**6}), 400,
                        "context_length_exceeded", "max_tokens"),
    "huge-max-tokens-chat": (CHAT, _json({"model": SMOLLM_NAME, "messages": USER, "max_tokens": 10**6}), 400,
                             "context_length_exceeded", None),
    "too-long-prompt": (C, _json({"model": SMOLLM_NAME, "prompt": "hello " * (MAX_MODEL_LEN + 100), "max_tokens": 4}),
                        400, "context_length_exceeded", None),
    "too-long-chat": (CHAT, _json({"model": SMOLLM_NAME, "messages": [{"role": "user", "content": "hello " * (MAX_MODEL_LEN + 100)}]}),
                      400, "context_length_exceeded", None),
    "malformed-json": (C, {"content": b'{"model": "x", "prompt": ', "headers": {"content-type": "application/json"}},
                       400, "invalid_json", None),
    "malformed-json-chat": (CHAT, {"content": b"{not json}", "headers": {"content-type": "application/json"}},
                            400, "invalid_json", None),
    "json-array-body": (C, _json([1, 2, 3]), 400, None, None),
    "empty-object": (C, _json({}), 400, None, None),
    "missing-model": (C, _json({"prompt": "hi"}), 400, None, "model"),
    "max-tokens-string": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "max_tokens": "ten"}), 400, None, "max_tokens"),
    "prompt-int": (C, _json({"model": SMOLLM_NAME, "prompt": 5}), 400, None, None),
    "prompt-dict": (C, _json({"model": SMOLLM_NAME, "prompt": {"a": 1}}), 400, None, None),
    "model-int": (C, _json({"model": 3, "prompt": "hi"}), 400, None, "model"),
    "temperature-string": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "temperature": "hot"}), 400, None, "temperature"),
    "temperature-negative": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "temperature": -1}), 400, None, "temperature"),
    "n-zero": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "n": 0}), 400, None, "n"),
    "logprobs-too-many": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "logprobs": 50}), 400, None, "logprobs"),
    "too-many-stops": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "stop": [str(i) for i in range(9)]}), 400, None, "stop"),
    "messages-string": (CHAT, _json({"model": SMOLLM_NAME, "messages": "hi"}), 400, None, None),
    "messages-empty": (CHAT, _json({"model": SMOLLM_NAME, "messages": []}), 400, None, None),
    "bad-role": (CHAT, _json({"model": SMOLLM_NAME, "messages": [{"role": "wizard", "content": "hi"}]}), 400, None, None),
    "empty-prompt": (C, _json({"model": SMOLLM_NAME, "prompt": ""}), 400, "empty_prompt", "prompt"),
    "empty-prompt-soft": (C, _json({"model": PROMPT, "prompt": ""}), 400, "empty_prompt", "prompt"),
    "empty-prompt-list": (C, _json({"model": SMOLLM_NAME, "prompt": []}), 400, "empty_prompt", "prompt"),
    "empty-prompt-in-batch": (C, _json({"model": SMOLLM_NAME, "prompt": ["hi", ""]}), 400, "empty_prompt", "prompt"),
    "token-id-out-of-vocab": (C, _json({"model": SMOLLM_NAME, "prompt": [10**9]}), 400, "invalid_token_id", "prompt"),
    "negative-token-id": (C, _json({"model": SMOLLM_NAME, "prompt": [1, -3]}), 400, "invalid_token_id", "prompt"),
    "suffix-unsupported": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "suffix": "x"}), 400, "unsupported_parameter", "suffix"),
    "tools-unsupported": (CHAT, _json({"model": SMOLLM_NAME, "messages": USER, "tools": [{"type": "function"}]}), 400,
                          "unsupported_parameter", "tools"),
    "unknown-field": (C, _json({"model": SMOLLM_NAME, "prompt": "hi", "frobnicate": 1}), 400, "unsupported_parameter",
                      "frobnicate"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_openai_error(http, case):
    path, kwargs, status, code, param = BAD_REQUESTS[case]
    r = http.post(path, **kwargs)
    err = assert_openai_error(r, status, code, param)
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize("max_tokens", [2 * MAX_MODEL_LEN, 10**6])
def test_huge_max_tokens_message_names_the_numbers(http, max_tokens):
    """The client must learn the context length and what it asked for (OpenAI: "This model's maximum
    context length is N tokens. However, you requested M tokens")."""
    r = http.post(C, json={"model": SMOLLM_NAME, "prompt": "hi", "max_tokens": max_tokens})
    msg = assert_openai_error(r, 400, "context_length_exceeded")["message"]
    assert str(MAX_MODEL_LEN) in msg and str(max_tokens) in msg, msg


def test_virtual_tokens_count_against_the_context(http, tokenizer):
    """prompt + max_tokens fit the base model exactly, but not once the soft prompt's k is added."""
    n_prompt = len(tokenizer(TEXT).input_ids)
    max_tokens = MAX_MODEL_LEN - n_prompt  # exactly fits without virtual tokens
    r = http.post(C, json={"model": PROMPT, "prompt": TEXT, "max_tokens": max_tokens})
    msg = assert_openai_error(r, 400, "context_length_exceeded", "max_tokens")["message"]
    assert f"{K} virtual" in msg and f"{n_prompt} prompt" in msg and str(max_tokens) in msg, msg


def test_too_long_prompt_message_names_the_numbers(http, tokenizer):
    text = "hello " * (MAX_MODEL_LEN + 100)
    n_prompt = len(tokenizer(text).input_ids)
    r = http.post(C, json={"model": SMOLLM_NAME, "prompt": text, "max_tokens": 4})
    msg = assert_openai_error(r, 400, "context_length_exceeded")["message"]
    assert str(MAX_MODEL_LEN) in msg and str(n_prompt) in msg, msg


def test_server_healthy_after_bad_input(http, server):
    for path, kwargs, status, _, _ in BAD_REQUESTS.values():
        assert http.post(path, **kwargs).status_code == status
    assert server.is_alive()
    assert http.get("/health").status_code == 200
    r = http.get("/ready")
    assert r.status_code == 200 and r.json()["model"] == SMOLLM_NAME
    r = http.post(C, json={"model": PROMPT, "prompt": TEXT, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    r = http.post(CHAT, json={"model": SMOLLM_NAME, "messages": USER, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


# ---- sampling features -----------------------------------------------------------------------------------
def test_n2_with_seed(http):
    body = {"model": PROMPT, "prompt": TEXT, "max_tokens": 8, "n": 2, "seed": 1234, "temperature": 1.0,
            "ignore_eos": True}
    a = http.post(C, json=body)
    assert a.status_code == 200, a.text
    a = a.json()
    assert [c["index"] for c in a["choices"]] == [0, 1]
    assert all(isinstance(c["text"], str) and c["finish_reason"] == "length" for c in a["choices"])
    assert a["usage"]["completion_tokens"] == 16
    b = http.post(C, json=body).json()
    assert [c["text"] for c in b["choices"]] == [c["text"] for c in a["choices"]], "same seed, same samples"
    with http.stream("POST", C, json={**body, "stream": True}) as resp:
        events = [e for e in iter_sse(resp.iter_lines()) if e != "[DONE]"]
    streamed: dict[int, str] = {}
    for e in events:
        for ch in e["choices"]:
            streamed[ch["index"]] = streamed.get(ch["index"], "") + ch["text"]
    assert streamed == {c["index"]: c["text"] for c in a["choices"]}, "streamed samples differ from non-streamed"
    chat = http.post(CHAT, json={**{k: v for k, v in body.items() if k != "prompt"}, "messages": USER}).json()
    assert [c["index"] for c in chat["choices"]] == [0, 1]


def _stop_for(text: str) -> str:
    """Three characters from the middle of `text` (the test cuts at their first occurrence)."""
    assert len(text) >= 8, text
    return text[len(text) // 2: len(text) // 2 + 3]


def test_stop_strings_are_not_included(http):
    base = {"model": PROMPT, "prompt": TEXT, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    full = http.post(C, json=base).json()["choices"][0]["text"]
    stop = _stop_for(full)
    cut = full[: full.index(stop)]
    r = http.post(C, json={**base, "stop": [stop, "NEVER-APPEARS-XYZ"]}).json()["choices"][0]
    assert r["text"] == cut and stop not in r["text"], (full, stop, r)
    assert r["finish_reason"] == "stop"
    # streamed: the held-back start of the stop string must not leak either
    with http.stream("POST", C, json={**base, "stop": stop, "stream": True}) as resp:
        assert resp.status_code == 200
        events = list(iter_sse(resp.iter_lines()))
    assert events[-1] == "[DONE]"
    text = "".join(ch["text"] for e in events[:-1] for ch in e["choices"])
    finish = [ch["finish_reason"] for e in events[:-1] for ch in e["choices"] if ch["finish_reason"]]
    assert text == cut and finish == ["stop"], (full, stop, text)


def test_stop_strings_chat(http):
    chat = {"model": SMOLLM_NAME, "messages": USER, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    full = http.post(CHAT, json=chat).json()["choices"][0]["message"]["content"]
    stop = _stop_for(full)
    got = http.post(CHAT, json={**chat, "stop": stop}).json()["choices"][0]
    assert got["message"]["content"] == full[: full.index(stop)], (full, stop, got)
    assert got["finish_reason"] == "stop"


def test_usage_virtual_tokens(http, tokenizer):
    n_prompt = len(tokenizer(TEXT).input_ids)
    body = {"prompt": TEXT, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    soft = http.post(C, json={**body, "model": PROMPT}).json()["usage"]
    plain = http.post(C, json={**body, "model": SMOLLM_NAME}).json()["usage"]
    assert soft["virtual_tokens"] == K and plain["virtual_tokens"] == 0
    assert soft["prompt_tokens"] == plain["prompt_tokens"] == n_prompt
    assert soft["total_tokens"] == n_prompt + 3
    # a batch of two prompts: virtual tokens per prompt
    two = http.post(C, json={**body, "model": PROMPT, "prompt": [TEXT, TEXT]}).json()["usage"]
    assert two["virtual_tokens"] == 2 * K and two["prompt_tokens"] == 2 * n_prompt
    chat = http.post(CHAT, json={"model": PROMPT, "messages": USER, "max_tokens": 3}).json()["usage"]
    chat_plain = http.post(CHAT, json={"model": SMOLLM_NAME, "messages": USER, "max_tokens": 3}).json()["usage"]
    assert chat["virtual_tokens"] == K and chat["prompt_tokens"] == chat_plain["prompt_tokens"]
    # pinned version and streamed usage agree
    version = http.get(f"/v1/prompts/{PROMPT}").json()["version"]
    pinned = http.post(C, json={**body, "model": f"{PROMPT}@{version}"}).json()["usage"]
    assert pinned == soft
    with http.stream("POST", C, json={**body, "model": PROMPT, "stream": True,
                                      "stream_options": {"include_usage": True}}) as resp:
        events = [e for e in iter_sse(resp.iter_lines()) if e != "[DONE]"]
    assert events[-1]["usage"] == soft


@pytest.mark.parametrize("model", [SMOLLM_NAME, PROMPT])
def test_logprobs_top3(http, model):
    r = http.post(C, json={"model": model, "prompt": TEXT, "max_tokens": 6, "temperature": 0, "logprobs": 3,
                           "ignore_eos": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    for tok, tok_lp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert isinstance(top, dict) and len(top) == 3, top
        assert all(v <= 0.0 for v in top.values())
        assert tok_lp <= 0.0
        # greedy: the chosen token is the most likely one
        assert tok in top and top[tok] == pytest.approx(max(top.values()), abs=1e-5), (tok, tok_lp, top)
    chat = http.post(CHAT, json={"model": model, "messages": USER, "max_tokens": 4, "temperature": 0,
                                 "logprobs": True, "top_logprobs": 3, "ignore_eos": True}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    assert all(len(item["top_logprobs"]) == 3 for item in content)
