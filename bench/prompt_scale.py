"""Prompt scale: a store with 10,000 prompts behind a live server.

1. Create N prompts directly with PromptStore + LocalBackend (threads, one store object each), then
2. start `python -m softserve serve` on that store with a device prompt cache (`--prompt-cache-bytes`)
   and a prompt-KV cache (`--kv-prefix-cache-bytes`) that hold only a few dozen prompts.
   With the prompt-KV disk tier (the default; `--no-kv-tier`: without it) the server starts first, on
   an empty store with `--kv-tier-dir` sized for every prompt, and the N prompts are uploaded through
   `PUT /v1/prompts/{name}`, as users add them: each upload's KV is computed in spare capacity
   (`--kv-tier-warm-on-upload`), and the run waits until every warm-up is done.
3. Listing: `PromptStore.list` directly, `GET /v1/prompts`, `GET /v1/models`.
4. Cold first use: sequential non-streaming requests (48 prompt tokens, 1 output token), each with a
   prompt never used before, interleaved with the same request on one hot prompt: p50/p99 of both.
5. Steady state: closed-loop streaming load (bench/load.py's generator) with C clients, working set
   = a few prompts that fit the caches ("hot") vs all N prompts drawn uniformly (far larger than the
   caches: nearly every request misses both caches), interleaved; the ratio is the cost of misses.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402
from bench import load as L  # noqa: E402


def create_store(root: Path, n: int, k: int, hidden: int, info, workers: int = 16) -> float:
    from softserve.store.backends import LocalBackend
    from softserve.store.store import PromptStore

    stores = [PromptStore(LocalBackend(root), info) for _ in range(workers)]

    def work(w: int) -> None:
        for i in range(w, n, workers):
            stores[w].put("default", f"s{i:05d}", C.safetensors_bytes(C.prompt_tensor(200_000 + i, k, hidden)), None)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(work, range(workers)))
    return time.perf_counter() - t0


def upload_through_api(url: str, n: int, k: int, hidden: int, chunk: int = 500) -> float:
    t0 = time.perf_counter()
    for begin in range(0, n, chunk):
        items = [(f"s{i:05d}", C.safetensors_bytes(C.prompt_tensor(200_000 + i, k, hidden))) for i in range(begin, min(n, begin + chunk))]
        C.upload_prompts(url, items, concurrency=16)
    return time.perf_counter() - t0


def wait_for_warm_ups(url: str, timeout: float = 3600.0) -> dict[str, float]:
    """Until no upload's KV warm-up is queued or running; the tier and warm-up counters then."""
    deadline = time.monotonic() + timeout
    while True:
        values = C.metric_values(url, "softserve_kv_")
        if values.get("softserve_kv_warmups_pending", 0) == 0 or time.monotonic() > deadline:
            return values
        time.sleep(1.0)


def model_info(model_dir: Path):
    import json

    from softserve.store.types import ModelInfo

    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return ModelInfo(name=model_dir.name, hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                     num_attention_heads=cfg["num_attention_heads"]), cfg


def run(args) -> dict:
    import httpx

    quick = args.quick
    n = args.num_prompts or (50 if quick else 10_000)
    cold_m = args.cold_requests or (5 if quick else 100)
    conc = args.concurrency or (2 if quick else 16)
    cache_prompts = args.cache_prompts or (4 if quick else 64)
    hot_set = max(1, min(cache_prompts // 4, 16))
    warmup = args.warmup if args.warmup is not None else (1.0 if quick else 5.0)
    window = args.window if args.window is not None else (2.0 if quick else 20.0)
    rounds = 1 if quick else 2
    k = args.k
    mdir = C.model_path(args.model)
    if mdir.is_file():
        raise SystemExit("prompt_scale.py needs an HF model directory for --model")
    info, cfg = model_info(mdir)
    hidden = info.hidden_size
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    import torch

    from softserve.model_loader import resolve_device, resolve_dtype

    # the dtype the server will pick (auto: bf16 on CPUs with AVX512-BF16 or AMX), so "holds 64 prompts" is true
    elem = torch.empty((), dtype=resolve_dtype(args.dtype, resolve_device(args.device))).element_size()
    prompt_bytes = k * hidden * elem
    kv_bytes = 2 * cfg["num_hidden_layers"] * kv_heads * k * head_dim * elem
    tier_bytes = int(n * kv_bytes * 1.25) if args.kv_tier else 0  # every prompt's KV, file headers included
    result = {"name": "prompt_scale", "quick": quick, "model": C.model_label(args.model), "num_prompts": n, "k": k,
              "cache_prompts": cache_prompts, "prompt_cache_bytes": cache_prompts * prompt_bytes,
              "kv_cache_bytes": cache_prompts * kv_bytes, "concurrency": conc, "hot_set": hot_set,
              "kv_tier_bytes": tier_bytes, "load_avg_start": C.load_average()}
    with tempfile.TemporaryDirectory(prefix="softserve-bench-scale-") as tmp:
        from softserve.store.backends import LocalBackend
        from softserve.store.store import PromptStore

        store = Path(tmp) / "store"
        if not args.kv_tier:
            result["create_s"] = create_store(store, n, k, hidden, info)
            print(f"created {n} prompts in {result['create_s']:.1f} s", file=sys.stderr, flush=True)
        extra = ["--prompt-cache-bytes", str(cache_prompts * prompt_bytes), "--kv-prefix-cache-bytes", str(cache_prompts * kv_bytes)]
        if args.kv_tier:
            extra += ["--kv-tier-dir", str(Path(tmp) / "prompt-kv"), "--kv-tier-bytes", str(tier_bytes)]
        server = C.Server(store, model=mdir, device=args.device, dtype=args.dtype, log_dir=Path(tmp), threads=args.threads,
                          extra_args=extra)
        t0 = time.perf_counter()
        server.start()
        result["server_start_s"] = time.perf_counter() - t0
        result["server_command"] = server.display_command()
        try:
            if args.kv_tier:
                t0 = time.perf_counter()
                result["create_s"] = upload_through_api(server.url, n, k, hidden)
                print(f"uploaded {n} prompts in {result['create_s']:.1f} s", file=sys.stderr, flush=True)
                result["kv_tier_metrics"] = wait_for_warm_ups(server.url)
                result["warm_s"] = time.perf_counter() - t0
                print(f"every upload's KV computed {result['warm_s']:.1f} s after the first upload: "
                      f"{result['kv_tier_metrics']}", file=sys.stderr, flush=True)
            direct = PromptStore(LocalBackend(store), info)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                listed = direct.list("default")
                times.append(time.perf_counter() - t0)
            assert len(listed) == n, len(listed)
            result["list_direct_ms"] = 1000 * C.median(times)

            with httpx.Client(base_url=server.url, timeout=600.0) as client:
                for path, key in (("/v1/prompts", "list_api_ms"), ("/v1/models", "models_api_ms")):
                    times = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        r = client.get(path)
                        times.append(time.perf_counter() - t0)
                        r.raise_for_status()
                    result[key] = 1000 * C.median(times)
                    result[key.replace("_ms", "_bytes")] = len(r.content)
                print(f"listing: direct {result['list_direct_ms']:.0f} ms, /v1/prompts {result['list_api_ms']:.0f} ms, "
                      f"/v1/models {result['models_api_ms']:.0f} ms", file=sys.stderr, flush=True)
                ids = C.request_inputs(args.seed, 1, lo=48, hi=48, vocab=cfg["vocab_size"])[0]

                def once(model: str) -> float:
                    t0 = time.perf_counter()
                    r = client.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0})
                    dt = time.perf_counter() - t0
                    r.raise_for_status()
                    return 1000 * dt

                hot = "s00000"
                once(hot)
                once(hot)
                cold, warm = [], []
                step = max(1, (n - 1) // cold_m)
                for j in range(cold_m):
                    cold.append(once(f"s{1 + j * step:05d}"))
                    warm.append(once(hot))
                result["cold_ms"] = {"p50": C.percentile(cold, 50), "p99": C.percentile(cold, 99), "n": len(cold)}
                result["warm_ms"] = {"p50": C.percentile(warm, 50), "p99": C.percentile(warm, 99), "n": len(warm)}
                print(f"first use: cold p50 {result['cold_ms']['p50']:.0f} ms, warm p50 {result['warm_ms']['p50']:.0f} ms",
                      file=sys.stderr, flush=True)

            inputs = C.request_inputs(args.seed, 4096, vocab=cfg["vocab_size"])
            hot_names = [f"s{i:05d}" for i in range(hot_set)]
            choosers = {
                "hot": lambda cid, rng: hot_names[rng.randrange(len(hot_names))],
                "uniform": lambda cid, rng: f"s{rng.randrange(n):05d}",
            }
            runs = {"hot": [], "uniform": []}
            for r in range(0 if not quick else 1, rounds + 1):  # round 0 warms the hot set and code paths, not counted
                for name in (["hot", "uniform"] if r % 2 == 0 else ["uniform", "hot"]):
                    raw = asyncio.run(L.closed_loop(server.url, conc, choosers[name], inputs, max_tokens=args.max_tokens,
                                                    warmup=warmup if r else min(0.5, warmup),
                                                    window=window if r else min(1.0, window), seed=r))
                    if r:
                        s = L.summarize(raw)
                        runs[name].append(s)
                        print(f"steady {name} round {r}: {s['tokens_per_s']:.1f} tok/s, errors {s['num_errors']}",
                              file=sys.stderr, flush=True)
            result["steady"] = {}
            for name, ss in runs.items():
                ttft = [v for s in ss for v in s["ttft_ms"]]
                itl = [v for s in ss for v in s["itl_ms"]]
                result["steady"][name] = {
                    "tokens_per_s": sum(s["tokens_per_s"] for s in ss) / len(ss),
                    "ttft_p50": C.percentile(ttft, 50), "ttft_p99": C.percentile(ttft, 99),
                    "itl_p50": C.percentile(itl, 50), "itl_p99": C.percentile(itl, 99),
                    "errors": sum(s["num_errors"] for s in ss), "error_samples": [e for s in ss for e in s["errors"]][:3],
                }
            if args.kv_tier:
                result["kv_tier_after"] = C.metric_values(server.url, "softserve_kv_tier_")
            hot_tps = result["steady"]["hot"]["tokens_per_s"]
            result["steady_ratio"] = result["steady"]["uniform"]["tokens_per_s"] / hot_tps if hot_tps else float("nan")
        finally:
            server.stop()
    result["load_avg_end"] = C.load_average()
    return result


def render(result: dict) -> str:
    st = result["steady"]
    return "\n".join([
        f"### Prompt scale ({result['num_prompts']:,} prompts of k={result['k']}, {result['model']})",
        "",
        C.md_table(["measurement", "value"], [
            [f"upload {result['num_prompts']:,} prompts (PUT /v1/prompts, 16 clients)" if result.get("kv_tier_bytes")
             else f"create {result['num_prompts']:,} prompts (PromptStore + LocalBackend, 16 threads)",
             f"{result['create_s']:.1f} s ({result['num_prompts'] / result['create_s']:.0f}/s)"],
            *_tier_rows(result),
            ["server start on that store", f"{result['server_start_s']:.1f} s"],
            ["`PromptStore.list` (direct)", f"{result['list_direct_ms']:.0f} ms"],
            ["`GET /v1/prompts`", f"{result['list_api_ms']:.0f} ms ({result['list_api_bytes'] / 1e6:.1f} MB)"],
            ["`GET /v1/models`", f"{result['models_api_ms']:.0f} ms ({result['models_api_bytes'] / 1e6:.1f} MB)"],
            [f"first use of a prompt (cold), 48 tokens, max_tokens=1, n={result['cold_ms']['n']}",
             f"p50 {result['cold_ms']['p50']:.0f} ms, p99 {result['cold_ms']['p99']:.0f} ms"],
            ["same request, hot prompt (interleaved)", f"p50 {result['warm_ms']['p50']:.0f} ms, p99 {result['warm_ms']['p99']:.0f} ms"],
        ]),
        "",
        f"Steady state, {result['concurrency']} closed-loop streaming clients, 64 output tokens; device prompt cache "
        f"{result['prompt_cache_bytes'] / 1024:.0f} KiB and prompt-KV cache {result['kv_cache_bytes'] / 2**20:.1f} MiB "
        f"= {result['cache_prompts']} prompts each:",
        "",
        C.md_table(["working set", "output tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "errors"], [
            [f"hot: {result['hot_set']} prompts (fit the caches)", st["hot"]["tokens_per_s"], st["hot"]["ttft_p50"],
             st["hot"]["ttft_p99"], st["hot"]["itl_p50"], st["hot"]["itl_p99"], st["hot"]["errors"]],
            [f"uniform over all {result['num_prompts']:,} (cache holds {result['cache_prompts']})", st["uniform"]["tokens_per_s"],
             st["uniform"]["ttft_p50"], st["uniform"]["ttft_p99"], st["uniform"]["itl_p50"], st["uniform"]["itl_p99"],
             st["uniform"]["errors"]],
        ], digits=1),
        "",
        f"Ratio uniform/hot: **{result['steady_ratio']:.2f}**. Server: `{result['server_command']}`. "
        f"Load average {result['load_avg_start']:.2f} at start, {result['load_avg_end']:.2f} at end.",
    ])


def _tier_rows(result: dict) -> list[list[str]]:
    if not result.get("kv_tier_bytes"):
        return []
    warm = result["kv_tier_metrics"]
    quote = '"'
    keys = [f"softserve_kv_warmups_total{{outcome={quote}{o}{quote}}}" for o in ("done", "failed", "dropped")]
    outcomes = " / ".join(f"{warm.get(key, 0):.0f}" for key in keys)
    reads = " / ".join(f"{result['kv_tier_after'].get(f'softserve_kv_tier_{c}_total', 0):.0f}" for c in ("hits", "misses", "errors"))
    return [["every upload's KV in the disk tier (warm-ups done / failed / dropped)",
             f"{result['warm_s']:.1f} s after the first upload ({outcomes}); "
             f"{warm.get('softserve_kv_tier_bytes', 0) / 2**30:.2f} GiB on disk"],
            ["disk tier reads during the run (hits / misses / errors)", reads]]


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--num-prompts", type=int, default=None, help="default 10000; quick 50")
    p.add_argument("--cold-requests", type=int, default=None, help="default 100; quick 5")
    p.add_argument("--concurrency", type=int, default=None, help="steady-state clients (default 16; quick 2)")
    p.add_argument("--cache-prompts", type=int, default=None, help="prompts the device caches hold (default 64; quick 4)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--kv-tier", action=argparse.BooleanOptionalAction, default=True,
                   help="the prompt-KV disk tier sized for every prompt, prompts uploaded through the API (default on)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup", type=float, default=None, help="steady-state warm-up seconds (default 5; quick 1)")
    p.add_argument("--window", type=float, default=None, help="steady-state window seconds (default 20; quick 2)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
