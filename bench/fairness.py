"""Fairness between tenants: tenant A floods the server, tenant B sends one request at a time.

Measures B's end-to-end latency unloaded and while A keeps `--flood` requests in flight, in one run,
and prints the ratio (goal: <= 2x). The scheduler admits waiting requests by S-LoRA's virtual token
counter, so B's request takes the next free row instead of queueing behind A's backlog.

    .venv/bin/python bench/fairness.py [--model smollm2|tiny] [--flood 50] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Server, add_common_args, fmt, machine_facts, median, model_path, percentile, request_inputs, write_json  # noqa: E402


async def _b_requests(url: str, key: str, model: str, inputs, max_tokens: int) -> list[float]:
    import httpx

    latencies = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        for ids in inputs:
            started = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": model, "prompt": ids, "max_tokens": max_tokens,
                                                           "ignore_eos": True, "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - started)
    return latencies


async def _flood(url: str, key: str, model: str, clients: int, inputs, max_tokens: int, stop: asyncio.Event, counter: list[int]):
    import httpx

    async def one(i: int) -> None:
        rng = random.Random(i)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
            while not stop.is_set():
                r = await client.post("/v1/completions", json={"model": model, "prompt": rng.choice(inputs),
                                                               "max_tokens": max_tokens, "ignore_eos": True})
                if r.status_code == 200:
                    counter[0] += 1

    await asyncio.gather(*(one(i) for i in range(clients)))


async def _running(url: str, key: str) -> float:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=10, headers={"Authorization": f"Bearer {key}"}) as client:
        text = (await client.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("softserve_running_requests "):
            return float(line.split()[1])
    return 0.0


async def measure(url: str, keys: dict[str, str], model: str, args) -> dict:
    b_inputs = request_inputs(args.seed + 1, args.b_requests, 32, 48)
    a_inputs = request_inputs(args.seed + 2, 64, 32, 64)
    await _b_requests(url, keys["B"], model, b_inputs[:1], 4)  # warm-up
    unloaded = await _b_requests(url, keys["B"], model, b_inputs, args.max_tokens)
    stop, done = asyncio.Event(), [0]
    flood = asyncio.create_task(_flood(url, keys["A"], model, args.flood, a_inputs, args.a_max_tokens, stop, done))
    deadline = time.monotonic() + 120
    while await _running(url, keys["ops"]) < min(args.flood, args.max_batch_size) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    loaded = await _b_requests(url, keys["B"], model, b_inputs, args.max_tokens)
    stop.set()
    await flood
    return {
        "b_unloaded_p50_s": median(unloaded), "b_unloaded_p99_s": percentile(unloaded, 99),
        "b_loaded_p50_s": median(loaded), "b_loaded_p99_s": percentile(loaded, 99),
        "ratio_p50": median(loaded) / median(unloaded), "ratio_max": max(loaded) / median(unloaded),
        "a_requests_completed": done[0],
    }


def run(args) -> dict:
    from softserve.service.auth import add_key

    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys.yaml"
        keys = {t: add_key(keys_file, t, "user") for t in ("A", "B")}
        keys["ops"] = add_key(keys_file, "ops", "admin")  # /metrics needs an admin key
        server = Server(Path(tmp) / "store", model=model_path(args.model), device=args.device, dtype=args.dtype,
                        extra_args=["--api-keys", str(keys_file), "--max-batch-size", str(args.max_batch_size),
                                    "--max-queue", "1000", "--torch-threads", str(args.threads or 0)])
        server.start()
        try:
            import httpx

            model = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {keys['B']}"}).json()["data"][0]["id"]
            result = asyncio.run(measure(server.url, keys, model, args))
            result["server_command"] = server.display_command()
        finally:
            server.stop()
    return result


def render(result: dict, args) -> str:
    return "\n".join([
        f"### Fairness: tenant A floods ({args.flood} concurrent, {args.a_max_tokens} tokens each), tenant B one at a time",
        "",
        "| B latency | unloaded | while A floods | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| p50 (s) | {fmt(result['b_unloaded_p50_s'], 2)} | {fmt(result['b_loaded_p50_s'], 2)} | {fmt(result['ratio_p50'], 2)}x |",
        f"| max (s) | – | {fmt(max(result['b_loaded_p99_s'], 0), 2)} (p99) | {fmt(result['ratio_max'], 2)}x |",
        "",
        f"B: {args.b_requests} sequential requests of {args.max_tokens} tokens; A completed {result['a_requests_completed']} "
        f"requests meanwhile. Goal: B within 2x of unloaded.",
    ])


def main(argv=None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--flood", type=int, default=50, help="tenant A's concurrent requests")
    parser.add_argument("--b-requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per B request")
    parser.add_argument("--a-max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.flood, args.b_requests, args.max_tokens, args.a_max_tokens = "tiny", 8, 2, 4, 8
        args.max_batch_size = 4
    result = run(args)
    result["machine"] = machine_facts()
    print(render(result, args))
    write_json(args, result)
    return result


if __name__ == "__main__":
    main()
