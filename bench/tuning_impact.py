"""How much does a running tuning job slow serving down?

    .venv/bin/python bench/tuning_impact.py                 # SmolLM2-135M-Instruct (embedded), CPU
    .venv/bin/python bench/tuning_impact.py --tiny --quick  # seconds, tiny random Llama (smoke)

One resident model, one engine thread (AsyncEngine, the server's), one tuning job (the server's
TuningManager, sharing the engine's step lock). A round sends `--concurrency` greedy requests of
`--max-tokens` tokens at once and records every token's arrival. Phases:

- no tuning: the job is paused (parked between two training units, holding nothing);
- for each `--shares` value S: the job trains throughout, throttled to at most S of wall time while
  requests are in flight (S = 1.0: no throttling, training only yields the lock between units).

Phases are interleaved round by round (`--rounds` times), so a change in machine load during the
run hits every phase alike.

Printed side by side: inter-token latency (p50/p90/mean), time to first token, decode tokens/s, and
each phase's ratio to the baseline; plus the tuning job's steps/s during the phase and alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common as C  # noqa: E402

import torch  # noqa: E402

from softserve.engine.async_engine import AsyncEngine  # noqa: E402
from softserve.engine.config import EngineConfig, SchedulerConfig  # noqa: E402
from softserve.engine.engine import LLMEngine  # noqa: E402
from softserve.engine.request import Request, SamplingParams  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle gear works to a ten year old.",
    "List some ideas for a rainy weekend at home.",
    "Describe the smell of a bakery in the early morning.",
    "What should I pack for a three day hiking trip?",
    "Summarise the plot of a detective novel you would like to read.",
    "Give advice to someone learning to cook for the first time.",
    "Write a polite email asking a neighbour to lower their music.",
]


def load(args):
    from softserve.model_loader import embedded_model_source, load_model

    source = embedded_model_source()
    if not args.tiny:
        model, tok = load_model(source, torch.device("cpu"), torch.float32)
        return model, tok, source.name
    model, tok = C.load_tiny()
    return model, tok, "tiny-llama"


def training_records(n: int = 64) -> list[dict]:
    data = ROOT / "examples" / "data" / "sentiment" / "train.jsonl"
    if data.exists():
        return [json.loads(line) for line in data.read_text().splitlines()[:n] if line.strip()]
    return [{"prompt": f"Review: item {i} was {'great' if i % 2 else 'awful'}.\nSentiment:",
             "completion": " positive" if i % 2 else " negative"} for i in range(n)]


async def one_round(engine: AsyncEngine, tok, concurrency: int, max_tokens: int, round_index: int) -> list[list[float]]:
    """Send `concurrency` requests at once; per request, the arrival times of its tokens (from submit)."""

    async def one(i: int) -> list[float]:
        prompt = PROMPTS[(i + round_index) % len(PROMPTS)]
        request = Request(request_id=f"r{round_index}-{i}-{time.monotonic_ns()}", prompt_ids=tok(prompt).input_ids,
                          sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        t0 = time.perf_counter()
        times = []
        async for out in engine.generate(request):
            times.extend([time.perf_counter() - t0] * len(out.token_ids))
        return times

    return await asyncio.gather(*(one(i) for i in range(concurrency)))


def summarise(per_token: list[float], ttft: list[float], tokens: int, wall: float) -> dict:
    q = statistics.quantiles(per_token, n=10)
    return {"itl_p50_ms": 1000 * statistics.median(per_token), "itl_p90_ms": 1000 * q[8],
            "itl_mean_ms": 1000 * statistics.fmean(per_token), "ttft_mean_ms": 1000 * statistics.fmean(ttft),
            "tokens_per_s": tokens / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random Llama instead of SmolLM2")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shares", default="0.5,1.0", help="train_share_when_busy values to test")
    p.add_argument("--batch-size", type=int, default=8, help="tuning batch size")
    p.add_argument("--micro-batch-size", type=int, default=4, help="tuning micro-batch (the lock-holding unit)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens, args.rounds = 2, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)

    from softserve.store.backends import LocalBackend
    from softserve.store.store import PromptStore
    from softserve.tuning.export import model_info
    from softserve.tuning.job import new_job_id
    from softserve.tuning.jobs import TuningManager
    from softserve.tuning.records import new_record
    from softserve.tuning.trainer import TuningConfig

    model, tok, name = load(args)
    llm = LLMEngine(model, tok, EngineConfig(scheduler=SchedulerConfig(max_batch_size=32), model_id=name))
    engine = AsyncEngine(llm)
    engine.start()
    store = PromptStore(LocalBackend(Path(tempfile.mkdtemp(prefix="tuning-impact-"))), model_info(model, name))
    config = TuningConfig(num_virtual_tokens=8, init="vocab", steps=1_000_000, batch_size=args.batch_size,
                          micro_batch_size=args.micro_batch_size, learning_rate=1e-3)

    manager = TuningManager(model, tok, store, model_name=name, step_lock=engine.step_lock,
                            is_busy=lambda: llm.num_running + llm.num_waiting > 0)
    gate, parked = threading.Event(), threading.Event()
    throttle = manager._yield

    def gated_yield(busy_s: float) -> None:  # the bench's pause switch, between two training units
        throttle(busy_s)
        if not gate.is_set():
            parked.set()
            gate.wait()
            parked.clear()

    manager._yield = gated_yield
    gate.set()
    records = training_records()
    record = new_record(job_id=new_job_id(), tenant="default", namespace="default", name="bench", model=name,
                        config=config, checkpoint_every=1_000_000, auto=[], num_examples={"train": len(records), "validation": 0},
                        training_file=None, validation_file=None, description=None, suffix=None, metadata=None)
    job = manager.submit(record, {"train": "".join(json.dumps(r) + "\n" for r in records)})

    def set_phase(share: float | None) -> None:
        if share is None:
            gate.clear()
            while not parked.is_set() and job.status in ("validating_files", "queued", "running"):
                time.sleep(0.01)
        else:
            manager.train_share_when_busy = share
            gate.set()

    asyncio.run(one_round(engine, tok, args.concurrency, args.max_tokens, 99))  # warm-up, same shapes
    while job.record["step"] < 1:  # training in full swing before measuring
        time.sleep(0.05)
    print(f"model {name}, {torch.get_num_threads()} threads; {args.concurrency} concurrent requests x {args.max_tokens} tokens "
          f"x {args.rounds} rounds per phase; tuning batch {args.batch_size} (micro {args.micro_batch_size}), k=8", flush=True)
    shares = [float(x) for x in args.shares.split(",") if x.strip()]
    phases = [("no tuning", None)] + [(f"tuning, share {x:g}", x) for x in shares]
    raw = {label: {"per_token": [], "ttft": [], "tokens": 0, "wall": 0.0, "steps": 0} for label, _ in phases}
    for r in range(args.rounds):
        for label, share in phases:
            set_phase(share)
            s0, t0 = job.record["step"], time.perf_counter()
            results = asyncio.run(one_round(engine, tok, args.concurrency, args.max_tokens, r))
            acc = raw[label]
            acc["wall"] += time.perf_counter() - t0
            acc["steps"] += job.record["step"] - s0
            for times in results:
                acc["ttft"].append(times[0])
                acc["per_token"].extend(b - a for a, b in zip(times, times[1:]))
                acc["tokens"] += len(times)
    set_phase(1.0)
    s0, t0 = job.record["step"], time.perf_counter()
    time.sleep(2.0 if args.quick else 10.0)
    idle_rate = (job.record["step"] - s0) / (time.perf_counter() - t0)
    manager.cancel("default", job.id, wait_s=60)
    manager.close()

    results = {label: summarise(a["per_token"], a["ttft"], a["tokens"], a["wall"]) for label, a in raw.items()}
    train_rate = {label: a["steps"] / a["wall"] for label, a in raw.items() if label != "no tuning"}
    base = results["no tuning"]
    rows = [("inter-token p50 (ms)", "itl_p50_ms"), ("inter-token p90 (ms)", "itl_p90_ms"),
            ("inter-token mean (ms)", "itl_mean_ms"), ("time to first token (ms)", "ttft_mean_ms"),
            ("decode tokens/s", "tokens_per_s")]
    width = max(len(title) for title, _ in rows)
    print(f"{'':{width}}" + "".join(f"{label:>26}" for label in results))
    for title, key in rows:
        cells = []
        for label, values in results.items():
            v = values[key]
            cells.append(f"{v:.1f}" + (f" ({v / base[key]:.2f}x)" if label != "no tuning" else ""))
        print(f"{title:{width}}" + "".join(f"{c:>26}" for c in cells))
    for label, rate in train_rate.items():
        print(f"{label}: tuning ran {rate:.3f} steps/s while serving")
    print(f"tuning alone (no requests): {idle_rate:.3f} steps/s")
    engine.stop()
    if args.json:
        Path(args.json).write_text(json.dumps({"model": name, "phases": results, "tuning_steps_per_s_serving": train_rate,
                                               "tuning_steps_per_s_idle": idle_rate, "args": vars(args)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
