"""Shared helpers for the benchmark scripts: models, inputs, a live server, timing, tables.

Every script in bench/ takes the same common flags (`add_common_args`): `--quick` (seconds, for
smoke tests), `--model` (`smollm2` = the embedded SmolLM2-135M-Instruct GGUF, `tiny` = a 2-layer
random Llama with SmolLM2's vocabulary, or an HF model directory / .gguf file), `--device`,
`--dtype`, `--threads`, `--json PATH` (machine-readable results for run_all.py).

The embedded GGUF takes ~30 s to de-quantize on 2 cores, so the first use saves the de-quantized
fp32 weights as an HF directory under bench/out/models/ (gitignored) and every later process loads
that in under a second. Same tensors, bit-identical logits (checked when the copy is made).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = REPO_ROOT / "bench" / "out"
MODELS_DIR = OUT_DIR / "models"
SMOLLM_NAME = "SmolLM2-135M-Instruct"
TINY_NAME = "tiny-llama"

if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.live_server import LiveServer  # noqa: E402  (the one server launcher)


# ---- command line ---------------------------------------------------------------------------------
def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="tiny sizes: runs in seconds (smoke tests)")
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (embedded GGUF, default), 'tiny' (2-layer random Llama), or an HF dir / .gguf file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="model dtype (auto: as the server: bf16 on CUDA and on CPUs with AMX/AVX512-BF16, else fp32)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--json", default=None, help="write results as JSON to this path")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def setup_torch(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def script_main(build_parser, run, render, argv: list[str] | None = None) -> dict:
    """Every script's `main`: parse, run, record the command line, write JSON, print the tables."""
    args = build_parser().parse_args(argv)
    result = run(args)
    result["command"] = script_command(argv if argv is not None else sys.argv[1:])
    write_json(args, result)
    print(render(result))
    return result


def write_json(args, result: dict) -> None:
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))


# ---- models ---------------------------------------------------------------------------------------
def _atomic_dir(target: Path, build) -> Path:
    """Build a directory in a temp sibling and rename it into place (safe with concurrent callers)."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # someone else finished first
            if not (target / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_tokenizer():
    from transformers import AutoTokenizer

    from softserve.model_loader import embedded_model_source

    src = embedded_model_source()
    return AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file, local_files_only=True)


def smollm2_dir() -> Path:
    """The embedded SmolLM2 GGUF, de-quantized once to an HF directory (fp32 safetensors)."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from softserve.model_loader import embedded_model_source, load_model

        model, tokenizer = load_model(embedded_model_source(), torch.device("cpu"), torch.float32)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)  # the weights are de-quantized fp32 now
        plain = AutoModelForCausalLM.from_config(LlamaConfig.from_dict(cfg), dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.eval()
        ids = torch.arange(100, 120).unsqueeze(0)
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, plain(ids).logits), "de-quantized copy differs"
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(MODELS_DIR / SMOLLM_NAME, build)


def tiny_dir() -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (hidden 64): servers start in a few seconds."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tokenizer = embedded_tokenizer()
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.3,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        )
        LlamaForCausalLM(config).eval().save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(MODELS_DIR / TINY_NAME, build)


def load_tiny():
    """(model, tokenizer) of `tiny_dir()` in this process, fp32 on the CPU, frozen."""
    import torch

    from softserve.model_loader import load_model, resolve_source

    model, tokenizer = load_model(resolve_source(str(tiny_dir()), None), torch.device("cpu"), torch.float32)
    model.requires_grad_(False)
    return model, tokenizer


def model_path(spec: str | None) -> Path:
    """What `--model` names, as a path the server's `--model` flag accepts."""
    if spec in (None, "", "smollm2", "embedded"):
        return smollm2_dir()
    if spec == "tiny":
        return tiny_dir()
    path = Path(spec)
    if not path.exists():
        raise SystemExit(f"--model {spec!r}: no such directory or file (hub downloads are disabled)")
    return path.resolve()


def model_label(spec: str | None) -> str:
    if spec in (None, "", "smollm2", "embedded"):
        return SMOLLM_NAME
    if spec == "tiny":
        return TINY_NAME
    return Path(spec).name


def resolve_device_dtype(device: str, dtype: str):
    from softserve.model_loader import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return dev, resolve_dtype(dtype, dev)


def load(spec: str | None, device: str = "cpu", dtype: str = "auto"):
    """(model, tokenizer, name, torch.device, torch.dtype)."""
    from softserve.model_loader import load_model, resolve_source

    dev, dt = resolve_device_dtype(device, dtype)
    source = resolve_source(str(model_path(spec)), None)
    model, tokenizer = load_model(source, dev, dt)
    return model, tokenizer, model_label(spec), dev, dt


def text_config(model):
    return model.config.get_text_config()


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- inputs ---------------------------------------------------------------------------------------
TOKEN_LO, TOKEN_HI = 100, 40000  # ordinary vocabulary ids (no special tokens) of SmolLM2's tokenizer


def request_inputs(seed: int, count: int, lo: int = 32, hi: int = 64, vocab: int = 49152) -> list[list[int]]:
    """`count` token-id prompts with lengths uniform in [lo, hi] — the same for every configuration."""
    import random

    rng = random.Random(seed)
    top = min(TOKEN_HI, vocab)
    out = []
    for _ in range(count):
        n = rng.randint(lo, hi)
        out.append([rng.randrange(TOKEN_LO, top) for _ in range(n)])
    return out


def prompt_tensor(seed: int, k: int, hidden: int, scale: float = 0.05):
    """A random soft prompt [k, hidden] (what `README` uploads); for speed the values do not matter."""
    import torch

    return torch.randn(k, hidden, generator=torch.Generator().manual_seed(seed)) * scale


def vocab_prompt_tensor(model, seed: int, k: int):
    """PEFT's SAMPLE_VOCAB init: rows of the model's own embedding matrix (realistic magnitudes)."""
    import torch

    weight = model.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(TOKEN_LO, min(TOKEN_HI, weight.shape[0]), (k,), generator=gen)
    return weight[ids.to(weight.device)].detach().float().cpu().clone()


def soft_prompt(tensor, name: str):
    """An engine SoftPrompt for a CPU float tensor (keyed by its content sha256, as the server does)."""
    from softserve.engine.request import SoftPrompt, SoftPromptRef

    sha = hashlib.sha256(tensor.float().cpu().numpy().tobytes()).hexdigest()
    ref = SoftPromptRef(name=name, version=sha[:12], sha256=sha, num_virtual_tokens=int(tensor.shape[0]))
    return SoftPrompt(ref=ref, embeddings=tensor)


def safetensors_bytes(tensor) -> bytes:
    from safetensors.torch import save

    return save({"prompt_embeddings": tensor.contiguous()}, metadata={"format": "pt"})


def engine_request(rid: str, prompt_ids, *, soft=None, max_tokens: int = 64, **sampling):
    from softserve.engine.request import Request, SamplingParams

    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("ignore_eos", True)
    sampling.setdefault("min_tokens", max_tokens)
    return Request(request_id=rid, prompt_ids=list(prompt_ids), sampling=SamplingParams(max_tokens=max_tokens, **sampling),
                   soft_prompt=soft)


def make_engine(model, tokenizer, *, max_batch_size: int = 32, kv_prefix_cache_bytes: int = 512 * 1024 * 1024,
                max_prefill_tokens: int = 4096, model_id: str = "bench", **engine_config):
    """An engine for in-process benchmarks; `engine_config`: other EngineConfig fields."""
    from softserve.engine.config import EngineConfig, SchedulerConfig
    from softserve.engine.engine import LLMEngine

    config = EngineConfig(
        scheduler=SchedulerConfig(max_batch_size=max_batch_size, max_queue=100_000, max_prefill_tokens=max_prefill_tokens),
        kv_prefix_cache_bytes=kv_prefix_cache_bytes, model_id=model_id, **engine_config,
    )
    return LLMEngine(model, tokenizer, config)


# ---- timing ---------------------------------------------------------------------------------------
def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (p in [0, 100]); nan for no values."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ---- machine facts ----------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, Any]:
    import torch
    import transformers

    facts: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "load_avg_1m": round(load_average(), 2),
        "platform": platform.platform(),
    }
    try:
        flags = Path("/proc/cpuinfo").read_text()
        facts["cpu_flags"] = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags)
    except OSError:
        pass
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
        facts["cuda"] = torch.version.cuda
    return facts


# ---- markdown ---------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 1) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


# ---- a live server ----------------------------------------------------------------------------------
class Server(LiveServer):
    """The tests' `softserve serve` launcher (tests/support/live_server.py: a free 127.0.0.1 port, stopped by
    PID) with the bench's flags: device, dtype, quiet logs, 16 concurrent uploads (upload_prompts sends 8 at
    once), and `threads` torch threads (0: the server's default)."""

    def __init__(self, store: str | os.PathLike[str], *, model: str | os.PathLike[str] | None = None,
                 device: str = "cpu", dtype: str = "auto", extra_args: Sequence[str] = (), log_dir: Path | None = None,
                 threads: int = 0):
        flags = ["--device", device, "--dtype", dtype, "--log-level", "warning",
                 "--max-concurrent-uploads-per-tenant", "16", "--max-concurrent-uploads", "16", *extra_args]
        super().__init__(store, model=model, extra_args=flags, log_dir=log_dir, torch_threads=threads or None)
        self.threads = threads

    def start(self, timeout: float = 300.0) -> Server:
        super().start(timeout)
        return self

    def display_command(self) -> str:
        """The command with the port/store placeholders a reader would use."""
        cmd = self.command()
        out = []
        for i, part in enumerate(cmd):
            if i and cmd[i - 1] == "--port":
                part = "PORT"
            elif i and cmd[i - 1] == "--store":
                part = "TMPDIR/store"
            elif part == sys.executable:
                part = (f"OMP_NUM_THREADS={self.threads} " if self.threads else "") + ".venv/bin/python"
            elif i and cmd[i - 1] == "--model":
                try:
                    part = str(Path(part).relative_to(REPO_ROOT))
                except ValueError:
                    pass
            out.append(part)
        return " ".join(out)


def metric_values(url: str, prefix: str = "softserve_") -> dict[str, float]:
    """The server's Prometheus samples whose names start with `prefix`: {name with its labels: value}."""
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=30.0).text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def upload_prompts(url: str, items: Sequence[tuple[str, bytes]], concurrency: int = 8) -> float:
    """PUT /v1/prompts/{name} for every (name, safetensors bytes); returns seconds taken."""
    import asyncio

    import httpx

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120.0) as client:
            async def one(name: str, data: bytes) -> None:
                async with sem:
                    files = {"adapter_model": ("adapter_model.safetensors", data, "application/octet-stream")}
                    r = await client.put(f"/v1/prompts/{name}", files=files)
                    if r.status_code not in (200, 201):
                        raise RuntimeError(f"upload {name}: {r.status_code} {r.text[:300]}")

            await asyncio.gather(*(one(n, d) for n, d in items))

    t0 = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - t0


def script_command(argv: Sequence[str]) -> str:
    """How this script was invoked, for RESULTS.md."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join([".venv/bin/python", str(script), *argv])
