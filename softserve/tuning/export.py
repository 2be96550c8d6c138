"""Turn a tuned prompt into a PEFT PROMPT_TUNING adapter: files on disk and/or a store version."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from softserve.store import format as fmt
from softserve.store.store import PromptStore
from softserve.store.types import ModelInfo, PromptMeta
from softserve.tuning.init import PEFT_INIT_NAMES
from softserve.tuning.config import TuningConfig

__all__ = ["model_info", "adapter_files", "save_adapter", "push_to_store"]


def model_info(model, name: str) -> ModelInfo:
    text_config = model.config.get_text_config()
    return ModelInfo(name=name, hidden_size=text_config.hidden_size, num_layers=text_config.num_hidden_layers,
                     num_attention_heads=text_config.num_attention_heads,
                     num_key_value_heads=getattr(text_config, "num_key_value_heads", None),
                     head_dim=getattr(text_config, "head_dim", None))


def adapter_files(embeddings: torch.Tensor, config: TuningConfig, info: ModelInfo, *,
                  tokenizer_name_or_path: str | None = None) -> dict[str, bytes]:
    """`adapter_config.json` + `adapter_model.safetensors` (one F32 tensor `prompt_embeddings`), the
    files `PeftModel.from_pretrained` loads. Prefix tuning: PEFT's PREFIX_TUNING config and the
    [k, layers * 2 * kv_heads * head_dim] KV (projected, with prefix_projection, as PEFT saves it)."""
    tensor = embeddings.detach().to("cpu", torch.float32).contiguous()
    if config.method == "prefix":
        original = {"base_model_name_or_path": info.name, "prefix_projection": config.prefix_projection,
                    "encoder_hidden_size": config.encoder_hidden_size}
        cfg = fmt.prefix_config(original, int(tensor.shape[0]), info)
        cfg["init_weights"] = None  # PEFT's PrefixTuningConfig field (None: its random init, which we use)
        return {
            "adapter_config.json": json.dumps(cfg, indent=2, sort_keys=True).encode("utf-8"),
            "adapter_model.safetensors": fmt.encode_blob(tensor),
        }
    original = {
        "base_model_name_or_path": info.name,
        "prompt_tuning_init": PEFT_INIT_NAMES[config.init],
        "prompt_tuning_init_text": config.init_text if config.init == "text" else None,
        "tokenizer_name_or_path": (tokenizer_name_or_path or info.name) if config.init == "text" else None,
    }
    cfg = fmt.normalise_config(original, "PROMPT_TUNING", int(tensor.shape[0]), int(tensor.shape[1]), info)
    return {
        "adapter_config.json": json.dumps(cfg, indent=2, sort_keys=True).encode("utf-8"),
        "adapter_model.safetensors": fmt.encode_blob(tensor),
    }


def save_adapter(files: dict[str, bytes], directory: str | Path) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def push_to_store(store: PromptStore, tenant: str, name: str, files: dict[str, bytes],
                  description: str | None = None) -> tuple[PromptMeta, list[str]]:
    """A new version of `tenant/name` (latest at once, so immediately servable)."""
    return store.put(tenant, name, files["adapter_model.safetensors"], files["adapter_config.json"], description)
