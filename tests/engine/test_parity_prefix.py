"""Prefix tuning and composed prompts on the real SmolLM2-135M-Instruct (fp32) == PEFT, token for token.

References are greedy full-recompute loops over `PeftModel.forward` (test_parity_peft.peft_greedy). A
composition's reference is PEFT with one adapter holding the parts' tensors concatenated along k.
"""

from __future__ import annotations

import io
import json
import zipfile
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load, save_file

from tests.support.engine_utils import make_engine, run
from softserve.store.compose import composed_sha256
from softserve.service.runtime import LoadedModel
from softserve.app import create_app
from softserve.config import Settings
from softserve.engine.request import Request, SamplingParams, SoftPrompt, SoftPromptRef
from tests.support.peft_reference import PROMPTS, peft_greedy

N_TOKENS = 8  # greedy tokens per row (the PEFT reference recomputes the whole sequence per token)

# name -> (kind, k, seed, prefix_projection)
ADAPTERS = {"pfx6": ("prefix", 6, 11, False), "pfx4proj": ("prefix", 4, 12, True), "pt5": ("prompt", 5, 13, False),
            "pt3": ("prompt", 3, 14, False)}
COMPOSED = {"pfx6+pfx4proj": ("pfx6", "pfx4proj"), "pt5+pt3": ("pt5", "pt3")}


def _tensor(directory) -> torch.Tensor:
    return load((directory / "adapter_model.safetensors").read_bytes())["prompt_embeddings"]


@pytest.fixture(scope="module")
def adapters(smollm, tmp_path_factory):
    """PEFT adapters made and saved by peft itself, plus one concatenated adapter per composition."""
    from peft import PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    model, _ = smollm
    embed = model.get_input_embeddings().weight
    dirs = {}
    for name, (kind, k, seed, projection) in ADAPTERS.items():
        gen = torch.Generator().manual_seed(seed)
        if kind == "prefix":
            config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k, prefix_projection=projection,
                                        encoder_hidden_size=64)
            peft_model = get_peft_model(model, config)
            with torch.no_grad():
                for p in peft_model.prompt_encoder["default"].parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if projection else 1.0))
        else:
            config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=k, prompt_tuning_init=PromptTuningInit.RANDOM)
            peft_model = get_peft_model(model, config)
            rows = embed[torch.randint(0, embed.shape[0], (k,), generator=gen)]
            with torch.no_grad():
                # Noise at twice the embeddings' spread: milder prompts leave "Paris" unchanged (vacuous parity).
                noise = 2 * float(embed.std()) * torch.randn(rows.shape, generator=gen)
                peft_model.prompt_encoder["default"].embedding.weight.copy_(rows + noise)
        dirs[name] = tmp_path_factory.mktemp(name)
        peft_model.save_pretrained(dirs[name])
    for name, parts in COMPOSED.items():
        directory = tmp_path_factory.mktemp(name.replace("+", "_"))
        tensor = torch.cat([_tensor(dirs[p]) for p in parts])
        config = json.loads((dirs[parts[0]] / "adapter_config.json").read_text())
        config.update(num_virtual_tokens=int(tensor.shape[0]), prefix_projection=False)
        (directory / "adapter_config.json").write_text(json.dumps(config))
        save_file({"prompt_embeddings": tensor.contiguous()}, directory / "adapter_model.safetensors")
        dirs[name] = directory
    return dirs


# Every adapter and composition on one input (so their outputs can be told apart), plain rows on two.
CASES = [(name, PROMPTS[0]) for name in [*ADAPTERS, *COMPOSED]] + [(None, PROMPTS[0]), (None, PROMPTS[2])]


@pytest.fixture(scope="module")
def prefix_references(smollm, adapters):
    model, tok = smollm
    eos = {tok.eos_token_id}
    return {(name, p): (peft_greedy(model, adapters[name], tok(p).input_ids, N_TOKENS, eos) if name
                        else plain_greedy(model, tok, p)) for name, p in CASES}


@torch.inference_mode()
def plain_greedy(model, tok, text: str) -> list[int]:
    ids, out = tok(text).input_ids, []
    for _ in range(N_TOKENS):
        out.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        if out[-1] == tok.eos_token_id:
            break
        ids.append(out[-1])
    return out


def test_references_are_not_vacuous(prefix_references):
    same_input = [tuple(v) for (name, p), v in prefix_references.items() if p == PROMPTS[0]]
    assert len(set(same_input)) >= len(same_input) - 2  # the adapters change the output
    plain = prefix_references[(None, PROMPTS[0])]
    for name in [*ADAPTERS, *COMPOSED]:
        assert prefix_references[(name, PROMPTS[0])] != plain, name
    for name, parts in COMPOSED.items():  # a composition is neither of its parts
        assert all(prefix_references[(name, PROMPTS[0])] != prefix_references[(p, PROMPTS[0])] for p in parts), name


def test_http_prefix_and_composed_equal_peft(smollm, adapters, prefix_references, tmp_path):
    model, tok = smollm
    settings = Settings(store=str(tmp_path / "store"), max_model_len=256, max_batch_size=8)
    app = create_app(settings, loaded=LoadedModel(model, tok, "SmolLM2-135M-Instruct"))
    with TestClient(app) as client:
        for name in ADAPTERS:
            files = {"adapter_config": ("adapter_config.json", (adapters[name] / "adapter_config.json").read_bytes()),
                     "adapter_model": ("adapter_model.safetensors", (adapters[name] / "adapter_model.safetensors").read_bytes())}
            r = client.put(f"/v1/prompts/{name}", files=files)
            assert r.status_code == 201, r.text
            assert r.json()["kind"] == ("prefix_tuning" if ADAPTERS[name][0] == "prefix" else "prompt_tuning")
        for (name, prompt), ref in prefix_references.items():
            body = {"model": name or "SmolLM2-135M-Instruct", "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True), (name, prompt)
            k = sum(ADAPTERS[p][1] for p in COMPOSED[name]) if name in COMPOSED else (ADAPTERS[name][1] if name else 0)
            assert r.json()["usage"]["virtual_tokens"] == k
        # The downloaded prefix adapter loads in PEFT and gives the same output.
        down = tmp_path / "down"
        zipfile.ZipFile(io.BytesIO(client.get("/v1/prompts/pfx4proj/download").content)).extractall(down)
        ids = tok(PROMPTS[0]).input_ids
        assert peft_greedy(model, down, ids, N_TOKENS, {tok.eos_token_id}) == prefix_references[("pfx4proj", PROMPTS[0])]


@pytest.mark.parametrize("max_prefill_tokens", [4096, 7], ids=["whole-prompts", "chunked-prefill"])
def test_mixed_batch_prefix_prompt_plain_and_composed_rows_equal_peft(smollm, adapters, prefix_references, max_prefill_tokens):
    """One engine, all rows submitted together: prefix-tuned, prompt-tuned, plain and composed (both kinds)."""
    model, tok = smollm
    soft = {}
    for name in ADAPTERS:
        kind = "prefix_tuning" if ADAPTERS[name][0] == "prefix" else "prompt_tuning"
        t = _tensor(adapters[name])
        soft[name] = SoftPrompt(SoftPromptRef(name, "v", f"sha-{name}", t.shape[0]), t, kind=kind)
    for name, parts in COMPOSED.items():  # as the API builds them: parts concatenated, hash of the parts' hashes
        t = torch.cat([soft[p].embeddings for p in parts])
        sha = composed_sha256([SimpleNamespace(sha256=soft[p].ref.sha256) for p in parts])
        soft[name] = SoftPrompt(SoftPromptRef(name, sha[:12], sha, t.shape[0]), t, kind=soft[parts[0]].kind)
    requests = [Request(request_id=f"r{i}", prompt_ids=tok(text).input_ids,
                        sampling=SamplingParams(max_tokens=N_TOKENS, temperature=0.0), soft_prompt=soft.get(name))
                for i, (name, text) in enumerate(CASES)]
    engine = make_engine(model, tok, max_prefill_tokens=max_prefill_tokens)
    got = run(engine, requests)
    for request, case in zip(requests, CASES):
        assert got[request.request_id] == prefix_references[case], case

