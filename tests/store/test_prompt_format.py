"""Upload validation, content hashing and PEFT-compatible export (real PEFT adapters, tiny Llama)."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from softserve.store.backends import MemoryBackend
from softserve.store.format import content_sha256, export_adapter, parse_upload
from softserve.store.store import PromptStore
from softserve.store.types import PromptValidationError
from tests.support.prompts import H, MODEL

peft = pytest.importorskip("peft")
from peft import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


@pytest.fixture(scope="module")
def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=H, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )


def _save_peft(cfg: LlamaConfig, peft_cfg, out: Path) -> torch.Tensor:
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(cfg), peft_cfg)
    model.save_pretrained(str(out))
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]


@pytest.fixture(scope="module")
def pt_adapter(llama_config, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    d = tmp_path_factory.mktemp("pt")
    t = _save_peft(llama_config, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="RANDOM"), d)
    return d, t


def _files(d: Path) -> tuple[bytes, bytes]:
    return (d / "adapter_model.safetensors").read_bytes(), (d / "adapter_config.json").read_bytes()


def _st(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    return st_save(tensors, metadata=metadata)


def _cfg(**kw) -> bytes:
    base = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}
    base.update(kw)
    return json.dumps({k: v for k, v in base.items() if v is not None}).encode()


def _reject(model_bytes: bytes, cfg: bytes | None, status: int, match: str, **kw) -> None:
    with pytest.raises(PromptValidationError, match=match) as ei:
        parse_upload(model_bytes, cfg, MODEL, **kw)
    assert ei.value.status_code == status, ei.value.message


def _export_and_load(llama_config, store: PromptStore, meta, out: Path):
    data = store.export_zip(meta)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert sorted(zf.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
        zf.extractall(out)
    return PeftModel.from_pretrained(LlamaForCausalLM(llama_config), str(out))


# ---- round trips -------------------------------------------------------------------------------


def test_peft_round_trip(pt_adapter, llama_config, tmp_path):
    d, original = pt_adapter
    store = PromptStore(MemoryBackend(), MODEL)
    meta, warnings = store.put("acme", "pt", *_files(d), "demo")
    assert warnings == []
    assert (meta.num_virtual_tokens, meta.token_dim, meta.dtype, meta.peft_type) == (5, H, "float32", "PROMPT_TUNING")
    loaded = _export_and_load(llama_config, store, meta, tmp_path / "out")
    w = loaded.prompt_encoder["default"].embedding.weight
    assert torch.equal(w.detach(), original)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["prompt_tuning_init"] == "RANDOM" and cfg["inference_mode"] is True
    assert cfg["num_layers"] == 2 and cfg["num_attention_heads"] == 4 and cfg["token_dim"] == H


def test_bare_safetensors_upload_exports_loadable(llama_config, tmp_path):
    t = torch.randn(3, H, dtype=torch.bfloat16)
    store = PromptStore(MemoryBackend(), MODEL)
    meta, _ = store.put("acme", "bare", _st({"whatever": t}), None)
    assert meta.dtype == "bfloat16" and meta.peft_type == "PROMPT_TUNING"
    assert torch.equal(store.load_tensor(meta), t)
    loaded = _export_and_load(llama_config, store, meta, tmp_path / "out")
    # PEFT upcasts the bf16 tensor on load
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight.detach(), t.float())


def test_p_tuning_accepted_and_round_trips(llama_config, tmp_path):
    d = tmp_path / "ptun"
    original = _save_peft(llama_config, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32), d)
    store = PromptStore(MemoryBackend(), MODEL)
    meta, _ = store.put("acme", "ptun", *_files(d), None)
    assert meta.peft_type == "P_TUNING" and meta.num_virtual_tokens == 4
    loaded = _export_and_load(llama_config, store, meta, tmp_path / "out")
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight.detach(), original)


def test_prefix_tuning_checked_against_kv_heads_and_round_trips(llama_config, tmp_path):
    d = tmp_path / "prefix"
    original = _save_peft(llama_config, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4), d)
    # MODEL leaves out the KV heads (so assumes 4, no GQA): PEFT's tensor for 2 KV heads does not fit it.
    with pytest.raises(PromptValidationError, match=r"128 columns; .* = 2 \* 2 \* 4 \* 16 = 256") as ei:
        parse_upload(*_files(d), MODEL)
    assert ei.value.status_code == 422
    gqa = dataclasses.replace(MODEL, num_key_value_heads=2)
    store = PromptStore(MemoryBackend(), gqa)
    meta, _ = store.put("acme", "prefix", *_files(d), None)
    assert (meta.peft_type, meta.kind, meta.num_virtual_tokens, meta.token_dim) == ("PREFIX_TUNING", "prefix_tuning", 4, 128)
    loaded = _export_and_load(llama_config, store, meta, tmp_path / "out")
    assert torch.equal(loaded.prompt_encoder["default"].embedding.weight.detach(), original)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["token_dim"], cfg["num_attention_heads"], cfg["num_layers"]) == (32, 2, 2)  # what PEFT writes for GQA


def test_unsupported_peft_type_rejected():
    _reject(_st({"prompt_embeddings": torch.randn(4, H)}), _cfg(peft_type="LORA"), 422, "unsupported peft_type LORA")


# ---- one test per rule -------------------------------------------------------------------------


def test_wrong_hidden_size():
    _reject(_st({"prompt_embeddings": torch.randn(4, 32)}), _cfg(), 422, "token_dim 32 .* hidden_size 64")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite(bad):
    t = torch.randn(4, H)
    t[1, 3] = bad
    _reject(_st({"prompt_embeddings": t}), _cfg(), 422, "non-finite")


def test_zero_virtual_tokens():
    _reject(_st({"prompt_embeddings": torch.zeros(0, H)}), None, 422, "num_virtual_tokens 0")


def test_too_many_virtual_tokens():
    _reject(_st({"prompt_embeddings": torch.randn(9, H)}), None, 422, "num_virtual_tokens 9", max_virtual_tokens=8)


def test_wrong_key_with_config():
    _reject(_st({"emb": torch.randn(4, H)}), _cfg(), 400, r"expected exactly one tensor 'prompt_embeddings', found \['emb'\]")


def test_extra_tensor():
    blob = _st({"prompt_embeddings": torch.randn(4, H), "extra": torch.randn(2)})
    _reject(blob, _cfg(), 400, "expected exactly one tensor")
    _reject(blob, None, 400, "expected exactly one tensor")


def test_truncated_file():
    blob = _st({"prompt_embeddings": torch.randn(4, H)})
    _reject(blob[:-10], None, 400, "truncated")
    _reject(blob[:5], None, 400, "not a safetensors")


def test_garbage():
    _reject(b"hello, this is not a tensor file at all" * 3, None, 400, "not a valid safetensors")


def test_pickle_file():
    _reject(pickle.dumps({"prompt_embeddings": [[0.0] * H] * 4}), None, 400, "not a valid safetensors")


def test_zip_file():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("data.pkl", b"x" * 100)
    _reject(buf.getvalue(), None, 400, "not a valid safetensors")


def test_header_pointing_past_end():
    header = json.dumps({"prompt_embeddings": {"dtype": "F32", "shape": [4, H], "data_offsets": [0, 4 * H * 4]}}).encode()
    _reject(struct.pack("<Q", len(header)) + header + b"\0" * 16, None, 400, "truncated")


def test_huge_file_413_before_parsing():
    _reject(b"\xff" * 2000, None, 413, "limit is 1000", max_bytes=1000)


def test_unsupported_dtype():
    _reject(_st({"prompt_embeddings": torch.zeros(4, H, dtype=torch.float64)}), None, 422, "dtype F64")
    _reject(_st({"prompt_embeddings": torch.zeros(4, H, dtype=torch.int32)}), None, 422, "dtype I32")


def test_not_2d():
    _reject(_st({"prompt_embeddings": torch.randn(1, 4, H)}), None, 422, "2-D")


def test_config_not_object_or_json():
    blob = _st({"prompt_embeddings": torch.randn(4, H)})
    _reject(blob, b"[1, 2]", 400, "JSON object")
    _reject(blob, b"{not json", 400, "not valid JSON")


def test_task_type_and_submodules():
    blob = _st({"prompt_embeddings": torch.randn(4, H)})
    _reject(blob, _cfg(task_type="SEQ_2_SEQ_LM"), 422, "task_type SEQ_2_SEQ_LM")
    _reject(blob, _cfg(num_transformer_submodules=2), 422, "num_transformer_submodules")


def test_config_dims_must_agree():
    blob = _st({"prompt_embeddings": torch.randn(4, H)})
    _reject(blob, _cfg(num_virtual_tokens=5), 422, "num_virtual_tokens 5")
    _reject(blob, _cfg(token_dim=128), 422, "token_dim 128")
    parse_upload(blob, _cfg(token_dim=H, num_transformer_submodules=1), MODEL)


def test_base_model_mismatch_is_a_warning():
    blob = _st({"prompt_embeddings": torch.randn(4, H)})
    p = parse_upload(blob, _cfg(base_model_name_or_path="meta-llama/Llama-3-8B"), MODEL)
    assert len(p.warnings) == 1 and "Llama-3-8B" in p.warnings[0]
    assert p.adapter_config["base_model_name_or_path"] == "meta-llama/Llama-3-8B"
    p = parse_upload(blob, _cfg(base_model_name_or_path="/models/tiny-llama"), MODEL)
    assert p.warnings == []


# ---- hashing and export --------------------------------------------------------------------------


def test_content_hash_ignores_file_layout():
    t = torch.randn(4, H)
    a = parse_upload(_st({"prompt_embeddings": t}), None, MODEL).tensor
    b = parse_upload(_st({"x": t.clone()}, metadata={"format": "pt", "note": "other"}), None, MODEL).tensor
    assert content_sha256(a) == content_sha256(b) == content_sha256(t.t().contiguous().t())
    assert content_sha256(t) != content_sha256(t.half())
    bf = t.bfloat16()
    assert content_sha256(bf) == content_sha256(bf.clone()) != content_sha256(t)
    u = t.clone()
    u[0, 0] += 1
    assert content_sha256(u) != content_sha256(t)


def test_export_config_normalised():
    blob = _st({"prompt_embeddings": torch.randn(4, H)})
    cfg = _cfg(prompt_tuning_init="TEXT", tokenizer_name_or_path=None, unknown_key=3)
    p = parse_upload(blob, cfg, MODEL)
    store = PromptStore(MemoryBackend(), MODEL)
    meta, _ = store.put("acme", "x", blob, cfg)
    files = export_adapter(meta, p.tensor)
    out = json.loads(files["adapter_config.json"])
    assert out["prompt_tuning_init"] == "RANDOM"  # TEXT without tokenizer would make PEFT fetch one
    assert "unknown_key" not in out
    assert out["base_model_name_or_path"] == "tiny-llama"
    assert out["task_type"] == "CAUSAL_LM" and out["num_transformer_submodules"] == 1
