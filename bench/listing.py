"""Listing a tenant's prompts with N prompts: the walk over every head (the code before the listing index)
vs the listing index (softserve/store/index.py), side by side in one run; no model is loaded.

1. Create N prompts (k=16, SmolLM2's hidden size) with PromptStore + LocalBackend from 16 threads, each
   with its own store object (16 "replicas" contending for the index shards), after the index exists.
2. `PromptStore.list` three ways, interleaved round by round: the old walk (list keys, read every head,
   one after another), the parallel walk (the index's fallback and build path) and the index.
3. Building the index of a store that has none (an old store's first listing).
4. In-process HTTP (FastAPI TestClient, the real routes): `GET /v1/prompts` first page (default
   limit), everything (`limit=10000`) and `GET /v1/models`, with the index vs with the old walk.
5. Upload cost: puts with the index update vs without, interleaved, on the full store.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

TENANT = "default"


def old_list(store, tenant: str):
    """PromptStore.list before the index (as in main at e2e2d45): every head, one after another."""
    from softserve.store import keys

    prefix = keys.prompts_prefix(tenant)
    out = []
    for key in store.backend.list(prefix):
        parts = key[len(prefix):].split("/")
        if len(parts) != 2 or parts[1] != "head.json":
            continue
        head = store._read_head(tenant, parts[0])
        if head is not None:
            out.append(head.latest)
    return sorted(out, key=lambda m: m.name)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * C.median(times)


def http_app(store):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from softserve.api import deps
    from softserve.api.errors import install_error_handlers
    from softserve.api.openai_routes import router as openai_router
    from softserve.api.prompts import router as prompts_router
    from softserve.service.auth import ApiKeyRegistry

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(prompts_router)
    app.include_router(openai_router)
    runtime = SimpleNamespace(require_ready=lambda: None, served_model_name="SmolLM2-135M-Instruct", store=store)
    app.dependency_overrides[deps.get_store] = lambda: store
    app.dependency_overrides[deps.get_runtime] = lambda: runtime
    app.dependency_overrides[deps.get_registry] = lambda: ApiKeyRegistry.disabled()  # no keys: one tenant, "default"
    return TestClient(app)


def run(args) -> dict:
    from softserve.store.backends import LocalBackend
    from softserve.store.store import PromptStore
    from softserve.store.types import ModelInfo

    n = args.num_prompts or (200 if args.quick else 10_000)
    rounds = args.rounds or (2 if args.quick else 5)
    puts = args.puts or (10 if args.quick else 200)
    info = ModelInfo(name="SmolLM2-135M-Instruct", hidden_size=args.hidden, num_layers=30, num_attention_heads=9)
    result = {"name": "listing", "quick": args.quick, "num_prompts": n, "k": args.k, "rounds": rounds,
              "load_avg_start": C.load_average()}
    with tempfile.TemporaryDirectory(prefix="softserve-bench-listing-") as tmp:
        root = Path(tmp) / "store"
        workers = 16
        stores = [PromptStore(LocalBackend(root), info) for _ in range(workers)]
        stores[0].put(TENANT, "s00000", C.safetensors_bytes(C.prompt_tensor(0, args.k, args.hidden)), None)
        stores[0].list(TENANT)  # the index exists: every put below updates it

        def work(w: int) -> None:
            for i in range(1 + w, n, workers):
                blob = C.safetensors_bytes(C.prompt_tensor(300_000 + i, args.k, args.hidden))
                stores[w].put(TENANT, f"s{i:05d}", blob, None)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(workers) as ex:
            list(ex.map(work, range(workers)))
        result["create_s"] = time.perf_counter() - t0
        print(f"created {n} prompts in {result['create_s']:.1f} s", file=sys.stderr, flush=True)

        store = PromptStore(LocalBackend(root), info)
        by_index = store.list(TENANT)
        truth = old_list(store, TENANT)
        assert len(by_index) == n and by_index == truth, (len(by_index), len(truth))
        result["index_matches_heads"] = True

        walk, parallel, indexed = [], [], []
        for _ in range(rounds):
            walk.append(timed(lambda: old_list(store, TENANT), 1))
            parallel.append(timed(lambda: store.index.walk(TENANT), 1))
            indexed.append(timed(lambda: store.list(TENANT), 1))
        result["list_ms"] = {"walk": C.median(walk), "parallel_walk": C.median(parallel), "index": C.median(indexed)}

        from softserve.store import keys

        saved = {k: store.backend.get(k) for k in store.backend.list(keys.index_prefix(TENANT))}
        builds = []
        for _ in range(max(1, rounds // 2)):
            for k in saved:
                store.backend.delete(k)
            builds.append(timed(lambda: PromptStore(LocalBackend(root), info).list(TENANT), 1))
        result["build_ms"] = C.median(builds)

        client = http_app(store)
        paths = {"first_page": "/v1/prompts", "all": "/v1/prompts?limit=10000", "models": "/v1/models"}
        http: dict[str, dict[str, float]] = {p: {} for p in paths}
        sizes = {}
        real_list = store.index.list
        for mode in ("walk", "index"):
            store.index.list = (lambda tenant: old_list(store, tenant)) if mode == "walk" else real_list
            for label, path in paths.items():
                def get(path=path):
                    r = client.get(path)
                    r.raise_for_status()
                    sizes[label] = len(r.content)
                    return r
                http[label][mode] = timed(get, rounds)
        store.index.list = real_list
        body = client.get("/v1/prompts").json()
        result["first_page"] = {"items": len(body["data"]), "has_more": body["has_more"]}
        result["http_ms"] = http
        result["http_bytes"] = sizes

        # Upload cost of the index update at this size: puts of new names with and without it, interleaved.
        with_index, without = [], []
        original = store.index.updated
        for i in range(puts):
            blob = C.safetensors_bytes(C.prompt_tensor(900_000 + i, args.k, args.hidden))
            store.index.updated = original if i % 2 == 0 else (lambda tenant, name: None)
            t0 = time.perf_counter()
            store.put(TENANT, f"extra{i:05d}", blob, None)
            (with_index if i % 2 == 0 else without).append(1000 * (time.perf_counter() - t0))
        store.index.updated = original
        result["put_ms"] = {"index": C.median(with_index), "no_index": C.median(without)}
    result["load_avg_end"] = C.load_average()
    return result


def render(result: dict) -> str:
    lm, hm = result["list_ms"], result["http_ms"]
    n = result["num_prompts"]

    def ratio(before: float, after: float) -> str:
        return f"{before / after:.0f}x" if after > 0 else "-"

    return "\n".join([
        f"### Listing {n:,} prompts: walk over every head vs the listing index",
        "",
        C.md_table(["measurement", "walk (before) ms", "index ms", "speed-up"], [
            ["`PromptStore.list` (old sequential walk)", lm["walk"], lm["index"], ratio(lm["walk"], lm["index"])],
            ["`PromptStore.list` (parallel walk: fallback/build path)", lm["parallel_walk"], lm["index"],
             ratio(lm["parallel_walk"], lm["index"])],
            [f"`GET /v1/prompts` first page ({result['first_page']['items']} items, has_more "
             f"{str(result['first_page']['has_more']).lower()})", hm["first_page"]["walk"], hm["first_page"]["index"],
             ratio(hm["first_page"]["walk"], hm["first_page"]["index"])],
            [f"`GET /v1/prompts?limit=10000` ({result['http_bytes']['all'] / 1e6:.1f} MB)", hm["all"]["walk"],
             hm["all"]["index"], ratio(hm["all"]["walk"], hm["all"]["index"])],
            [f"`GET /v1/models` ({result['http_bytes']['models'] / 1e6:.1f} MB)", hm["models"]["walk"],
             hm["models"]["index"], ratio(hm["models"]["walk"], hm["models"]["index"])],
        ], digits=1),
        "",
        f"Building the index of a store without one (first listing of an old store): {result['build_ms']:.0f} ms. "
        f"Creating the {n:,} prompts (16 threads, one store object each, index kept): {result['create_s']:.1f} s. "
        f"One upload on the full store: {result['put_ms']['index']:.1f} ms with the index update, "
        f"{result['put_ms']['no_index']:.1f} ms without (median, interleaved). Index equals the heads: "
        f"{result['index_matches_heads']}. Medians of {result['rounds']} interleaved rounds; in-process HTTP "
        f"(TestClient); load average {result['load_avg_start']:.2f} at start, {result['load_avg_end']:.2f} at end.",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--num-prompts", type=int, default=None, help="default 10000; quick 200")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; quick 2)")
    p.add_argument("--puts", type=int, default=None, help="uploads timed with/without the index update (default 200)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--hidden", type=int, default=576, help="token dim of the prompts (576 = SmolLM2-135M)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
