"""PEFT prompt-learning adapter files: validate uploads, hash content, export PEFT-loadable files.

Untrusted bytes only ever go through our own header parser and `safetensors.torch.load` (no
pickle, no torch.load), and every rejection is a 4xx with a message that says what to fix.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .types import ModelInfo, PromptMeta, PromptValidationError

__all__ = [
    "ParsedPrompt",
    "parse_upload",
    "content_sha256",
    "version_id",
    "encode_blob",
    "decode_blob",
    "export_adapter",
    "export_zip",
    "DEFAULT_MAX_BYTES",
    "SUPPORTED_PEFT_TYPES",
    "parse_prefix_upload",
]

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
TENSOR_KEY = "prompt_embeddings"
# P_TUNING files hold the encoder's *output* (the encoder itself is not saved), so they are served
# exactly like prompt tuning. PREFIX_TUNING holds per-layer KV (parse_prefix_upload).
SUPPORTED_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
PREFIX_TUNING = "PREFIX_TUNING"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Same-width integer views, to get raw bytes without going through float conversions.
_INT_VIEW = {torch.float32: (torch.int32, "<i4"), torch.float16: (torch.int16, "<i2"), torch.bfloat16: (torch.int16, "<i2")}
_MAX_HEADER = 1024 * 1024  # a one-tensor header is ~150 bytes; anything near this is not ours
_PROMPT_TUNING_KEYS = ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs")
_P_TUNING_KEYS = ("encoder_reparameterization_type", "encoder_hidden_size", "encoder_num_layers", "encoder_dropout")
_INIT_VALUES = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class ParsedPrompt:
    tensor: torch.Tensor  # [k, token_dim], CPU, dtype as uploaded
    peft_type: str
    adapter_config: dict[str, Any]  # normalised PEFT config (what export writes)
    warnings: list[str] = field(default_factory=list)

    @property
    def dtype_name(self) -> str:
        return _DTYPE_NAMES[self.tensor.dtype]


def _bad(msg: str, status: int = 400) -> PromptValidationError:
    return PromptValidationError(msg, status_code=status)


def _read_header(data: bytes) -> dict[str, Any]:
    """Parse and sanity-check the safetensors header before handing bytes to the real loader.

    Cheap rejection of pickles, zips, truncated files and headers that point past the end.
    """
    if len(data) < 8:
        raise _bad("adapter_model is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > _MAX_HEADER or 8 + n > len(data):
        raise _bad("adapter_model is not a valid safetensors file (bad header length; pickle/zip/.bin files are not accepted)")
    raw = data[8 : 8 + n]
    if raw[:1] != b"{":
        raise _bad("adapter_model is not a valid safetensors file (header is not JSON)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested thousands deep
        raise _bad("adapter_model is not a valid safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise _bad("adapter_model is not a valid safetensors file (header is not a JSON object)")
    body_len = len(data) - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise _bad(f"adapter_model is not a valid safetensors file (bad entry for {key!r})")
        offs = info.get("data_offsets")
        shape = info.get("shape")
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offs)
            or offs[0] > offs[1]
            or not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(info.get("dtype"), str)
        ):
            raise _bad(f"adapter_model is not a valid safetensors file (bad entry for {key!r})")
        if offs[1] > body_len:
            raise _bad("adapter_model is truncated: tensor data extends past the end of the file")
    return header


def _parse_config(adapter_config: bytes) -> dict[str, Any]:
    try:
        cfg = json.loads(adapter_config.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(f"adapter_config is not valid JSON: {e}") from None
    except RecursionError:
        raise _bad("adapter_config is nested too deeply") from None
    if not isinstance(cfg, dict):
        raise _bad("adapter_config must be a JSON object")
    return cfg


def _same_model(a: str, b: str) -> bool:
    """Model names are often paths or hub ids for the same thing ("org/M" vs "/models/M")."""
    a, b = a.strip().rstrip("/"), b.strip().rstrip("/")
    return a.lower() == b.lower() or a.rsplit("/", 1)[-1].lower() == b.rsplit("/", 1)[-1].lower()


def _as_int(cfg: dict, key: str) -> int | None:
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"adapter_config.{key} must be an integer, got {v!r}", 422)
    return v


def parse_upload(
    adapter_model: bytes,
    adapter_config: bytes | None,
    model: ModelInfo,
    *,
    max_virtual_tokens: int = 256,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ParsedPrompt:
    """Validate an uploaded adapter against the served model. Raises PromptValidationError (4xx)."""
    # Size first: never parse something we would refuse to store anyway.
    if len(adapter_model) > max_bytes:
        raise _bad(f"adapter_model is {len(adapter_model)} bytes; the limit is {max_bytes}", 413)
    cfg = _parse_config(adapter_config) if adapter_config is not None else None
    if cfg is not None and cfg.get("peft_type") == PREFIX_TUNING:
        return parse_prefix_upload(adapter_model, cfg, model, max_virtual_tokens=max_virtual_tokens)

    header = _read_header(adapter_model)
    keys = sorted(k for k in header if k != "__metadata__")
    if cfg is not None:
        if keys != [TENSOR_KEY]:
            raise _bad(f"expected exactly one tensor '{TENSOR_KEY}', found {keys}")
    elif len(keys) != 1:
        raise _bad(f"expected exactly one tensor '{TENSOR_KEY}', found {keys}")
    info = header[keys[0]]
    k, dim = _tensor_shape(info, "prompt tensor", "[num_virtual_tokens, token_dim]")
    if dim != model.hidden_size:
        raise _bad(f"prompt token_dim {dim} does not match the model hidden_size {model.hidden_size}", 422)
    if not 1 <= k <= max_virtual_tokens:
        raise _bad(f"num_virtual_tokens {k} out of range: must be between 1 and {max_virtual_tokens}", 422)

    tensor = _load_tensor(adapter_model, keys[0], (k, dim), info["dtype"], "prompt")

    warnings: list[str] = []
    peft_type = "PROMPT_TUNING"
    original: dict[str, Any] = {}
    if cfg is not None:
        original = cfg
        peft_type = cfg.get("peft_type")
        if peft_type is None:
            raise _bad("adapter_config has no peft_type", 422)
        if peft_type not in SUPPORTED_PEFT_TYPES:
            raise _bad(f"unsupported peft_type {peft_type}; supported: {', '.join(SUPPORTED_PEFT_TYPES)}", 422)
        task = cfg.get("task_type")
        if task is not None and task != "CAUSAL_LM":
            raise _bad(f"unsupported task_type {task}; only CAUSAL_LM prompts can be served", 422)
        nts = _as_int(cfg, "num_transformer_submodules")
        if nts is not None and nts != 1:
            raise _bad(f"num_transformer_submodules must be 1 for a decoder-only model, got {nts}", 422)
        nvt = _as_int(cfg, "num_virtual_tokens")
        if nvt is not None and nvt != k:
            raise _bad(f"adapter_config num_virtual_tokens {nvt} does not match the tensor ({k} rows)", 422)
        td = _as_int(cfg, "token_dim")
        if td is not None and td != dim:
            raise _bad(f"adapter_config token_dim {td} does not match the tensor ({dim} columns)", 422)
        if peft_type == "P_TUNING":
            _check_p_tuning(cfg)
        base = cfg.get("base_model_name_or_path")
        if isinstance(base, str) and base and not _same_model(base, model.name):
            warnings.append(
                f"adapter was trained for base model {base!r} but this server runs {model.name!r}; "
                "outputs may be meaningless"
            )

    return ParsedPrompt(
        tensor=tensor,
        peft_type=peft_type,
        adapter_config=normalise_config(original, peft_type, k, dim, model),
        warnings=warnings,
    )


_MAX_ENCODER_HIDDEN = 65536
_MAX_ENCODER_LAYERS = 64


def _check_p_tuning(cfg: dict[str, Any]) -> None:
    """P_TUNING settings as PEFT's PromptEncoder builds them: a value it would refuse (or that would
    build an absurd encoder) makes the downloaded adapter fail to load, so refuse it at upload."""
    kind = cfg.get("encoder_reparameterization_type")
    if kind is not None and kind not in ("MLP", "LSTM"):
        raise _bad(f"adapter_config.encoder_reparameterization_type must be 'MLP' or 'LSTM', got {kind!r}", 422)
    hidden = _as_int(cfg, "encoder_hidden_size")
    if hidden is not None and not 1 <= hidden <= _MAX_ENCODER_HIDDEN:
        raise _bad(f"adapter_config.encoder_hidden_size must be between 1 and {_MAX_ENCODER_HIDDEN}, got {hidden}", 422)
    layers = _as_int(cfg, "encoder_num_layers")
    if layers is not None and not 1 <= layers <= _MAX_ENCODER_LAYERS:
        raise _bad(f"adapter_config.encoder_num_layers must be between 1 and {_MAX_ENCODER_LAYERS}, got {layers}", 422)
    dropout = cfg.get("encoder_dropout")
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0.0 <= dropout < 1.0):
        raise _bad(f"adapter_config.encoder_dropout must be a number in [0, 1), got {dropout!r}", 422)


def _is_local_path(value: str) -> bool:
    """A filesystem path (of the server or of whoever uploaded), as opposed to a hub id "org/name"."""
    return value.startswith(("/", ".", "~")) or "\\" in value or (len(value) > 1 and value[1] == ":")


def _public_ref(value: Any, model: ModelInfo) -> str:
    """What a stored and downloaded config names as model/tokenizer: the given hub id, else the served
    model's public name, never a local path."""
    return value if isinstance(value, str) and value.strip() and not _is_local_path(value.strip()) else model.name


def normalise_config(original: dict[str, Any], peft_type: str, k: int, dim: int, model: ModelInfo) -> dict[str, Any]:
    """The config we store and export: a complete PEFT config, keeping only known, valid keys."""
    out: dict[str, Any] = {
        "peft_type": peft_type,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": k,
        "token_dim": dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": model.num_attention_heads,
        "num_layers": model.num_layers,
        "base_model_name_or_path": _public_ref(original.get("base_model_name_or_path"), model),
        "inference_mode": True,
        "modules_to_save": None,
        "auto_mapping": None,
        "revision": original.get("revision") if isinstance(original.get("revision"), str) else None,
    }
    if peft_type == "PROMPT_TUNING":
        init = original.get("prompt_tuning_init")
        text = original.get("prompt_tuning_init_text")
        tok = original.get("tokenizer_name_or_path")
        # TEXT init is only meaningful with its text and tokenizer; otherwise fall back to RANDOM,
        # which never makes PEFT fetch a tokenizer.
        if init == "TEXT" and isinstance(text, str) and isinstance(tok, str):
            out.update(prompt_tuning_init="TEXT", prompt_tuning_init_text=text, tokenizer_name_or_path=_public_ref(tok, model))
            kw = original.get("tokenizer_kwargs")
            out["tokenizer_kwargs"] = kw if isinstance(kw, dict) else None
        else:
            out.update(
                prompt_tuning_init=init if init in _INIT_VALUES and init != "TEXT" else "RANDOM",
                prompt_tuning_init_text=None,
                tokenizer_name_or_path=None,
                tokenizer_kwargs=None,
            )
    else:
        defaults = {"encoder_reparameterization_type": "MLP", "encoder_hidden_size": dim, "encoder_num_layers": 2, "encoder_dropout": 0.0}
        for key in _P_TUNING_KEYS:  # values checked by _check_p_tuning; None means PEFT's default
            v = original.get(key)
            out[key] = defaults[key] if v is None else v
        out["encoder_dropout"] = float(out["encoder_dropout"])
    return out


def content_sha256(tensor: torch.Tensor) -> str:
    """Hash of dtype + shape + raw little-endian bytes: identical tensors hash alike in any file."""
    if tensor.dtype not in _INT_VIEW:
        raise ValueError(f"unsupported dtype {tensor.dtype}")
    t = tensor.detach().to("cpu").contiguous()
    int_dtype, np_le = _INT_VIEW[t.dtype]
    raw = t.view(int_dtype).numpy().astype(np_le, copy=False).tobytes()
    h = hashlib.sha256()
    h.update(f"softserve-prompt-v1\0{_DTYPE_NAMES[t.dtype]}\0{list(t.shape)}\0".encode())
    h.update(raw)
    return h.hexdigest()


def version_id(sha256: str, adapter_config: dict[str, Any]) -> str:
    """Hex id of a version: the tensor's content hash AND the stored config (what serving and a
    download use), so the same tensor uploaded with another config (e.g. P_TUNING settings) is a new
    version rather than silently keeping the first config. Versions stored before this scheme have
    id `sha256[:12]`; they stay valid and are reused when the same tensor and config come again."""
    h = hashlib.sha256(b"softserve-version-v2\0" + sha256.encode("ascii") + b"\0")
    h.update(json.dumps(adapter_config, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    return h.hexdigest()


def encode_blob(tensor: torch.Tensor) -> bytes:
    """Canonical stored form: a PEFT-style adapter_model.safetensors."""
    return st_save({TENSOR_KEY: tensor.detach().to("cpu").contiguous()}, metadata={"format": "pt"})


def decode_blob(data: bytes) -> torch.Tensor:
    tensors = st_load(data)
    if list(tensors) != [TENSOR_KEY]:
        raise ValueError(f"stored blob has tensors {sorted(tensors)}")
    return tensors[TENSOR_KEY]


def export_adapter(meta: PromptMeta, tensor: torch.Tensor) -> dict[str, bytes]:
    """Files of a PEFT adapter directory that `PeftModel.from_pretrained` loads as-is."""
    cfg = dict(meta.adapter_config)
    # Whatever was stored, the exported dims must agree with the tensor.
    cfg.update(
        peft_type=meta.peft_type,
        task_type="CAUSAL_LM",
        num_virtual_tokens=int(tensor.shape[0]),
        token_dim=int(tensor.shape[1]),
        num_transformer_submodules=1,
        inference_mode=True,
    )
    if meta.peft_type == PREFIX_TUNING:  # token_dim is one layer's K width there, checked at upload
        cfg["token_dim"] = meta.adapter_config.get("token_dim")
    if meta.peft_type == "PROMPT_TUNING":
        cfg.setdefault("prompt_tuning_init", "RANDOM")
    return {
        "adapter_config.json": json.dumps(cfg, indent=2, sort_keys=True).encode("utf-8"),
        "adapter_model.safetensors": encode_blob(tensor),
    }


def export_zip(meta: PromptMeta, tensor: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    # Fixed timestamps so the same version always downloads as the same bytes.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for fname, data in export_adapter(meta, tensor).items():
            info = zipfile.ZipInfo(fname, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    return buf.getvalue()



# ---- prefix tuning (PEFT PREFIX_TUNING, the format P-tuning v2 uses) ------------------------------


def parse_prefix_upload(adapter_model: bytes, cfg: dict[str, Any], model: ModelInfo, *, max_virtual_tokens: int) -> ParsedPrompt:
    """A PREFIX_TUNING adapter: one tensor [k, num_layers * 2 * kv_heads * head_dim], every layer's keys
    and values (PEFT saves the projected tensor when prefix_projection=True, same shape)."""
    header = _read_header(adapter_model)
    keys = sorted(k for k in header if k != "__metadata__")
    if keys != [TENSOR_KEY]:
        raise _bad(f"expected exactly one tensor '{TENSOR_KEY}', found {keys}")
    info = header[TENSOR_KEY]
    k, width = _tensor_shape(info, "prefix tensor", "[num_virtual_tokens, num_layers * 2 * kv_heads * head_dim]")
    layers, kv_heads, head_dim = model.num_layers, model.kv_heads, model.kv_head_dim
    if width != model.prefix_width:
        raise _bad(
            f"prefix tensor has {width} columns; this model needs num_layers * 2 * num_key_value_heads * head_dim "
            f"= {layers} * 2 * {kv_heads} * {head_dim} = {model.prefix_width}", 422)
    if not 1 <= k <= max_virtual_tokens:
        raise _bad(f"num_virtual_tokens {k} out of range: must be between 1 and {max_virtual_tokens}", 422)
    task = cfg.get("task_type")
    if task is not None and task != "CAUSAL_LM":
        raise _bad(f"unsupported task_type {task}; only CAUSAL_LM prompts can be served", 422)
    expected = {
        "num_virtual_tokens": (k, f"the tensor has {k} rows"),
        "num_layers": (layers, f"this model has {layers} layers"),
        # PEFT writes the KV width and the KV head count for GQA models.
        "token_dim": (kv_heads * head_dim, f"this model's num_key_value_heads * head_dim is {kv_heads} * {head_dim} = {kv_heads * head_dim}"),
        "num_attention_heads": (kv_heads, f"this model has {kv_heads} key-value heads"),
        "num_transformer_submodules": (1, "a decoder-only model has 1"),
    }
    for key, (want, why) in expected.items():
        got = _as_int(cfg, key)
        if got is not None and got != want:
            raise _bad(f"adapter_config {key} {got} does not match: {why}", 422)

    tensor = _load_tensor(adapter_model, TENSOR_KEY, (k, width), info["dtype"], "prefix")

    warnings: list[str] = []
    base = cfg.get("base_model_name_or_path")
    if isinstance(base, str) and base and not _same_model(base, model.name):
        warnings.append(
            f"adapter was trained for base model {base!r} but this server runs {model.name!r}; outputs may be meaningless"
        )
    return ParsedPrompt(tensor=tensor, peft_type=PREFIX_TUNING, adapter_config=prefix_config(cfg, k, model), warnings=warnings)


def prefix_config(original: dict[str, Any], k: int, model: ModelInfo) -> dict[str, Any]:
    """The PREFIX_TUNING config we store and export (PeftModel.from_pretrained loads it with the tensor).

    inference_mode=True makes PEFT use the saved tensor as is, with or without prefix_projection."""
    kv_dim = model.kv_heads * model.kv_head_dim
    base = original.get("base_model_name_or_path")
    hidden = original.get("encoder_hidden_size")
    return {
        "peft_type": PREFIX_TUNING,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": k,
        "token_dim": kv_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": model.kv_heads,
        "num_layers": model.num_layers,
        "encoder_hidden_size": hidden if isinstance(hidden, int) and not isinstance(hidden, bool) and hidden > 0 else kv_dim,
        "prefix_projection": original.get("prefix_projection") is True,
        "base_model_name_or_path": base if isinstance(base, str) and base else model.name,
        "inference_mode": True,
        "modules_to_save": None,
        "auto_mapping": None,
        "revision": original.get("revision") if isinstance(original.get("revision"), str) else None,
    }


def _load_tensor(adapter_model: bytes, key: str, shape: tuple[int, int], dtype_name: str, what: str) -> torch.Tensor:
    """The tensor, checked against the header already validated: same shape and dtype, all finite."""
    try:
        tensor = st_load(adapter_model)[key]
    except Exception as e:  # safetensors raises its own error types; all mean "malformed"
        raise _bad(f"adapter_model is not a valid safetensors file: {e}") from None
    if tuple(tensor.shape) != shape or tensor.dtype != _ST_DTYPES[dtype_name]:
        raise _bad("adapter_model header does not match its tensor data")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise _bad(f"{what} tensor contains {bad} non-finite values (NaN or Inf)", 422)
    return tensor


def _tensor_shape(info: dict[str, Any], what: str, layout: str) -> tuple[int, int]:
    """(rows, columns) from a tensor's header entry; 422 for an unsupported dtype or a non-2-D shape."""
    if info["dtype"] not in _ST_DTYPES:
        raise _bad(f"unsupported tensor dtype {info['dtype']}; expected F32, F16 or BF16", 422)
    shape = info["shape"]
    if len(shape) != 2:
        raise _bad(f"{what} must be 2-D {layout}, got shape {shape}", 422)
    return shape[0], shape[1]
