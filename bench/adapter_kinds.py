"""Adapter kinds in one batch: output tok/s with C rows plain, prompt-tuned, prefix-tuned, or all three mixed.

Engine level (LLMEngine.generate_sync, C requests submitted together, each its own distinct prompt of k
virtual tokens, ignore_eos so every row runs max_tokens). The time includes admission and the prefill:
a prompt-tuned row computes its k-token KV inline the first time its content hash is seen (cold) and
copies it from the KV prefix cache afterwards (warm: the repeats after the first); a prefix-tuned row's
tensor IS its KV, copied in at admission with no forward. Cases alternate, median over repeats; the
headline is each case's throughput as a ratio of the plain batch's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

CASES = ("plain", "prompt_tuning", "prefix_tuning", "mixed")


def run(args) -> dict:
    import torch

    from softserve.engine.request import SoftPrompt

    C.setup_torch(args)
    quick = args.quick
    concurrency = args.concurrency or (4 if quick else 32)
    repeats = args.repeats or (2 if quick else 5)
    k, n, max_tokens = args.k, args.prompt_tokens, args.max_tokens
    model, tok, name, device, dtype = C.load(args.model, args.device, args.dtype)
    cfg = C.text_config(model)
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = cfg.num_hidden_layers * 2 * kv_heads * head_dim
    engine = C.make_engine(model, tok, max_batch_size=concurrency)

    tuned = [C.soft_prompt(C.vocab_prompt_tensor(model, 100 + i, k), f"pt{i}") for i in range(concurrency)]
    prefixes = []
    for i in range(concurrency):
        gen = torch.Generator().manual_seed(500 + i)
        kv = torch.randn(k, width, generator=gen)
        sp = C.soft_prompt(kv, f"px{i}")
        prefixes.append(SoftPrompt(ref=sp.ref, embeddings=kv.to(device, dtype), kind="prefix_tuning"))
    tuned = [SoftPrompt(ref=s.ref, embeddings=s.embeddings.to(device, dtype)) for s in tuned]
    softs = {
        "plain": [None] * concurrency,
        "prompt_tuning": tuned,
        "prefix_tuning": prefixes,
        "mixed": [(None, tuned[i], prefixes[i])[i % 3] for i in range(concurrency)],
    }
    inputs = C.request_inputs(args.seed, concurrency, lo=n, hi=n, vocab=cfg.vocab_size)
    seq = 0

    def tok_per_s(case: str) -> float:
        nonlocal seq
        reqs = []
        for s, ids in zip(softs[case], inputs):
            seq += 1
            reqs.append(C.engine_request(f"r{seq}", ids, soft=s, max_tokens=max_tokens))
        C.sync(device)
        t0 = time.perf_counter()
        engine.generate_sync(reqs)
        C.sync(device)
        return concurrency * max_tokens / (time.perf_counter() - t0)

    for case in CASES:  # warm code paths and the prompt-tuned rows' KV prefixes
        tok_per_s(case)
    samples: dict[str, list[float]] = {case: [] for case in CASES}
    for r in range(repeats):
        for case in (CASES if r % 2 == 0 else tuple(reversed(CASES))):
            samples[case].append(tok_per_s(case))
    plain = C.median(samples["plain"])
    rows = [{"case": case, "tok_s": C.median(samples[case]), "ratio_to_plain": C.median(samples[case]) / plain}
            for case in CASES]
    for row in rows:
        print(f"{row['case']}: {row['tok_s']:.1f} tok/s ({row['ratio_to_plain']:.3f} x plain)", file=sys.stderr, flush=True)
    return {"name": "adapter_kinds", "quick": quick, "model": name, "device": str(device), "dtype": str(dtype),
            "concurrency": concurrency, "k": k, "prompt_tokens": n, "max_tokens": max_tokens, "repeats": repeats,
            "rows": rows, "load_avg": C.load_average()}


def render(result: dict) -> str:
    rows = [[r["case"], r["tok_s"], r["ratio_to_plain"]] for r in result["rows"]]
    return "\n".join([
        f"### Adapter kinds in one batch (engine, {result['model']} {result['dtype']} on {result['device']}, "
        f"C={result['concurrency']}, k={result['k']}, {result['prompt_tokens']} prompt + {result['max_tokens']} output "
        f"tokens per row, median of {result['repeats']})",
        "",
        C.md_table(["rows", "output tok/s", "ratio to plain"], rows, digits=3),
        "",
        "`mixed` = a third each of plain, prompt-tuned and prefix-tuned rows. Prompt-tuned KV prefixes are warm "
        f"(cached) in the timed runs. Load average {result['load_avg']:.2f}.",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--concurrency", type=int, default=None, help="rows per batch (default 32; quick 4)")
    p.add_argument("--k", type=int, default=16, help="virtual tokens per prompt")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
