"""The service layer is usable without HTTP: a Runtime, a soft prompt in its store, and generation driven
from Python give the same tokens as the full-recompute reference, and typed errors come out as such."""

from __future__ import annotations

import asyncio

import pytest

from softserve.config import Settings
from softserve.engine.request import SamplingParams
from softserve.service import prompts as prompt_service
from softserve.service.auth import ApiKeyRegistry, Principal
from softserve.service.errors import InvalidRequest, NotFound
from softserve.service.generation import build_requests, collect, resolve_model
from softserve.service.runtime import LoadedModel, Runtime
from tests.support.engine_utils import reference_greedy
from tests.support.live_server import adapter_config, prompt_bytes


@pytest.fixture()
def runtime(tiny_model, tokenizer, tmp_path):
    runtime = Runtime(settings=Settings(store=str(tmp_path / "store"), max_model_len=256),
                      registry=ApiKeyRegistry.disabled())
    runtime.build(LoadedModel(tiny_model, tokenizer, "tiny"))
    assert runtime.is_ready, runtime.load_error
    yield runtime
    runtime.close()


def generate(runtime: Runtime, principal: Principal, model: str, prompt_ids: list[int], max_tokens: int) -> list[int]:
    async def run() -> list[int]:
        resolved = resolve_model(runtime, principal, model)
        greedy = SamplingParams(max_tokens=0, temperature=0.0, ignore_eos=True)
        requests, choices = await build_requests(runtime, principal, resolved, [prompt_ids], greedy, 1, max_tokens)
        await collect(runtime, requests, choices)
        return choices[0].token_ids

    return asyncio.run(run())


def test_generation_with_a_soft_prompt_without_http(runtime, tiny_model, tokenizer):
    acme = Principal("acme", "user")
    hidden = tiny_model.config.hidden_size
    ref = prompt_service.check_upload_target(acme, "greeter")
    meta, _ = prompt_service.upload(runtime.store, ref, prompt_bytes(3, 5, hidden), adapter_config(5), None)
    prompt_ids = tokenizer("Hello there").input_ids

    tokens = generate(runtime, acme, "greeter", prompt_ids, max_tokens=6)

    loaded = runtime.cache.acquire(meta)
    try:
        expected = reference_greedy(tiny_model, prompt_ids, loaded, 6)
    finally:
        runtime.cache.release(meta.sha256)
    assert tokens == expected
    base = reference_greedy(tiny_model, prompt_ids, None, 6)
    assert expected != base  # the soft prompt really changes the output, so the equality above means something
    assert generate(runtime, acme, "tiny", prompt_ids, max_tokens=6) == base


def test_typed_errors_without_http(runtime, tiny_model, tokenizer):
    acme, beta = Principal("acme", "user"), Principal("beta", "user")
    ref = prompt_service.check_upload_target(acme, "mine")
    prompt_service.upload(runtime.store, ref, prompt_bytes(1, 4, tiny_model.config.hidden_size), adapter_config(4), None)
    with pytest.raises(NotFound):  # another tenant's prompt is simply not there
        resolve_model(runtime, beta, "acme/mine")
    with pytest.raises(InvalidRequest) as too_long:
        generate(runtime, acme, "mine", tokenizer("x").input_ids, max_tokens=10_000)
    assert too_long.value.code == "context_length_exceeded" and too_long.value.param == "max_tokens"
