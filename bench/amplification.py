"""Cost of one amplified request (`prompt`: N one-token prompts, `n`: 16) to a live tiny-model server:
time to the answer, the slowest /health meanwhile, and the server's RSS growth (VmRSS, sampled).

    .venv/bin/python bench/amplification.py [--prompts 200000 2000] [--n 16]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import common as C  # noqa: E402
from tests.support.live_server import LiveServer  # noqa: E402


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))




def measure(server: LiveServer, model: str, prompts: int, n: int) -> dict:
    body = json.dumps({"model": model, "prompt": ["a"] * prompts, "n": n, "max_tokens": 1}).encode()
    baseline, out = _rss(server.pid), {}

    def hostile() -> None:
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=600) as c:
            r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        out.update(status=r.status_code, seconds=round(time.monotonic() - started, 3), error=r.json().get("error", {}).get("message"))

    thread = threading.Thread(target=hostile)
    thread.start()
    peak, slowest = baseline, 0.0
    with httpx.Client(base_url=server.url, timeout=600) as c:
        while thread.is_alive():
            started = time.monotonic()
            c.get("/health")
            slowest = max(slowest, time.monotonic() - started)
            peak = max(peak, _rss(server.pid))
            time.sleep(0.02)
    thread.join()
    return {"prompts": prompts, "n": n, "body_bytes": len(body), **out, "slowest_health_s": round(slowest, 3),
            "rss_growth_mb": round((peak - baseline) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, nargs="+", default=[200_000, 2_000])
    parser.add_argument("--n", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with LiveServer(root / "store", model=C.tiny_dir(), max_model_len=256, log_dir=root) as server:
            model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
            for prompts in args.prompts:
                print(json.dumps(measure(server, model, prompts, args.n)), flush=True)


if __name__ == "__main__":
    main()
