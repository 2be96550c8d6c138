"""dtype: fp32 vs bf16 on this machine — engine throughput, and the parity cost of bf16.

Throughput: LLMEngine.generate_sync at batch 1 and batch 32 (distinct soft prompts, 32-64 prompt
tokens, fixed output length), fp32 and bf16 interleaved.
Parity: N natural-language chat prompts, each with its own soft prompt (PEFT's TEXT init: the
embeddings of an instruction, as trained prompts start out), greedy, fixed output length; how many
bf16 outputs differ from fp32, and where the first differing token is.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

TOPICS = ["the moon", "bread baking", "volcanoes", "the French revolution", "honey bees", "chess openings",
          "solar panels", "the water cycle", "jazz music", "black holes", "tea ceremonies", "rainforests",
          "the printing press", "electric cars", "coral reefs", "ancient Rome", "photosynthesis", "sailing",
          "the Olympic games", "glaciers", "the human heart", "origami", "comets", "coffee", "bridges",
          "penguins", "the internet", "mountain climbing", "deserts", "vaccines", "libraries", "earthquakes"]
TEMPLATES = ["Write a short paragraph about {}.", "Explain {} to a ten-year-old.", "List three facts about {}.",
             "What is the most interesting thing about {}?"]
INSTRUCTIONS = ["Answer concisely and accurately.", "You are a friendly teacher who explains things simply.",
                "Respond in a formal academic tone.", "Be enthusiastic and use vivid language."]


def text_prompt(model, tok, text: str, k: int):
    """PEFT TEXT init: embeddings of `text`'s tokens, repeated/truncated to k rows (fp32, CPU)."""
    import torch

    ids = tok(text).input_ids
    ids = (ids * (k // len(ids) + 1))[:k]
    weight = model.get_input_embeddings().weight
    return weight[torch.tensor(ids, device=weight.device)].detach().float().cpu().clone()


def chat_ids(tok, text: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    if hasattr(out, "input_ids") or isinstance(out, dict):
        out = out["input_ids"]
    return list(out)


def run(args) -> dict:
    C.setup_torch(args)
    quick = args.quick
    n = args.num_prompts or (4 if quick else 32)
    max_tokens = args.max_tokens or (8 if quick else 64)
    batches = [int(x) for x in args.batch.split(",")] if args.batch else ([1, 4] if quick else [1, 32])
    rounds = args.rounds or (1 if quick else 2)
    dtypes = ["float32", "bfloat16"]
    models = {}
    for dt in dtypes:
        model, tok, name, device, _ = C.load(args.model, args.device, dt)
        models[dt] = model
    result = {"name": "dtype", "quick": quick, "model": name, "device": str(device), "max_tokens": max_tokens,
              "num_prompts": n, "rounds": rounds, "load_avg_start": C.load_average()}
    ref = models["float32"]
    cfg = C.text_config(ref)
    engines = {dt: C.make_engine(m, tok, max_batch_size=max(32, max(batches), n), model_id=dt) for dt, m in models.items()}

    # ---- throughput -----------------------------------------------------------------------------
    seq = 0
    tput = {dt: {b: [] for b in batches} for dt in dtypes}
    for b in batches:
        softs = [C.soft_prompt(C.vocab_prompt_tensor(ref, 500 + i, args.k), f"t{i}") for i in range(b)]
        inputs = C.request_inputs(args.seed + b, b, vocab=cfg.vocab_size)
        for r in range(rounds + 1):  # round 0 warms each engine's prompt KV and code paths
            for dt in (dtypes if r % 2 == 0 else dtypes[::-1]):
                reqs = []
                for s, ids in zip(softs, inputs):
                    seq += 1
                    reqs.append(C.engine_request(f"d{seq}", ids, soft=s, max_tokens=max_tokens))
                C.sync(device)
                t0 = time.perf_counter()
                engines[dt].generate_sync(reqs)
                C.sync(device)
                if r:
                    tput[dt][b].append(b * max_tokens / (time.perf_counter() - t0))
        print(f"B={b}: " + ", ".join(f"{dt} {C.median(tput[dt][b]):.1f} tok/s" for dt in dtypes), file=sys.stderr, flush=True)
    result["throughput"] = [{"batch": b, **{dt: C.median(tput[dt][b]) for dt in dtypes},
                             "bf16/fp32": C.median(tput["bfloat16"][b]) / C.median(tput["float32"][b])} for b in batches]

    # ---- parity ---------------------------------------------------------------------------------
    texts = [TEMPLATES[i % len(TEMPLATES)].format(TOPICS[i % len(TOPICS)]) for i in range(n)]
    prompts = [text_prompt(ref, tok, INSTRUCTIONS[i % len(INSTRUCTIONS)], args.k) for i in range(n)]
    outs = {}
    for dt in dtypes:
        reqs = [C.engine_request(f"p-{dt}-{i}", chat_ids(tok, t), soft=C.soft_prompt(p, f"i{i}"), max_tokens=max_tokens)
                for i, (t, p) in enumerate(zip(texts, prompts))]
        got = engines[dt].generate_sync(reqs)
        outs[dt] = [[t for o in got[r.request_id] for t in o.token_ids] for r in reqs]
    firsts = []
    for a, b in zip(outs["float32"], outs["bfloat16"]):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        firsts.append(first)
    diverged = [f for f in firsts if f is not None]
    result["parity"] = {
        "diverged": len(diverged), "total": n,
        "first_divergence": sorted(diverged),
        "first_divergence_median": C.median(diverged) if diverged else None,
        "first_divergence_min": min(diverged) if diverged else None,
        "mean_common_prefix": sum(max_tokens if f is None else f for f in firsts) / n,
        "example": {"prompt": texts[0], "fp32": tok.decode(outs["float32"][0]), "bf16": tok.decode(outs["bfloat16"][0])},
    }
    result["load_avg_end"] = C.load_average()
    return result


def render(result: dict) -> str:
    rows = [[r["batch"], r["float32"], r["bfloat16"], r["bf16/fp32"]] for r in result["throughput"]]
    p = result["parity"]
    ex = p["example"]
    return "\n".join([
        f"### dtype: fp32 vs bf16 ({result['model']} on {result['device']}, {result['max_tokens']} output tokens, "
        f"median of {result['rounds']} interleaved round(s))",
        "",
        C.md_table(["batch", "fp32 tok/s", "bf16 tok/s", "bf16/fp32"], rows, digits=2),
        "",
        f"Parity over {p['total']} chat prompts with TEXT-initialised soft prompts, greedy, {result['max_tokens']} tokens: "
        f"**{p['diverged']}/{p['total']}** bf16 outputs differ from fp32; first differing token at position "
        f"median {C.fmt(p['first_divergence_median'])}, min {C.fmt(p['first_divergence_min'])} "
        f"(all: {p['first_divergence']}); mean common prefix {p['mean_common_prefix']:.1f} of {result['max_tokens']} tokens.",
        "",
        f"Example — prompt {ex['prompt']!r}: fp32 {ex['fp32'][:160]!r} / bf16 {ex['bf16'][:160]!r}.",
        "",
        f"Load average {result['load_avg_start']:.2f} at start, {result['load_avg_end']:.2f} at end.",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--num-prompts", type=int, default=None, help="parity prompts (default 32; quick 4)")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens (default 64; quick 8)")
    p.add_argument("--batch", default=None, help="comma list (default 1,32; quick 1,4)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--rounds", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
