"""Batch API vs interactive traffic, side by side in one run (one server, then run-batch offline).

    .venv/bin/python bench/batch.py [--model smollm2|tiny] [--requests 5000] [--num-prompts 64] [--probe-gap 0] [--quick]

A classification workload: `--requests` short prompts spread over `--num-prompts` soft prompts (k=8),
`--max-tokens` (4) greedy tokens each. Phases, all on one server and one machine:
1. idle: an interactive client sends `--probes` requests, one after another with `--probe-gap` seconds
   between them (0: back to back), and its p50 latency is taken; it probes again after phase 4, and the
   idle p50 is over both rounds, since the load of shared cores drifts;
2. interactive C=32: the same requests sent by 32 concurrent clients (requests/s);
3. Batch API alone: the same requests as one batch, no interactive traffic (requests/s from create to
   completed): the issue's ">= 0.9x of C=32" compares this with phase 2;
4. Batch API with probes: the same file again; once its first line is done, the client of phase 1
   probes (same gap) while the batch runs: its p50 vs idle, and the batch's requests/s during the probes
   (from its request counts, between the first and last change seen in that window); the batch is then
   cancelled (it has shown what it does under interactive traffic; it would only repeat phase 3);
5. run-batch: the server is stopped and `softserve run-batch` answers the same file offline
   (requests/s from its own summary, model load excluded), with the same --torch-threads and its own
   offline defaults (softserve/run_batch.py: --max-batch-size 512, --max-background-step-tokens 4096; `--run-batch-args` adds flags).
`--threads N` gives both the server and run-batch `--torch-threads N`; 0 (the default) gives each its own
default (every core); the table's last line says which.
Ratios printed: batch alone / C=32 throughput (goal >= 0.9), probe p50 during the batch / idle (goal <= 1.2),
batch during the probes / batch alone, run-batch / batch alone (goal >= 1.2).
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


async def probe(url: str, bodies: list[dict], gap: float = 0.0) -> list[float]:
    import httpx

    out = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i, body in enumerate(bodies):
            if i and gap:
                await asyncio.sleep(gap)
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


FINISHED = ("completed", "failed", "cancelled", "expired")
POLICY_FLAGS = ("max_background_tokens", "max_background_step_tokens", "background_grace_seconds", "background_hold_seconds")


async def create_batch(client, data: bytes) -> dict:
    file_id = (await client.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})).json()["id"]
    return (await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                   "completion_window": "24h"})).json()


async def batch_alone(url: str, data: bytes) -> tuple[float, dict]:
    """Seconds from create to completed, with no other traffic."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        started = time.perf_counter()
        batch = await create_batch(client, data)
        while batch["status"] not in FINISHED:
            await asyncio.sleep(0.1)
            batch = (await client.get(f"/v1/batches/{batch['id']}")).json()
        return time.perf_counter() - started, batch


async def batch_while_probing(url: str, data: bytes, probes: list[dict], gap: float) -> tuple[list[float], float | None, dict]:
    """Probe latencies while a batch runs, and the batch's requests/s meanwhile (None: too few count
    changes seen). The batch is cancelled once the probes are done."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        batch = await create_batch(client, data)
        get = lambda: client.get(f"/v1/batches/{batch['id']}")  # noqa: E731
        while (await get()).json()["request_counts"]["completed"] < 1:
            await asyncio.sleep(0.05)
        changes: list[tuple[float, int]] = []  # (when, completed) each time the count moved
        latencies: list[float] = []
        probing = True

        async def watch() -> None:
            last = -1
            while probing:
                record = (await get()).json()
                if record["status"] in FINISHED:
                    break
                if record["request_counts"]["completed"] != last:
                    last = record["request_counts"]["completed"]
                    changes.append((time.perf_counter(), last))
                await asyncio.sleep(0.05)

        async def send() -> None:
            nonlocal probing
            for i, body in enumerate(probes):
                if (await get()).json()["status"] in FINISHED:
                    break  # the batch is over: later probes would be idle ones
                latencies.extend(await probe(url, [body], 0.0))
                if gap and i < len(probes) - 1:
                    await asyncio.sleep(gap)
            probing = False

        started = time.perf_counter()
        await asyncio.gather(watch(), send())
        record = (await get()).json()
        # From the first change of the count to the last (it moves at store flushes; changes[0] is the
        # count when the probes began); with fewer changes, over the whole window.
        (t0, c0), (t1, c1) = (changes[1], changes[-1]) if len(changes) >= 3 else \
            ((started, changes[0][1] if changes else 0), (time.perf_counter(), record["request_counts"]["completed"]))
        rate = (c1 - c0) / (t1 - t0) if t1 > t0 else None
        if record["status"] not in FINISHED:
            await client.post(f"/v1/batches/{batch['id']}/cancel")
            while record["status"] not in FINISHED:
                await asyncio.sleep(0.1)
                record = (await get()).json()
        return latencies, rate, record


def run(args) -> dict:

    lines = workload(args.seed, args.requests, args.num_prompts, args.max_tokens)
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    probes = [dict(line["body"]) for line in workload(args.seed + 1, args.probes, args.num_prompts, args.max_tokens)]
    result: dict = {"name": "batch", "quick": args.quick, "model": args.model, "requests": args.requests, "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
                    "load_average_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        common = ["--max-batch-size", str(args.max_batch_size), "--torch-threads", str(args.threads or 0)]
        policy = []
        for flag in POLICY_FLAGS:
            if getattr(args, flag) is not None:
                policy += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
        server = Server(store, model=model_path(args.model), device=args.device, dtype=args.dtype,
                        extra_args=common + policy + ["--max-queue", "1000", "--max-queue-per-tenant", "0"]).start()
        try:
            upload_prompts(server.url, [(f"cls-{i}", safetensors_bytes(prompt_tensor(i, 8, args.hidden)))
                                        for i in range(args.num_prompts)])
            asyncio.run(probe(server.url, probes[:2]))  # warm-up
            idle = asyncio.run(probe(server.url, probes, args.probe_gap))
            seconds_c = asyncio.run(interactive(server.url, [line["body"] for line in lines], args.concurrency))
            seconds_b, batch = asyncio.run(batch_alone(server.url, data))
            loaded, probed_rps, probed = asyncio.run(batch_while_probing(server.url, data, probes, args.probe_gap))
            idle += asyncio.run(probe(server.url, probes, args.probe_gap))  # idle again: the load drifts
            result["server_command"] = server.display_command()
        finally:
            server.stop()
        assert batch["status"] == "completed" and batch["request_counts"]["completed"] == args.requests, batch
        assert probed["status"] in ("completed", "cancelled") and probed["request_counts"]["failed"] == 0, probed
        (Path(tmp) / "in.jsonl").write_bytes(data)
        cmd = [sys.executable, "-m", "softserve", "run-batch", "-i", str(Path(tmp) / "in.jsonl"), "-o",
               str(Path(tmp) / "out.jsonl"), "--store", str(store), "--device", args.device, "--dtype", args.dtype,
               "--no-progress", "--model", str(model_path(args.model)), "--torch-threads", str(args.threads or 0)]
        cmd += args.run_batch_args.split()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        offline = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update({
        "idle_p50_s": median(idle), "loaded_p50_s": median(loaded) if loaded else None,
        "probes_during_batch": len(loaded), "probe_gap_s": args.probe_gap,
        "idle_latencies_s": idle, "loaded_latencies_s": loaded,
        "interactive_rps": args.requests / seconds_c, "batch_rps": args.requests / seconds_b,
        "batch_rps_during_probes": probed_rps, "run_batch_rps": offline["requests_per_s"],
        "load_average_after": load_average(), "run_batch_args": args.run_batch_args,
        "policy": {flag: getattr(args, flag) for flag in
                   POLICY_FLAGS},
    })
    result["ratio_batch_vs_interactive"] = result["batch_rps"] / result["interactive_rps"]
    result["ratio_p50_loaded_vs_idle"] = result["loaded_p50_s"] / result["idle_p50_s"] if loaded else None
    result["ratio_probed_vs_batch"] = probed_rps / result["batch_rps"] if probed_rps else None
    result["ratio_run_batch_vs_batch"] = result["run_batch_rps"] / result["batch_rps"]
    result["ratio_run_batch_vs_interactive"] = result["run_batch_rps"] / result["interactive_rps"]
    return result


def _x(value) -> str:
    return "n/a" if value is None else f"{fmt(value, 2)}x"


def render(result: dict, args) -> str:
    gap = result["probe_gap_s"]
    probing = f"one after another, {gap:g} s apart" if gap else "back to back"
    loaded_ms = "n/a" if result["loaded_p50_s"] is None else f"{fmt(result['loaded_p50_s'] * 1000, 0)} ms"
    probed_rps = result["batch_rps_during_probes"]
    threads = (f"{args.threads} (--threads {args.threads}) for the server and run-batch" if args.threads else
               f"each side's default (--torch-threads 0: torch's, {result.get('machine', {}).get('torch_threads_default', '?')} "
               "in this process) for the server and run-batch")
    policy = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in result["policy"].items() if v is not None)
    return "\n".join([
        f"### Batch API: {result['requests']} requests over {result['num_prompts']} prompts (k=8), "
        f"{result['max_tokens']} tokens each",
        "",
        "| measurement | value | ratio | goal |",
        "| --- | ---: | ---: | --- |",
        f"| interactive client, C={args.concurrency} | {fmt(result['interactive_rps'], 1)} req/s | 1.00x | |",
        f"| Batch API alone (create to completed) | {fmt(result['batch_rps'], 1)} req/s | "
        f"{_x(result['ratio_batch_vs_interactive'])} | >= 0.9x |",
        f"| run-batch offline | {fmt(result['run_batch_rps'], 1)} req/s | {_x(result['ratio_run_batch_vs_batch'])} "
        f"of the Batch API ({_x(result['ratio_run_batch_vs_interactive'])} of C={args.concurrency}) | >= 1.2x |",
        f"| interactive p50, idle (before and after the batches; probes {probing}) | "
        f"{fmt(result['idle_p50_s'] * 1000, 0)} ms | 1.00x | |",
        f"| interactive p50, batch running ({result['probes_during_batch']} probes, {probing}) | "
        f"{loaded_ms} | {_x(result['ratio_p50_loaded_vs_idle'])} | <= 1.2x |",
        f"| Batch API while those probes ran | "
        f"{'n/a' if probed_rps is None else fmt(probed_rps, 1) + ' req/s'} | {_x(result['ratio_probed_vs_batch'])} "
        f"of the batch alone | |",
        "",
        f"Load average {fmt(result['load_average_before'], 1)} before, {fmt(result['load_average_after'], 1)} after; "
        f"server policy: {policy or 'the defaults'}; --probe-gap {gap:g}; run-batch: its offline defaults"
        f"{' with ' + result['run_batch_args'] if result['run_batch_args'] else ''}; torch threads: {threads}.",
    ])


def main(argv=None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--probes", type=int, default=30, help="interactive requests timed idle and during the batch")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--probe-gap", type=float, default=0.0,
                        help="seconds between the probe client's requests (0: back to back)")
    parser.add_argument("--max-background-tokens", type=int, default=None,
                        help="the server's --max-background-tokens (default: the server's default)")
    parser.add_argument("--max-background-step-tokens", type=int, default=None,
                        help="the server's --max-background-step-tokens (default: the server's default)")
    parser.add_argument("--background-grace-seconds", type=float, default=None,
                        help="the server's --background-grace-seconds (default: the server's default)")
    parser.add_argument("--background-hold-seconds", type=float, default=None,
                        help="the server's --background-hold-seconds (default: the server's default)")
    parser.add_argument("--run-batch-args", default="",
                        help="more flags for run-batch (default: none; e.g. '--max-batch-size 32' for the server's rows)")
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
