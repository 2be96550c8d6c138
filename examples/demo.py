"""End-to-end demo: tune a soft prompt on the served SmolLM2 through the API, then use it.

    make demo            (or: .venv/bin/python examples/demo.py [--steps 40] [--port 8011])

1. writes the example datasets (examples/make_datasets.py) if they are missing;
2. starts `softserve serve` (embedded SmolLM2-135M-Instruct, fresh temporary store) as a subprocess;
3. measures the base model on the held-out sentiment split with a hand-written instruction, through
   /v1/completions and through /v1/chat/completions (greedy);
4. uploads train.jsonl (POST /v1/files) and tunes a soft prompt on the resident model
   (POST /v1/tuning/jobs), printing the job's progress;
5. measures the tuned prompt (`model: "sentiment"`, no instruction) on the same held-out split;
6. prints the accuracies side by side, and stops the server it started.

"exact": the generated text, stripped, equals the label. "lenient": exactly one of the two labels
occurs in the lower-cased answer (generous to chatty answers like "The sentiment is Positive.").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from the checkout (make demo): the process helpers the tests use

from tests.support.processes import free_port  # noqa: E402
DATA = ROOT / "examples" / "data" / "sentiment"
INSTRUCTION = "Classify the sentiment of the review as positive or negative."
CHAT_INSTRUCTION = "Is the sentiment of this review positive or negative? Answer with one word: positive or negative."
LABELS = ("positive", "negative")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(answers: list[str], rows: list[dict]) -> tuple[float, float]:
    exact = lenient = 0
    for answer, row in zip(answers, rows):
        label = row["completion"].strip()
        exact += answer.strip() == label
        low = answer.lower()
        found = [lab for lab in LABELS if lab in low]
        lenient += found == [label]
    return exact / len(rows), lenient / len(rows)


def evaluate(client: httpx.Client, rows: list[dict], make_request) -> list[str]:
    def one(row: dict) -> str:
        path, body = make_request(row)
        r = client.post(path, json=body)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]

    with ThreadPoolExecutor(max_workers=16) as pool:  # concurrent requests: the engine batches them
        return list(pool.map(one, rows))


def wait_ready(client: httpx.Client, proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log}")
        try:
            r = client.get("/ready")
            if r.status_code == 200:
                return r.json()["model"]
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout}s; see {log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--num-virtual-tokens", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=3e-2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0, help="default: a free port")
    p.add_argument("--store", help="prompt store directory (default: a temporary one)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    if not (DATA / "train.jsonl").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_datasets.py")], check=True)
    train, held_out = load(DATA / "train.jsonl"), load(DATA / "eval.jsonl")

    tmp = tempfile.mkdtemp(prefix="softserve-demo-")
    store = args.store or os.path.join(tmp, "store")
    port = args.port or free_port()
    log = Path(tmp) / "server.log"
    cmd = [sys.executable, "-m", "softserve", "serve", "--port", str(port), "--store", store, "--log-level", "warning"]
    print(f"starting: {' '.join(cmd[1:])}  (log: {log})", flush=True)
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            base = wait_ready(client, proc, log)
            print(f"serving {base}; {len(train)} training reviews, {len(held_out)} held-out reviews\n", flush=True)

            t0 = time.monotonic()
            base_completion = evaluate(client, held_out, lambda row: ("/v1/completions", {
                "model": base, "prompt": f"{INSTRUCTION}\n\n{row['prompt']}", "max_tokens": 3, "temperature": 0}))
            base_chat = evaluate(client, held_out, lambda row: ("/v1/chat/completions", {
                "model": base, "max_tokens": 8, "temperature": 0, "messages": [
                    {"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n{row['prompt'].removesuffix(chr(10) + 'Sentiment:')}"}]}))
            print(f"base model evaluated in {time.monotonic() - t0:.0f}s", flush=True)

            upload = client.post("/v1/files", data={"purpose": "tune"},
                                 files={"file": ("train.jsonl", (DATA / "train.jsonl").read_bytes())})
            upload.raise_for_status()
            job = client.post("/v1/tuning/jobs", json={
                "name": "sentiment", "training_file": upload.json()["id"], "validation_data": held_out,
                "num_virtual_tokens": args.num_virtual_tokens, "init": "text", "init_text": INSTRUCTION,
                "steps": args.steps, "learning_rate": args.learning_rate, "batch_size": args.batch_size,
                "seed": args.seed, "eval_max_new_tokens": 3,
            })
            if job.status_code != 200:
                raise SystemExit(f"job creation failed: {job.text}")
            job = job.json()
            print(f"tuning job {job['id']}: k={args.num_virtual_tokens}, {args.steps} steps, batch {args.batch_size}, "
                  f"lr {args.learning_rate}", flush=True)
            t0 = time.monotonic()
            shown = 0
            while job["status"] in ("validating_files", "queued", "running"):
                time.sleep(2)
                job = client.get(f"/v1/tuning/jobs/{job['id']}").json()
                for point in job["loss_curve"][shown:]:
                    if point["step"] % 5 == 0 or point["step"] == job["total_steps"]:
                        eta = job["eta_seconds"]
                        print(f"  step {point['step']:>3}/{job['total_steps']}  loss {point['loss']:.4f}"
                              + (f"  ETA {eta:.0f}s" if eta is not None else ""), flush=True)
                shown = len(job["loss_curve"])
            if job["status"] != "succeeded":
                raise SystemExit(f"tuning job {job['status']}: {job['error']}")
            tune_s = time.monotonic() - t0
            print(f"job {job['status']} in {tune_s:.0f}s -> prompt {job['fine_tuned_model']} "
                  f"(job's own eval: loss {job['metrics']['eval_loss']:.4f}, exact match {job['metrics']['eval_accuracy']:.3f})\n",
                  flush=True)

            tuned = evaluate(client, held_out, lambda row: ("/v1/completions", {
                "model": "sentiment", "prompt": row["prompt"], "max_tokens": 3, "temperature": 0}))

        results = {
            "base + instruction (/v1/completions)": score(base_completion, held_out),
            "base + instruction (/v1/chat/completions)": score(base_chat, held_out),
            f"tuned soft prompt, k={args.num_virtual_tokens} (/v1/completions, no instruction)": score(tuned, held_out),
        }
        width = max(len(k) for k in results)
        print(f"held-out sentiment accuracy, {len(held_out)} reviews, {base}, greedy")
        print(f"{'':{width}}  exact  lenient")
        for name, (exact, lenient) in results.items():
            print(f"{name:{width}}  {exact:5.1%}  {lenient:6.1%}")
        print(f"\nexamples: {held_out[0]['prompt']!r} -> base {base_completion[0]!r}, chat {base_chat[0]!r}, tuned {tuned[0]!r}")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "model": base, "held_out": len(held_out), "steps": args.steps, "tune_seconds": round(tune_s, 1),
                "job": {k: job[k] for k in ("id", "fine_tuned_model", "metrics", "hyperparameters")},
                "accuracy": {k: {"exact": v[0], "lenient": v[1]} for k, v in results.items()},
            }, indent=2))
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)  # only the server this script started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    raise SystemExit(main())
