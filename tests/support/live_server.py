"""Helpers for live-server integration tests: run `python -m softserve serve` as a real subprocess.

- `LiveServer` starts the CLI on a free 127.0.0.1 port, waits for `/ready`, and stops exactly the
  process it started (by PID: SIGTERM, wait, SIGKILL if needed). It never signals anything else.
- `tiny_model_dir(tmp_path_factory, tokenizer)` saves a tiny random Llama + the SmolLM2 tokenizer
  to a directory once per session, for servers that start in a few seconds (`--model DIR`).
- Small utilities shared by the live test files: soft-prompt safetensors bytes, multipart uploads,
  SSE parsing, OpenAI error-shape checks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx

from tests.support.processes import free_port, http_probe, stop_process, wait_until_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
# How long a server may take to answer /ready (only a failing start waits this long). A niced serial run on a
# shared 2-core machine (load 5) once needed more than 120 s just to import torch; `make test` starts servers
# from two workers at once.
READY_TIMEOUT_S = 300.0
TINY_HIDDEN = 64
SMOLLM_HIDDEN = 576
SMOLLM_NAME = "SmolLM2-135M-Instruct"
# Intra-op threads of the server's torch. One by default: on a small shared CI box (2 cores, other
# jobs running) several threads per process oversubscribe the CPUs and generation gets ~10x slower
# (measured: 24 SmolLM2 tokens 2.4 s with 1 thread vs 9 s with 2 under load; 1.3 s with 2 when idle).
# LIVE_SERVER_THREADS=N overrides it; LIVE_SERVER_THREADS=0 leaves torch's default.
DEFAULT_TORCH_THREADS: int | None = int(os.environ.get("LIVE_SERVER_THREADS", "1")) or None


class ServerStartError(RuntimeError):
    pass


class LiveServer:
    """One `softserve serve` subprocess. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        store: str | os.PathLike[str],  # a directory, or an s3:// URL
        *,
        model: str | os.PathLike[str] | None = None,
        api_keys: str | os.PathLike[str] | None = None,
        max_model_len: int | None = None,
        extra_args: list[str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        torch_threads: int | None = DEFAULT_TORCH_THREADS,
        launcher: list[str] | None = None,  # what runs `serve`: default `python -m softserve` from this checkout
        cwd: str | os.PathLike[str] = REPO_ROOT,
    ) -> None:
        # A URL (s3://bucket/prefix) stays a string: Path() would fold "//" into a local relative path.
        self.store = store if isinstance(store, str) and "://" in store else Path(store)
        self.model = model
        self.api_keys = api_keys
        self.max_model_len = max_model_len
        self.extra_args = list(extra_args or [])
        if log_dir is None and isinstance(self.store, str):
            raise ValueError("a store URL needs log_dir")
        self.log_dir = Path(log_dir) if log_dir is not None else self.store.parent
        self.torch_threads = torch_threads
        self.launcher = launcher or [sys.executable, "-m", "softserve"]
        self.cwd = cwd
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._stdout_path: Path | None = None
        self._stderr_path: Path | None = None

    # ---- addresses ----------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert self.proc is not None, "server not started"
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def client(self, api_key: str | None = None, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    # ---- life cycle -----------------------------------------------------------------------------
    def command(self) -> list[str]:
        cmd = [*self.launcher, "serve", "--port", str(self.port), "--host", "127.0.0.1",
               "--store", str(self.store)]
        if self.model is not None:
            cmd += ["--model", str(self.model)]
        if self.api_keys is not None:
            cmd += ["--api-keys", str(self.api_keys)]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if "--dtype" not in self.extra_args:  # tests compare with fp32 references; `auto` is bf16 on AMX CPUs
            cmd += ["--dtype", "float32"]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        # Settings read SOFTSERVE_* from the environment: drop them so only our flags count.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOFTSERVE_")}
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if self.torch_threads is not None:
            env.update(OMP_NUM_THREADS=str(self.torch_threads), MKL_NUM_THREADS=str(self.torch_threads))
        return env

    def start(self, timeout: float = READY_TIMEOUT_S) -> "LiveServer":
        assert self.proc is None, "already started"
        self.port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        stamp = f"{self.port}-{time.monotonic_ns()}"
        self._stdout_path = self.log_dir / f"server-{stamp}.out"
        self._stderr_path = self.log_dir / f"server-{stamp}.err"
        with open(self._stdout_path, "wb") as out, open(self._stderr_path, "wb") as err:
            # Files, not pipes: a chatty server can never block on a full pipe nobody reads.
            self.proc = subprocess.Popen(self.command(), cwd=self.cwd, env=self.environment(), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        with httpx.Client(timeout=2.0) as c:
            wait_until_ready(http_probe(c, f"{self.url}/ready"), self.proc, "server", self.logs, timeout,
                             error=ServerStartError)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Stop exactly the process we started (by PID). Returns its exit code."""
        return stop_process(self.proc, timeout=timeout)

    def kill9(self) -> int:
        """SIGKILL our server (a crash: no shutdown handlers run) and reap it."""
        proc = self.proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(30)

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for label, path in (("stdout", self._stdout_path), ("stderr", self._stderr_path)):
            if path is not None and path.exists():
                text = path.read_text(errors="replace")
                parts.append(f"--- server {label} (tail) ---\n{text[-tail:]}")
        return "\n".join(parts)

    def stdout_text(self) -> str:
        return self._stdout_path.read_text(errors="replace") if self._stdout_path and self._stdout_path.exists() else ""

    def __enter__(self) -> "LiveServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- tiny model -------------------------------------------------------------------------------------
TINY_DIR_NAME = "tiny-llama-shared"


def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """Save a tiny random Llama (SmolLM2 vocabulary, GQA) + tokenizer once per session.

    The directory lives at a fixed place under the session's base temp dir, so it is built once per
    session whichever test asks first."""
    directory = Path(tmp_path_factory.getbasetemp()) / TINY_DIR_NAME
    if (directory / "config.json").exists():
        return directory
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_HIDDEN, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    staging = tmp_path_factory.mktemp("tiny-llama-staging")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, directory)  # complete or absent, never half-written
    return directory


# ---- soft prompts -----------------------------------------------------------------------------------
def prompt_tensor(seed: int, k: int, hidden: int, scale: float = 1.0):
    import torch

    return torch.randn(k, hidden, generator=torch.Generator().manual_seed(seed)) * scale


def prompt_bytes(seed: int, k: int, hidden: int, scale: float = 1.0) -> bytes:
    from safetensors.torch import save as st_save

    return st_save({"prompt_embeddings": prompt_tensor(seed, k, hidden, scale)}, metadata={"format": "pt"})


def adapter_config(k: int) -> bytes:
    return json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": k}).encode()


def upload(client: httpx.Client, name: str, model_bytes: bytes, config: bytes | None = None) -> httpx.Response:
    files = {"adapter_model": ("adapter_model.safetensors", model_bytes, "application/octet-stream")}
    if config is not None:
        files["adapter_config"] = ("adapter_config.json", config, "application/json")
    return client.put(f"/v1/prompts/{name}", files=files)


def multipart_body(model_bytes: bytes, config: bytes | None = None, boundary: str = "softserve-live-test-boundary") -> tuple[bytes, str]:
    """A multipart/form-data body built by hand (for streaming it slowly). Returns (body, content type)."""
    parts = [(b"adapter_model", b"adapter_model.safetensors", b"application/octet-stream", model_bytes)]
    if config is not None:
        parts.append((b"adapter_config", b"adapter_config.json", b"application/json", config))
    b = boundary.encode()
    out = bytearray()
    for field, filename, ctype, data in parts:
        out += b"--" + b + b"\r\n"
        out += b'Content-Disposition: form-data; name="' + field + b'"; filename="' + filename + b'"\r\n'
        out += b"Content-Type: " + ctype + b"\r\n\r\n" + data + b"\r\n"
    out += b"--" + b + b"--\r\n"
    return bytes(out), f"multipart/form-data; boundary={boundary}"


# ---- SSE / errors -------------------------------------------------------------------------------------
def iter_sse(lines: Iterator[str]) -> Iterator[dict | str]:
    """Yield each `data:` payload: a dict, or the string "[DONE]"."""
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        yield data if data == "[DONE]" else json.loads(data)


def assert_openai_error(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert "Traceback" not in err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err
