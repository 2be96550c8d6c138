"""Batch API vs interactive traffic, side by side in one run (one server, then run-batch offline).

    .venv/bin/python bench/batch.py [--model smollm2|tiny] [--requests 5000] [--num-prompts 64] [--quick]

A classification workload: `--requests` short prompts spread over `--num-prompts` soft prompts (k=8),
`--max-tokens` (4) greedy tokens each. Phases, all on one server and one machine:
1. idle: an interactive client sends `--probes` requests one after another (its p50 latency; it probes
   again after phase 3, and the idle p50 is over both rounds, since the load of shared cores drifts);
2. interactive C=32: the same requests sent by 32 concurrent clients (requests/s);
3. Batch API: the same requests as one batch (requests/s from create to completed) while the
   interactive client of phase 1 probes again (its p50 latency, vs idle);
4. run-batch: the server is stopped and `softserve run-batch` answers the same file offline
   (requests/s from its own summary, model load excluded).
Ratios printed: batch / C=32 throughput (goal >= 0.9), probe p50 during the batch / idle (goal <= 1.2),
run-batch / live batch throughput (goal >= 1.2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    REPO_ROOT, Server, add_common_args, fmt, load_average, machine_facts, median, model_path, prompt_tensor,
    safetensors_bytes, upload_prompts, write_json,
)

WORDS = ("order", "refund", "late", "broken", "great", "slow", "printer", "login", "charge", "thanks", "never",
         "arrived", "screen", "battery", "support", "again", "works", "fine", "error", "crash")


def workload(seed: int, requests: int, num_prompts: int, max_tokens: int) -> list[dict]:
    rng = random.Random(seed)
    lines = []
    for i in range(requests):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 24)))
        lines.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                      "body": {"model": f"cls-{i % num_prompts}", "prompt": f"Ticket: {text}\nLabel:",
                               "max_tokens": max_tokens, "temperature": 0}})
    return lines


async def probe(url: str, bodies: list[dict]) -> list[float]:
    import httpx

    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for body in bodies:
            started = time.perf_counter()
            (await client.post("/v1/completions", json=body)).raise_for_status()
            out.append(time.perf_counter() - started)
    return out


async def interactive(url: str, bodies: list[dict], concurrency: int) -> float:
    """Seconds for `concurrency` clients to send every body (a tuned client: keep-alive, retries on 429)."""
    import httpx

    queue = list(reversed(bodies))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client) -> None:
        while queue:
            body = queue.pop()
            while (await client.post("/v1/completions", json=body)).status_code == 429:
                await asyncio.sleep(0.05)

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return time.perf_counter() - started


async def batch_while_probing(url: str, data: bytes, probes: list[dict]) -> tuple[float, list[float], dict]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        file_id = (await client.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})).json()["id"]
        started = time.perf_counter()
        batch = (await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                        "completion_window": "24h"})).json()
        while (await client.get(f"/v1/batches/{batch['id']}")).json()["request_counts"]["completed"] < 1:
            await asyncio.sleep(0.05)
        latencies: list[float] = []
        while True:  # probe for as long as the batch runs
            batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
            if batch["status"] in ("completed", "failed", "cancelled", "expired"):
                break
            if len(latencies) < len(probes):
                latencies += await probe(url, [probes[len(latencies)]])
            else:
                await asyncio.sleep(0.1)
        return time.perf_counter() - started, latencies, batch


def run(args) -> dict:

    lines = workload(args.seed, args.requests, args.num_prompts, args.max_tokens)
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    probes = [dict(line["body"]) for line in workload(args.seed + 1, args.probes, args.num_prompts, args.max_tokens)]
    result: dict = {"name": "batch", "quick": args.quick, "model": args.model, "requests": args.requests, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                    "load_average_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        common = ["--max-batch-size", str(args.max_batch_size), "--torch-threads", str(args.threads or 0)]
        policy = [] if args.max_background_tokens is None else ["--max-background-tokens", str(args.max_background_tokens)]
        server = Server(store, model=model_path(args.model), device=args.device, dtype=args.dtype,
                        extra_args=common + policy + ["--max-queue", "1000", "--max-queue-per-tenant", "0"]).start()
        try:
            upload_prompts(server.url, [(f"cls-{i}", safetensors_bytes(prompt_tensor(i, 8, args.hidden)))
                                        for i in range(args.num_prompts)])
            asyncio.run(probe(server.url, probes[:2]))  # warm-up
            idle = asyncio.run(probe(server.url, probes))
            seconds_c = asyncio.run(interactive(server.url, [line["body"] for line in lines], args.concurrency))
            seconds_b, loaded, batch = asyncio.run(batch_while_probing(server.url, data, probes))
            idle += asyncio.run(probe(server.url, probes))  # idle again: the machine's load drifts (shared cores)
            result["server_command"] = server.display_command()
        finally:
            server.stop()
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == args.requests, batch
        (Path(tmp) / "in.jsonl").write_bytes(data)
        cmd = [sys.executable, "-m", "softserve", "run-batch", "-i", str(Path(tmp) / "in.jsonl"), "-o",
               str(Path(tmp) / "out.jsonl"), "--store", str(store), "--device", args.device, "--dtype", args.dtype,
               "--no-progress", "--model", str(model_path(args.model))] + common
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        offline = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update({
        "idle_p50_s": median(idle), "loaded_p50_s": median(loaded), "probes_during_batch": len(loaded),
        "idle_latencies_s": idle, "loaded_latencies_s": loaded,
        "interactive_rps": args.requests / seconds_c, "batch_rps": args.requests / seconds_b,
        "run_batch_rps": offline["requests_per_s"], "load_average_after": load_average(),
        "max_background_tokens": args.max_background_tokens,
    })
    result["ratio_batch_vs_interactive"] = result["batch_rps"] / result["interactive_rps"]
    result["ratio_p50_loaded_vs_idle"] = result["loaded_p50_s"] / result["idle_p50_s"]
    result["ratio_run_batch_vs_batch"] = result["run_batch_rps"] / result["batch_rps"]
    result["ratio_run_batch_vs_interactive"] = result["run_batch_rps"] / result["interactive_rps"]
    return result


def render(result: dict, args) -> str:
    return "\n".join([
        f"### Batch API: {result['requests']} requests over {result['num_prompts']} prompts (k=8), "
        f"{result['max_tokens']} tokens each",
        "",
        "| measurement | value | ratio | goal |",
        "| --- | ---: | ---: | --- |",
        f"| interactive client, C={args.concurrency} | {fmt(result['interactive_rps'], 1)} req/s | 1.00x | |",
        f"| Batch API (create to completed) | {fmt(result['batch_rps'], 1)} req/s | "
        f"{fmt(result['ratio_batch_vs_interactive'], 2)}x | >= 0.9x |",
        f"| run-batch offline | {fmt(result['run_batch_rps'], 1)} req/s | {fmt(result['ratio_run_batch_vs_batch'], 2)}x "
        f"of the Batch API ({fmt(result['ratio_run_batch_vs_interactive'], 2)}x of C={args.concurrency}) | >= 1.2x |",
        f"| interactive p50, idle (before and after the batch) | {fmt(result['idle_p50_s'] * 1000, 0)} ms | 1.00x | |",
        f"| interactive p50, batch running ({result['probes_during_batch']} probes) | "
        f"{fmt(result['loaded_p50_s'] * 1000, 0)} ms | {fmt(result['ratio_p50_loaded_vs_idle'], 2)}x | <= 1.2x |",
        "",
        f"Load average {fmt(result['load_average_before'], 1)} before, {fmt(result['load_average_after'], 1)} after; "
        f"server --max-background-tokens {result['max_background_tokens'] or 'default'}.",
    ])


def main(argv=None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--probes", type=int, default=30, help="interactive requests timed idle and during the batch")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-background-tokens", type=int, default=None,
                        help="the server's --max-background-tokens (default: the server's default)")
    parser.add_argument("--hidden", type=int, default=576, help="the model's hidden size (576: SmolLM2-135M)")
    args = parser.parse_args(argv)
    if args.quick:  # at most these sizes (smaller ones given on the command line stay)
        args.model = "tiny"
        args.requests, args.num_prompts, args.probes = min(args.requests, 60), min(args.num_prompts, 4), min(args.probes, 4)
        args.concurrency, args.max_batch_size = min(args.concurrency, 8), min(args.max_batch_size, 8)
    if args.model == "tiny":
        args.hidden = 64
    result = run(args)
    result["machine"] = machine_facts()
    print(render(result, args))
    write_json(args, result)
    return result


if __name__ == "__main__":
    main()
