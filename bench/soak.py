"""Soak: mixed load for N minutes; reports errors, lost requests and server RSS over time.

Several tenants; streaming and non-streaming clients; some clients disconnect mid-stream; an admin
task uploads new prompt versions and deletes/re-creates prompts meanwhile. A request is "lost" when
it got neither a complete response nor an error (a stream without a finish_reason and [DONE], a
transport error that is not our own disconnect). Goal: 0 lost, RSS flat after warm-up.

    .venv/bin/python bench/soak.py --minutes 10 [--model tiny|smollm2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Server, add_common_args, fmt, machine_facts, model_path, prompt_tensor, safetensors_bytes, write_json  # noqa: E402

TENANTS = ("acme", "globex", "initech")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Stats:
    def __init__(self) -> None:
        self.outcomes: Counter = Counter()
        self.lost: list[str] = []


async def _upload(client, name: str, seed: int, hidden: int) -> int:
    blob = safetensors_bytes(prompt_tensor(seed, 4 + seed % 12, hidden))
    r = await client.put(f"/v1/prompts/{name}", files={"adapter_model": ("p.safetensors", blob)})
    return r.status_code


async def _client_loop(url: str, key: str, models: list[str], stats: Stats, stop: float, rng: random.Random) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as client:
        while time.monotonic() < stop:
            model = rng.choice(models)
            body = {"model": model, "prompt": "Once upon a time " * rng.randint(1, 6), "max_tokens": rng.randint(4, 48),
                    "temperature": rng.choice([0, 0.8]), "seed": rng.randint(0, 1000)}
            kind = rng.choices(["plain", "stream", "disconnect", "chat"], [4, 3, 1, 2])[0]
            try:
                if kind == "plain":
                    r = await client.post("/v1/completions", json=body)
                    stats.outcomes[f"plain {r.status_code}"] += 1
                    if r.status_code == 200 and r.json()["choices"][0]["finish_reason"] is None:
                        stats.lost.append(f"plain without finish_reason: {model}")
                elif kind == "chat":
                    body = {k: v for k, v in body.items() if k != "prompt"} | {"messages": [{"role": "user", "content": "hi"}]}
                    r = await client.post("/v1/chat/completions", json=body)
                    stats.outcomes[f"chat {r.status_code}"] += 1
                else:
                    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                        if r.status_code != 200:
                            await r.aread()
                            stats.outcomes[f"stream {r.status_code}"] += 1
                            continue
                        finished = done = False
                        chunks = 0
                        async for line in r.aiter_lines():
                            if not line.startswith("data: "):
                                continue
                            if line == "data: [DONE]":
                                done = True
                                break
                            payload = json.loads(line[6:])
                            if "error" in payload:
                                finished = True
                                stats.outcomes["stream error-event"] += 1
                                continue
                            chunks += 1
                            finished |= payload["choices"][0]["finish_reason"] is not None
                            if kind == "disconnect" and chunks >= 2:
                                break  # leave mid-stream: the server must free the row
                        if kind == "disconnect" and not done:
                            stats.outcomes["stream disconnected (intended)"] += 1
                        elif finished and done:
                            stats.outcomes["stream 200"] += 1
                        else:
                            stats.lost.append(f"stream ended without finish/[DONE]: {model}")
            except httpx.TransportError as exc:
                stats.lost.append(f"transport error {type(exc).__name__}: {model}")


async def _admin_loop(url: str, keys: dict, hidden: int, stats: Stats, stop: float, rng: random.Random) -> None:
    import httpx

    seed = 1000
    clients = {t: httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {keys[t]}"}, timeout=60) for t in TENANTS}
    try:
        while time.monotonic() < stop:
            tenant = rng.choice(TENANTS)
            action = rng.choice(["new-version", "new-version", "delete-recreate"])
            seed += 1
            if action == "new-version":
                stats.outcomes[f"upload {await _upload(clients[tenant], 'p0', seed, hidden)}"] += 1
            else:
                r = await clients[tenant].delete("/v1/prompts/p1")
                stats.outcomes[f"delete {r.status_code}"] += 1
                await asyncio.sleep(0.5)
                stats.outcomes[f"upload {await _upload(clients[tenant], 'p1', seed, hidden)}"] += 1
            await asyncio.sleep(rng.uniform(1, 3))
    finally:
        for c in clients.values():
            await c.aclose()


async def _rss_loop(pid: int, samples: list, stop: float, every: float) -> None:
    started = time.monotonic()
    while time.monotonic() < stop:
        samples.append((round(time.monotonic() - started, 1), round(_rss_mb(pid), 1)))
        await asyncio.sleep(every)
    samples.append((round(time.monotonic() - started, 1), round(_rss_mb(pid), 1)))


async def soak(url: str, pid: int, keys: dict, base_model: str, hidden: int, args) -> dict:
    import httpx

    for tenant in TENANTS:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {keys[tenant]}"}) as c:
            for i, name in enumerate(("p0", "p1")):
                assert await _upload(c, name, hash((tenant, i)) % 1000, hidden) == 201
    stats, rss = Stats(), []
    stop = time.monotonic() + args.minutes * 60
    rng = random.Random(args.seed)
    tasks = [_client_loop(url, keys[TENANTS[i % len(TENANTS)]], [base_model, "p0", "p1"], stats, stop, random.Random(rng.random()))
             for i in range(args.clients)]
    tasks.append(_admin_loop(url, keys, hidden, stats, stop, random.Random(rng.random())))
    tasks.append(_rss_loop(pid, rss, stop, max(1.0, args.minutes * 60 / 40)))
    await asyncio.gather(*tasks)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {keys['ops']}"}) as c:
        healthy = (await c.get("/ready")).status_code == 200
        metrics = (await c.get("/metrics")).text
    running = next((float(line.split()[1]) for line in metrics.splitlines() if line.startswith("softserve_running_requests ")), None)
    warm = [m for t, m in rss if t >= 0.25 * args.minutes * 60] or [m for _, m in rss]
    return {
        "minutes": args.minutes, "clients": args.clients, "outcomes": dict(stats.outcomes), "lost": len(stats.lost),
        "lost_examples": stats.lost[:10], "rss_mb": rss, "rss_after_warmup_min_mb": min(warm), "rss_after_warmup_max_mb": max(warm),
        "healthy_after": healthy, "running_after": running,
        "server_5xx": sum(v for k, v in stats.outcomes.items() if k.split()[-1].startswith("5")),
    }


def run(args) -> dict:
    from softserve.service.auth import add_key

    with tempfile.TemporaryDirectory() as tmp:
        keys_file = Path(tmp) / "keys.yaml"
        keys = {t: add_key(keys_file, t, "user") for t in TENANTS}
        keys["ops"] = add_key(keys_file, "ops", "admin")  # /metrics needs an admin key
        server = Server(Path(tmp) / "store", model=model_path(args.model), device=args.device, dtype=args.dtype,
                        extra_args=["--api-keys", str(keys_file), "--max-queue", "1000", "--max-model-len", "512",
                                    "--torch-threads", str(args.threads or 1),
                                    # Small caches reach their steady state within the run, so RSS
                                    # growth after warm-up would be a leak, not a cache filling up.
                                    "--prompt-cache-bytes", str(args.cache_bytes), "--kv-prefix-cache-bytes", str(args.cache_bytes)])
        server.start()
        try:
            import httpx

            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keys['acme']}"}) as c:
                base_model = c.get("/v1/models").json()["data"][0]["id"]
            from transformers import AutoConfig

            hidden = AutoConfig.from_pretrained(model_path(args.model)).hidden_size
            result = asyncio.run(soak(server.url, server.proc.pid, keys, base_model, hidden, args))
            result["server_command"] = server.display_command()
        finally:
            server.stop()
    return result


def render(result: dict) -> str:
    rss = result["rss_mb"]
    lines = [
        f"### Soak: {result['minutes']} min, {result['clients']} clients, 3 tenants, uploads/deletes meanwhile",
        "",
        f"`{result['server_command']}`",
        "",
        f"- lost requests: **{result['lost']}**; server 5xx: {result['server_5xx']}; healthy after: {result['healthy_after']}; "
        f"rows still running after: {fmt(result['running_after'], 0)}",
        f"- server RSS after warm-up: {fmt(result['rss_after_warmup_min_mb'])}–{fmt(result['rss_after_warmup_max_mb'])} MB "
        f"(start {fmt(rss[0][1])} MB, end {fmt(rss[-1][1])} MB)",
        "",
        "| outcome | count |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(result["outcomes"].items())]
    lines += ["", "RSS over time (s, MB): " + ", ".join(f"{t:g}:{m:g}" for t, m in rss)]
    if result["lost_examples"]:
        lines += ["", "Lost examples: " + "; ".join(result["lost_examples"])]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--cache-bytes", type=int, default=256 * 1024, help="prompt and KV prefix cache budgets")
    parser.set_defaults(model="tiny")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.clients = 0.25, 4
    result = run(args)
    result["machine"] = machine_facts()
    print(render(result))
    write_json(args, result)
    return result


if __name__ == "__main__":
    main()
