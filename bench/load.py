"""Heterogeneity tax: closed-loop streaming load against a live server, one prompt vs many.

Starts `python -m softserve serve` on a free 127.0.0.1 port (stops exactly that PID at the end), uploads
soft prompts through `PUT /v1/prompts/{name}`, then for each concurrency C runs C closed-loop clients
(each sends a request, reads the SSE stream to the end, sends the next) in three configurations:

  (a) one prompt for everyone            model = uni-0
  (b) C distinct prompts                 client i always uses het-i
  (c) N prompts drawn Zipf-like (s=1)    every request draws zipf-r, P(r) ~ 1/r

Every request: 32-64 prompt tokens (token ids, the same sequence of inputs in every configuration),
64 generated tokens fixed with `ignore_eos: true` + `min_tokens`, greedy, `stream: true`.
Configurations alternate (a b c, then c b a, ...) so CPU noise from other processes hits all alike;
the headline is the ratio (b)/(a) measured side by side.

Metrics over a window after a warm-up: output tokens/s (SSE content chunks inside the window; the
server sends one chunk per decoded token, the chunk/token ratio is checked against `usage`), TTFT
(request sent -> first chunk) and inter-token latency (gap between consecutive chunks of a request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

CONFIGS = {
    "a": "(a) one prompt",
    "b": "(b) C distinct prompts",
    "c": "(c) Zipf over N prompts",
}


@dataclass
class Record:
    client: int
    model: str
    t_start: float
    chunk_times: list[float] = field(default_factory=list)
    completion_tokens: int | None = None  # from `usage`, when the request completed
    error: str | None = None


# ---- the load generator (also used by prompt_scale.py) --------------------------------------------
async def _one_request(client, fields: dict, max_tokens: int, rec: Record) -> None:
    """`fields` names the model and the input ("prompt" ids, or vLLM's "prompt_embeds")."""
    body = {
        **fields, "max_tokens": max_tokens, "min_tokens": max_tokens, "ignore_eos": True,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            rec.error = f"{resp.status_code} {(await resp.aread())[:200]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            now = time.perf_counter()
            data = line[5:].strip()
            if data == "[DONE]":
                return
            if '"usage"' in data or '"error"' in data:
                obj = json.loads(data)
                if "error" in obj:
                    rec.error = str(obj["error"].get("message"))[:200]
                    return
                if obj.get("usage") and not obj.get("choices"):
                    rec.completion_tokens = obj["usage"]["completion_tokens"]
                    continue
            rec.chunk_times.append(now)


async def closed_loop(url: str, concurrency: int, choose: Callable[[int, random.Random], str], inputs: list[list[int]],
                      *, max_tokens: int, warmup: float, window: float, seed: int,
                      payload: Callable[[int], dict] | None = None) -> dict:
    """C clients, each: request -> read stream to the end -> next request, until warm-up + window ends.

    Request i (client c sends i = c, c + C, ...) asks `choose` for its model and takes inputs[i] as its
    prompt ids, or, with `payload`, sends payload(i)'s model and input fields instead (bench/vs_vllm.py).
    In-flight requests are cancelled at the end (the server aborts them) and a 1-token probe request
    waits until the engine has dropped them, so the next run starts on an idle server."""
    import httpx

    records: list[Record] = []
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        t_window = t0 + warmup
        t_end = t_window + window

        async def run_client(cid: int) -> None:
            rng = random.Random(seed * 1_000_003 + cid)
            # Stagger the first requests over most of the warm-up: clients that all start at once stay in
            # lock-step cohorts (prefill together, finish together), and a window then counts whole cohorts.
            await asyncio.sleep(rng.uniform(0, 0.8 * warmup))
            i = cid
            while time.perf_counter() < t_end:
                if payload is not None:
                    fields = payload(i)
                else:
                    fields = {"model": choose(cid, rng), "prompt": inputs[i % len(inputs)]}
                rec = Record(client=cid, model=fields["model"], t_start=time.perf_counter())
                records.append(rec)
                try:
                    await _one_request(client, fields, max_tokens, rec)
                except httpx.HTTPError as exc:
                    rec.error = repr(exc)[:200]
                    await asyncio.sleep(0.05)
                i += concurrency

        tasks = [asyncio.ensure_future(run_client(c)) for c in range(concurrency)]
        await asyncio.sleep(max(0.0, t_end - time.perf_counter()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await _idle_barrier(url)
    return {"records": records, "t_window": t_window, "t_end": t_end}


async def _idle_barrier(url: str) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600.0) as client:
        models = (await client.get("/v1/models")).json()["data"]
        base = models[0]["id"]
        await client.post("/v1/completions", json={"model": base, "prompt": [200, 201], "max_tokens": 1})


def cache_counters(url: str) -> dict[str, float]:
    """Cache hit/miss/eviction counters from the server's Prometheus /metrics ({} if unavailable)."""
    import httpx

    try:
        values = C.metric_values(url)
    except httpx.HTTPError:
        return {}
    return {name.replace("softserve_", "").replace("_total", ""): value for name, value in values.items()
            if "cache" in name and name.endswith(("_total", "_bytes"))}


def counter_delta(before: dict, after: dict) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if not k.endswith("_bytes")}


def summarize(run: dict) -> dict:
    records: list[Record] = run["records"]
    t_w, t_e = run["t_window"], run["t_end"]
    tokens = sum(1 for r in records for t in r.chunk_times if t_w <= t < t_e)
    ttft = [1000 * (r.chunk_times[0] - r.t_start) for r in records
            if r.chunk_times and t_w <= r.t_start and r.chunk_times[0] < t_e]
    itl = [1000 * (b - a) for r in records for a, b in zip(r.chunk_times, r.chunk_times[1:]) if t_w <= a and b < t_e]
    done = [r for r in records if r.completion_tokens is not None]
    chunks = sum(len(r.chunk_times) for r in done)
    usage = sum(r.completion_tokens for r in done)
    errors = [r.error for r in records if r.error]
    # A token that ends inside a UTF-8 character is sent with the next one (one chunk, two tokens):
    # scale chunk counts by the chunk/token ratio of the completed requests (usage is exact).
    ratio = (chunks / usage) if usage else 1.0
    return {
        "tokens_per_s": tokens / ratio / (t_e - t_w),
        "window_chunks": tokens,
        "ttft_ms": ttft,
        "itl_ms": itl,
        "completed": len(done),
        "chunk_token_ratio": (chunks / usage) if usage else None,  # tokens/s above is already corrected
        "errors": errors[:5],
        "num_errors": len(errors),
    }


# ---- the benchmark ----------------------------------------------------------------------------------
def hidden_size(model_dir: Path) -> int:
    if model_dir.is_file():  # a .gguf file
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir.parent, gguf_file=model_dir.name)
        return cfg.get_text_config().hidden_size
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return int(cfg["hidden_size"])


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (r ** s) for r in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def make_chooser(config: str, concurrency: int, zipf_cum: list[float]) -> Callable[[int, random.Random], str]:
    import bisect

    if config == "a":
        return lambda cid, rng: "uni-0"
    if config == "b":
        return lambda cid, rng: f"het-{cid % concurrency}"
    return lambda cid, rng: f"zipf-{bisect.bisect_left(zipf_cum, rng.random() * zipf_cum[-1])}"


def run(args) -> dict:
    quick = args.quick
    concurrencies = [int(x) for x in args.concurrency.split(",")] if args.concurrency else ([1, 4] if quick else [1, 4, 16, 32, 64])
    n_zipf = args.num_prompts or (16 if quick else 1000)
    warmup = args.warmup if args.warmup is not None else (1.0 if quick else 8.0)
    window = args.window if args.window is not None else (3.0 if quick else 20.0)
    rounds = args.rounds or (1 if quick else 2)
    configs = list(args.configs)
    mdir = C.model_path(args.model)
    hidden = hidden_size(mdir)
    k = args.k

    result: dict = {
        "name": "load", "quick": quick, "model": C.model_label(args.model), "concurrency": concurrencies,
        "num_zipf_prompts": n_zipf, "zipf_s": args.zipf_s, "k": k, "max_tokens": args.max_tokens,
        "prompt_tokens": "32-64", "warmup_s": warmup, "window_s": window, "rounds": rounds, "configs": configs,
        "load_avg_start": C.load_average(), "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="softserve-bench-load-") as tmp:
        server = C.Server(Path(tmp) / "store", model=mdir, device=args.device, dtype=args.dtype,
                          extra_args=args.server_args.split() if args.server_args else [], log_dir=Path(tmp), threads=args.threads)
        result["server_command"] = server_display = None
        t = time.perf_counter()
        server.start()
        result["server_start_s"] = time.perf_counter() - t
        server_display = server.display_command()
        result["server_command"] = server_display
        try:
            items = [("uni-0", C.safetensors_bytes(C.prompt_tensor(1, k, hidden)))]
            items += [(f"het-{i}", C.safetensors_bytes(C.prompt_tensor(1000 + i, k, hidden))) for i in range(max(concurrencies))]
            items += [(f"zipf-{i}", C.safetensors_bytes(C.prompt_tensor(100_000 + i, k, hidden))) for i in range(n_zipf)]
            result["upload_s"] = C.upload_prompts(server.url, items)
            result["num_uploaded"] = len(items)
            print(f"uploaded {len(items)} prompts in {result['upload_s']:.1f} s", file=sys.stderr, flush=True)
            # Warm the prompts of (a) and (b): their steady state is "prompt already loaded".
            # (c) is left cold on purpose: its long tail keeps missing, as in production.
            warm = ["uni-0"] + [f"het-{i}" for i in range(max(concurrencies))]
            asyncio.run(_warm(server.url, warm))
            inputs = C.request_inputs(args.seed, 4096)
            zipf_cum = []
            acc = 0.0
            for w in zipf_weights(n_zipf, args.zipf_s):
                acc += w
                zipf_cum.append(acc)
            for conc in concurrencies:
                for r in range(rounds):
                    order = configs if r % 2 == 0 else configs[::-1]
                    for cfg in order:
                        before = cache_counters(server.url)
                        raw = asyncio.run(closed_loop(server.url, conc, make_chooser(cfg, conc, zipf_cum), inputs,
                                                      max_tokens=args.max_tokens, warmup=warmup, window=window,
                                                      seed=args.seed + r))
                        s = summarize(raw)
                        s.update(concurrency=conc, config=cfg, round=r, load_avg=C.load_average(),
                                 cache=counter_delta(before, cache_counters(server.url)))
                        result["runs"].append(s)
                        print(f"C={conc:3d} {cfg} round {r}: {s['tokens_per_s']:.1f} tok/s, "
                              f"ttft p50 {C.median(s['ttft_ms']):.0f} ms, itl p50 {C.median(s['itl_ms']):.0f} ms, "
                              f"errors {s['num_errors']}, cache {s['cache']}", file=sys.stderr, flush=True)
        finally:
            server.stop()
    result["load_avg_end"] = C.load_average()
    result["table"] = aggregate(result)
    for x in result["runs"]:  # keep the JSON small: the pooled percentiles are in the table
        x["num_ttft"], x["num_itl"] = len(x.pop("ttft_ms")), len(x.pop("itl_ms"))
    return result


async def _warm(url: str, models: list[str]) -> None:
    import httpx

    sem = asyncio.Semaphore(16)
    async with httpx.AsyncClient(base_url=url, timeout=600.0) as client:
        async def one(m: str) -> None:
            async with sem:
                r = await client.post("/v1/completions", json={"model": m, "prompt": [300, 301, 302], "max_tokens": 1})
                r.raise_for_status()

        await asyncio.gather(*(one(m) for m in models))


def aggregate(result: dict) -> list[dict]:
    """One row per (C, config): mean tokens/s over rounds; latencies pooled over rounds."""
    rows = []
    for conc in result["concurrency"]:
        for cfg in result["configs"]:
            runs = [x for x in result["runs"] if x["concurrency"] == conc and x["config"] == cfg]
            if not runs:
                continue
            ttft = [v for x in runs for v in x["ttft_ms"]]
            itl = [v for x in runs for v in x["itl_ms"]]
            ratios = [x["chunk_token_ratio"] for x in runs if x["chunk_token_ratio"]]
            rows.append({
                "concurrency": conc, "config": cfg,
                "tokens_per_s": sum(x["tokens_per_s"] for x in runs) / len(runs),
                "tokens_per_s_rounds": [x["tokens_per_s"] for x in runs],
                "ttft_p50": C.percentile(ttft, 50), "ttft_p99": C.percentile(ttft, 99),
                "itl_p50": C.percentile(itl, 50), "itl_p99": C.percentile(itl, 99),
                "requests": sum(x["completed"] for x in runs), "errors": sum(x["num_errors"] for x in runs),
                "chunk_token_ratio": min(ratios) if ratios else None,
                "kv_prefix_misses": sum(x.get("cache", {}).get("kv_prefix_cache_misses", 0) for x in runs),
                "kv_prefix_evictions": sum(x.get("cache", {}).get("kv_prefix_cache_evictions", 0) for x in runs),
                "prompt_cache_misses": sum(x.get("cache", {}).get("prompt_cache_misses", 0) for x in runs),
            })
    return rows


def ratio_rows(result: dict) -> list[dict]:
    table = {(r["concurrency"], r["config"]): r for r in result["table"]}
    out = []
    for conc in result["concurrency"]:
        a = table.get((conc, "a"))
        row = {"concurrency": conc}
        for cfg in result["configs"]:
            x = table.get((conc, cfg))
            row[cfg] = x["tokens_per_s"] if x else None
        for cfg in ("b", "c"):
            x = table.get((conc, cfg))
            row[f"{cfg}/a"] = (x["tokens_per_s"] / a["tokens_per_s"]) if (x and a and a["tokens_per_s"]) else None
        out.append(row)
    return out


def render(result: dict) -> str:
    cfgs = result["configs"]
    lines = [
        f"### Heterogeneity tax (live server, {result['model']}, k={result['k']} virtual tokens, "
        f"{result['prompt_tokens']} prompt tokens, {result['max_tokens']} output tokens, "
        f"{result['rounds']} round(s) x {result['window_s']:.0f} s window after {result['warmup_s']:.0f} s warm-up)",
        "",
        "Output tokens/s (mean over rounds) and the ratios measured side by side:",
        "",
    ]
    headers = ["C"] + [CONFIGS[c] for c in cfgs] + (["(b)/(a)"] if "b" in cfgs else []) + (["(c)/(a)"] if "c" in cfgs else [])
    rows = []
    for r in ratio_rows(result):
        row = [r["concurrency"]] + [r[c] for c in cfgs]
        if "b" in cfgs:
            row.append(r["b/a"])
        if "c" in cfgs:
            row.append(r["c/a"])
        rows.append(row)
    lines.append(C.md_table(headers, rows, digits=2))
    lines += ["", "Latency (streaming; TTFT = request sent -> first token chunk; ITL = gap between token chunks):", ""]
    def n_ttft(r: dict) -> int | str:
        runs = [x for x in result["runs"] if x["concurrency"] == r["concurrency"] and x["config"] == r["config"]]
        return sum(x.get("num_ttft", 0) for x in runs) if runs and "num_ttft" in runs[0] else "?"

    lat = [[r["concurrency"], CONFIGS[r["config"]], r["ttft_p50"], r["ttft_p99"], n_ttft(r), r["itl_p50"], r["itl_p99"],
            r["requests"], r["errors"], r.get("kv_prefix_misses", "?"), r.get("kv_prefix_evictions", "?")]
           for r in result["table"]]
    lines.append(C.md_table(["C", "config", "TTFT p50 ms", "TTFT p99 ms", "TTFT samples", "ITL p50 ms", "ITL p99 ms",
                             "completed", "errors", "prompt-KV misses", "evictions"], lat, digits=0))
    lines += ["", "TTFT samples are requests that started inside the window and got their first token before it closed; "
              "at high C a request lasts about as long as the window, so few start inside it (– = none)."]
    ratios = [r["chunk_token_ratio"] for r in result["table"] if r["chunk_token_ratio"]]
    lines += ["",
              f"Server: `{result.get('server_command')}` (started in {result.get('server_start_s', 0):.1f} s); "
              f"{result.get('num_uploaded', 0)} prompts uploaded via `PUT /v1/prompts/{{name}}` in "
              f"{result.get('upload_s', 0):.1f} s. (c) draws from {result['num_zipf_prompts']} prompts, "
              f"P(rank r) ~ 1/r^{result['zipf_s']}, and is not pre-warmed. "
              f"Tokens/s counts SSE chunks in the window divided by the run's chunks-per-token ratio from `usage` "
              f"(min {min(ratios) if ratios else float('nan'):.3f}: a token ending inside a UTF-8 character rides with "
              f"the next chunk, which also makes a few ITL gaps two steps long). Load average {result['load_avg_start']:.2f} at start, "
              f"{result['load_avg_end']:.2f} at end."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--concurrency", default=None, help="comma list (default 1,4,16,32,64; quick 1,4)")
    p.add_argument("--configs", default="abc", help="subset of a, b, c")
    p.add_argument("--num-prompts", type=int, default=None, help="prompts for (c) (default 1000; quick 16)")
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--k", type=int, default=16, help="virtual tokens per soft prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--window", type=float, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--server-args", default="", help="extra flags for `server serve`, space separated")
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
