"""bench/vs_vllm.py without vLLM: what the vLLM client sends is what our engine computes, the install fixes,
the vLLM command, and the whole Softserve side of the run (no vLLM is installed by these tests)."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from bench import vs_vllm as V
from tests.support.engine_utils import make_engine, make_prompt, make_request, run


def engine_inputs_embeds(model, tokenizer, prompt_ids, soft_prompt) -> torch.Tensor:
    """The inputs_embeds of the engine's first forward for one request (its whole prefill in one step)."""
    captured: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        if not captured:
            captured.append(kwargs["inputs_embeds"].detach().clone())

    handle = model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(make_engine(model, tokenizer), [make_request(prompt_ids, soft_prompt=soft_prompt, max_tokens=1)])
    finally:
        handle.remove()
    return captured[0][0]  # [tokens, hidden]


@pytest.mark.parametrize("with_prompt", [True, False])
def test_prompt_embeds_are_what_the_engine_computes(tiny_model, tokenizer, with_prompt):
    hidden = tiny_model.config.hidden_size
    soft = make_prompt("p", 5, hidden, seed=3) if with_prompt else None
    ids = [101, 2000, 345, 17, 9000, 42, 7]
    ours = engine_inputs_embeds(tiny_model, tokenizer, ids, soft)
    built = V.prompt_embeds(soft.embeddings if soft else None, ids, tiny_model.get_input_embeddings())
    assert built.shape == ((5 if with_prompt else 0) + len(ids), hidden)
    assert built.dtype == ours.dtype
    assert torch.equal(built, ours)


def test_encoded_prompt_embeds_decode_as_vllm_decodes_them(tiny_model):
    soft = make_prompt("p", 4, tiny_model.config.hidden_size, seed=1).embeddings
    built = V.prompt_embeds(soft, [100, 200, 300], tiny_model.get_input_embeddings())
    payload = V.encode_prompt_embeds(built)
    # vLLM: torch.load(BytesIO(b64decode(prompt_embeds)), weights_only=True); our own bytes, not user data
    decoded = torch.load(io.BytesIO(base64.b64decode(payload, validate=True)), weights_only=True)
    assert decoded.dim() == 2 and torch.equal(decoded, built)


def test_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        V.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--dtype", "--threads", "--rounds", "--vllm-bind", "--servers", "--loads"):
        assert option in text


def test_vllm_dist_info_and_command(tmp_path):
    dist = V.write_vllm_dist_info(tmp_path, "0.32.0")
    assert dist.name == "vllm-0.32.0+cpu.dist-info"
    assert "Name: vllm\n" in (dist / "METADATA").read_text() and "Version: 0.32.0+cpu\n" in (dist / "METADATA").read_text()
    assert (dist / "RECORD").read_text() == ""
    import importlib.metadata

    found = list(importlib.metadata.distributions(path=[str(tmp_path)]))
    assert [(d.metadata["Name"], d.version) for d in found] == [("vllm", "0.32.0+cpu")]

    server = V.VllmServer(tmp_path / "venv", tmp_path / "model", served_name="m", dtype="bfloat16", threads=2,
                          bind=V.thread_binding(2, None), log_dir=tmp_path)
    server.port = 1234
    cmd, env = server.command(), server.environment()
    assert cmd[:3] == [str(tmp_path / "venv" / "bin" / "vllm"), "serve", str(tmp_path / "model")]
    assert "--enable-prompt-embeds" in cmd and cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "1234"
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert V.thread_binding(1, None) == "0" and V.thread_binding(2, "auto") == "auto"


def test_both_servers_get_the_same_requests(tiny_model):
    load = V.LoadSpec("soft", "t", 3, 4, (5, 8), 4, 2, "soft")
    hidden = tiny_model.config.hidden_size
    prompts = {V.prompt_name(load, i): make_prompt("p", 4, hidden, seed=i).embeddings for i in range(3)}
    inputs = [[100 + i, 200 + i, 300 + i, 400 + i, 500] for i in range(3)]
    bodies = V.build_bodies(load, "base", "served", inputs, prompts, tiny_model.get_input_embeddings(), vllm=True)
    for i in (0, 1, 4):  # request 4 = prompt 1 with ids 1 again
        ours, theirs = bodies.softserve(i), bodies.vllm(i)
        assert ours == {"model": f"soft-{i % 3}", "prompt": inputs[i % 3]}
        sent = torch.load(io.BytesIO(base64.b64decode(theirs["prompt_embeds"])), weights_only=True)
        expected = V.prompt_embeds(prompts[f"soft-{i % 3}"], inputs[i % 3], tiny_model.get_input_embeddings())
        assert theirs["model"] == "served" and torch.equal(sent, expected)
    plain = V.build_bodies(V.LoadSpec("plain", "t", 0, 0, (5, 8), 4, 2, "plain"), "base", "served", inputs, {},
                           tiny_model.get_input_embeddings(), vllm=True)
    assert plain.softserve(1) == {"model": "base", "prompt": inputs[1]}
    assert plain.vllm(1) == {"model": "served", "prompt": inputs[1]}


@pytest.mark.slow  # ~23 s on 2 cores: `pytest -m slow`
@pytest.mark.process
def test_softserve_side_runs(tmp_path):
    """Every load against a live Softserve (tiny model), as the full run drives it; no vLLM."""
    out = tmp_path / "vs.json"
    result = V.main(["--quick", "--model", "tiny", "--servers", "softserve", "--threads", "1", "--warmup", "0.5",
                     "--window", "2", "--max-tokens", "2", "--num-prompts", "4", "--classify-prompts", "3", "--json", str(out)])
    assert json.loads(out.read_text())["name"] == "vs_vllm"
    assert [row["load"] for row in result["table"]] == ["soft", "plain", "classify", "batch1"]
    for row in result["table"]:
        assert row["softserve"]["errors"] == 0 and row["softserve"]["requests"] > 0
        assert row["softserve"]["tokens_per_s"] > 0 and row["softserve"]["server_cores"] > 0
        assert "throughput_ratio" not in row  # one server: no ratio


def test_the_prompt_kv_cache_holds_every_loads_prompts():
    """SmolLM2 in bf16: soft (1,000 x k=16) + classify (200 x k=64) prompts' KV with a quarter to spare, rounded
    up to MiB; batch1 reuses soft's prompts; a small set keeps the server's default."""
    from types import SimpleNamespace

    from transformers import LlamaConfig

    smollm2 = SimpleNamespace(config=LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                                                 num_hidden_layers=30))  # all kv_shape reads
    loads = V.load_specs(V.build_parser().parse_args([]))
    per_token = 30 * 2 * 3 * 64 * 2  # bytes of KV per virtual token in bf16
    wanted = (1000 * 16 + 200 * 64) * per_token * 5 // 4
    assert V.prefix_cache_bytes(loads, smollm2, "bfloat16") == -(-wanted // 2**20) * 2**20
    assert V.prefix_cache_bytes(loads, smollm2, "float32") == -(-2 * wanted // 2**20) * 2**20
    soft_only = [x for x in loads if x.name in ("soft", "batch1")]
    assert V.prefix_cache_bytes(soft_only, smollm2, "bfloat16") == 512 * 1024 * 1024  # the server's default
