"""Parity with PEFT on the real SmolLM2-135M-Instruct, fp32: our greedy tokens == PEFT's, token for token.

The PEFT reference is a greedy loop over `PeftModel.forward` with full recompute (no cache):
`PeftModel.generate` is wrong for prompt tuning on transformers 5.x (shared/notes/peft-prompt-format.md).
"""

from __future__ import annotations


import pytest
import torch
from fastapi.testclient import TestClient

from tests.support.engine_utils import make_engine, run
from tests.support.peft_reference import PROMPTS, peft_greedy
from softserve.service.runtime import LoadedModel
from softserve.app import create_app
from softserve.config import Settings
from softserve.engine.request import Request, SamplingParams, SoftPrompt, SoftPromptRef

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def peft_adapters(smollm, tmp_path_factory):
    """Three PEFT prompt-tuning adapters (k = 4, 8, 20) made and saved with peft itself."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    model, _ = smollm
    embed = model.get_input_embeddings().weight
    adapters = {}
    for i, k in enumerate((4, 8, 20)):
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k, prompt_tuning_init=PromptTuningInit.RANDOM)
        peft_model = get_peft_model(model, config)
        gen = torch.Generator().manual_seed(i)
        rows = embed[torch.randint(0, embed.shape[0], (k,), generator=gen)]
        with torch.no_grad():  # realistic scale: vocabulary embeddings plus noise, like a trained prompt
            peft_model.prompt_encoder["default"].embedding.weight.copy_(rows + 0.02 * torch.randn(rows.shape, generator=gen))
        directory = tmp_path_factory.mktemp(f"adapter{k}")
        peft_model.save_pretrained(directory)
        adapters[f"pt{k}"] = directory
    return adapters




@pytest.fixture(scope="module")
def references(smollm, peft_adapters):
    model, tok = smollm
    eos = {tok.eos_token_id}
    return {
        (name, prompt): peft_greedy(model, directory, tok(prompt).input_ids, MAX_TOKENS, eos)
        for name, directory in peft_adapters.items()
        for prompt in PROMPTS[:2]
    }


def test_server_greedy_equals_peft_reference(smollm, peft_adapters, references, tmp_path):
    model, tok = smollm
    # Not vacuous: the adapters change the output, and most continuations run the full length.
    for prompt in PROMPTS[:2]:
        assert len({tuple(v) for (_, p), v in references.items() if p == prompt}) >= 2
    assert sum(len(v) == MAX_TOKENS for v in references.values()) >= len(references) // 2
    app = create_app(Settings(store=str(tmp_path / "store")), loaded=LoadedModel(model, tok, "SmolLM2-135M-Instruct"))
    with TestClient(app) as client:
        for name, directory in peft_adapters.items():
            files = {
                "adapter_config": ("adapter_config.json", (directory / "adapter_config.json").read_bytes(), "application/json"),
                "adapter_model": ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes()),
            }
            assert client.put(f"/v1/prompts/{name}", files=files).status_code == 201
        for (name, prompt), ref in references.items():
            body = {"model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            got_text = choice["text"]
            assert got_text == tok.decode(ref, skip_special_tokens=True), (name, prompt)
            assert len(choice["logprobs"]["tokens"]) == len(ref)
            assert r.json()["usage"]["virtual_tokens"] == int(name[2:])


@pytest.mark.parametrize("max_prefill_tokens", [4096, 5], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_batch_equals_peft_reference(smollm, peft_adapters, references, max_prefill_tokens):
    """8 rows, 3 adapters of different k plus rows with no prompt, different input lengths, one batch.

    Every prompt is cold at first, so its KV is computed inline; with a budget of 5 tokens per step the
    k=20 prompt and every input are split over several steps while earlier rows already decode.
    """
    from safetensors.torch import load

    model, tok = smollm
    engine = make_engine(model, tok, max_prefill_tokens=max_prefill_tokens)
    prompts = {}
    for name, directory in peft_adapters.items():
        emb = load((directory / "adapter_model.safetensors").read_bytes())["prompt_embeddings"]
        prompts[name] = SoftPrompt(SoftPromptRef(name, "v", f"sha-{name}", emb.shape[0]), emb)
    cases = [(name, text) for name in prompts for text in PROMPTS[:2]] + [(None, PROMPTS[2]), (None, PROMPTS[3])]
    requests = [
        Request(request_id=f"r{i}", prompt_ids=tok(text).input_ids,
                sampling=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), soft_prompt=prompts.get(name))
        for i, (name, text) in enumerate(cases)
    ]
    got = run(engine, requests)
    for request, (name, text) in zip(requests, cases):
        if name is None:
            expected = _plain_greedy(model, tok, text)
        else:
            expected = references[(name, text)]
        assert got[request.request_id] == expected, (name, text)


@torch.inference_mode()
def _plain_greedy(model, tok, text: str) -> list[int]:
    ids = tok(text).input_ids
    out = []
    for _ in range(MAX_TOKENS):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        if token == tok.eos_token_id:
            break
        ids.append(token)
    return out
