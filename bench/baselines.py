"""Baselines on the same model, inputs and machine, measured in one process, interleaved.

  (i)  PEFT sequential: one request at a time, swapping the active adapter. The adapters are real
       PEFT prompt-tuning adapters on disk, loaded with `PeftModel.from_pretrained` + `load_adapter`
       and selected with `set_adapter`; P comes from `get_prompt()`. `PeftModel.generate` is broken
       for prompt tuning on transformers 5.x (the cache moved from `past_key_values` to `cache`, PEFT
       re-prepends P every step: see shared notes), so decoding is a hand-written greedy loop with KV
       cache: `model(inputs_embeds=cat(P, embed(ids)))`, then one token at a time with the cache.
  (ii) HF `generate`, static batch of B copies of one prompt, all inputs the same length (no
       padding: the best case for static batching), P prepended via `inputs_embeds`, greedy,
       `min_new_tokens = max_new_tokens`.
  ours LLMEngine.generate_sync with B requests, B distinct soft prompts, 32-64 prompt tokens (the
       harder, heterogeneous case), the same number of output tokens (ignore_eos + min_tokens). Run
       once with a fresh prompt-KV cache (cold) and once more (warm: every prompt's KV cached, the
       server's steady state). Plus: the engine on (ii)'s exact homogeneous input, and the engine
       one request at a time on (i)'s inputs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

CASES = {
    "peft_seq": "(i) PEFT sequential, set_adapter per request, KV-cache greedy loop (batch 1)",
    "ours_seq": "ours, one request at a time (batch 1), same inputs as (i)",
    "hf_static": "(ii) HF generate, static batch B, one prompt, equal lengths",
    "ours_homog": "ours, batch B, one prompt, equal lengths (= (ii)'s input)",
    "ours_cold": "ours, B distinct prompts, 32-64 tokens, prompt KV cold",
    "ours_warm": "ours, B distinct prompts, 32-64 tokens, prompt KV warm",
}


def write_adapter(directory: Path, tensor, model) -> None:
    from safetensors.torch import save_file

    cfg = C.text_config(model)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": int(tensor.shape[0]),
        "token_dim": cfg.hidden_size, "num_transformer_submodules": 1, "num_attention_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_hidden_layers, "prompt_tuning_init": "RANDOM", "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file({"prompt_embeddings": tensor.float().contiguous()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt"})


class Bench:
    def __init__(self, args):
        import torch

        self.args = args
        quick = args.quick
        self.batch = args.batch or (4 if quick else 32)
        self.max_tokens = args.max_tokens or (8 if quick else 64)
        self.seq_requests = args.seq_requests or (2 if quick else 4)
        self.num_adapters = 4
        self.k = args.k
        self.model, self.tok, self.name, self.device, self.dtype = C.load(args.model, args.device, args.dtype)
        cfg = C.text_config(self.model)
        self.hidden = cfg.hidden_size
        vocab = cfg.vocab_size
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        # Inputs: B distinct prompts with 32-64 tokens for ours; equal lengths (the mean) for (ii).
        self.prompts = [C.vocab_prompt_tensor(self.model, 10 + i, self.k) for i in range(self.batch)]
        self.softs = [C.soft_prompt(p, f"p{i}") for i, p in enumerate(self.prompts)]
        self.inputs = C.request_inputs(args.seed, self.batch, vocab=vocab)
        self.equal_len = 48
        self.equal_inputs = C.request_inputs(args.seed + 1, self.batch, lo=self.equal_len, hi=self.equal_len, vocab=vocab)
        self.seq_inputs = C.request_inputs(args.seed + 2, self.seq_requests, vocab=vocab)
        params = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        # PEFT on its own copy of the weights, so wrapping can never touch the model the others use.
        self.tmp = tempfile.TemporaryDirectory(prefix="softserve-bench-peft-")
        from peft import PeftModel

        base2, _, _, _, _ = C.load(args.model, args.device, args.dtype)
        self.peft_names = []
        for i in range(self.num_adapters):
            d = Path(self.tmp.name) / f"task{i}"
            write_adapter(d, self.prompts[i % len(self.prompts)], self.model)
            name = f"task{i}"
            if i == 0:
                self.peft = PeftModel.from_pretrained(base2, str(d), adapter_name=name, is_trainable=False)
            else:
                self.peft.load_adapter(str(d), adapter_name=name, is_trainable=False)
            self.peft_names.append(name)
        self.peft.eval()
        self.peft_base = self.peft.get_base_model()
        torch.manual_seed(0)

    # ---- (i) ------------------------------------------------------------------------------------
    def peft_seq(self) -> tuple[int, float, list[list[int]]]:
        import torch

        embed = self.peft_base.get_input_embeddings()
        outputs = []
        C.sync(self.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i, ids in enumerate(self.seq_inputs):
                self.peft.set_adapter(self.peft_names[i % self.num_adapters])
                prompt = self.peft.get_prompt(batch_size=1)  # [1, k, hidden], the active adapter's P
                x = torch.cat([prompt.to(self.device, self.dtype), embed(torch.tensor([ids], device=self.device))], dim=1)
                out = self.peft_base(inputs_embeds=x, use_cache=True, logits_to_keep=1)
                cache = getattr(out, "cache", None) or out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                generated = [token]
                for _ in range(self.max_tokens - 1):
                    out = self.peft_base(input_ids=token, use_cache=True, **{self.cache_kw: cache})
                    cache = getattr(out, "cache", None) or out.past_key_values
                    token = out.logits[:, -1].argmax(-1, keepdim=True)
                    generated.append(token)
                outputs.append(torch.cat(generated, 1)[0].tolist())  # one host sync per request
        C.sync(self.device)
        return len(self.seq_inputs) * self.max_tokens, time.perf_counter() - t0, outputs

    # ---- (ii) -----------------------------------------------------------------------------------
    def hf_static(self) -> tuple[int, float]:
        import torch

        embed = self.model.get_input_embeddings()
        prompt = self.prompts[0].to(self.device, self.dtype)
        with torch.inference_mode():
            ids = torch.tensor(self.equal_inputs, device=self.device)
            C.sync(self.device)
            t0 = time.perf_counter()
            x = torch.cat([prompt.unsqueeze(0).expand(self.batch, -1, -1), embed(ids)], dim=1)
            mask = torch.ones(x.shape[:2], dtype=torch.long, device=self.device)
            out = self.model.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=self.max_tokens,
                                      min_new_tokens=self.max_tokens, do_sample=False, pad_token_id=self.pad)
            C.sync(self.device)
            dt = time.perf_counter() - t0
        assert out.shape[1] == self.max_tokens, out.shape
        return self.batch * self.max_tokens, dt

    # ---- ours -----------------------------------------------------------------------------------
    def _engine_run(self, engine, requests) -> tuple[int, float]:
        C.sync(self.device)
        t0 = time.perf_counter()
        outs = engine.generate_sync(requests)
        C.sync(self.device)
        dt = time.perf_counter() - t0
        tokens = sum(len(o.token_ids) for seq in outs.values() for o in seq)
        assert tokens == len(requests) * self.max_tokens, tokens
        return tokens, dt

    def _requests(self, tag, inputs, softs):
        return [C.engine_request(f"{tag}-{i}-{time.monotonic_ns()}", ids, soft=s, max_tokens=self.max_tokens)
                for i, (ids, s) in enumerate(zip(inputs, softs))]

    def ours_cold_and_warm(self) -> tuple[tuple[int, float], tuple[int, float]]:
        engine = C.make_engine(self.model, self.tok, max_batch_size=max(32, self.batch))
        cold = self._engine_run(engine, self._requests("cold", self.inputs, self.softs))
        warm = self._engine_run(engine, self._requests("warm", self.inputs, self.softs))
        return cold, warm

    def ours_homog(self, engine) -> tuple[int, float]:
        softs = [self.softs[0]] * self.batch
        return self._engine_run(engine, self._requests("homog", self.equal_inputs, softs))

    def ours_seq(self, engine) -> tuple[int, float, list[list[int]]]:
        tokens, total, outputs = 0, 0.0, []
        for i, ids in enumerate(self.seq_inputs):
            soft = self.softs[i % self.num_adapters % len(self.softs)]
            req = C.engine_request(f"seq-{i}-{time.monotonic_ns()}", ids, soft=soft, max_tokens=self.max_tokens)
            C.sync(self.device)
            t0 = time.perf_counter()
            outs = engine.generate_sync([req])
            C.sync(self.device)
            total += time.perf_counter() - t0
            got = [t for o in outs[req.request_id] for t in o.token_ids]
            tokens += len(got)
            outputs.append(got)
        return tokens, total, outputs


def run(args) -> dict:
    C.setup_torch(args)
    t_load = time.perf_counter()
    b = Bench(args)
    result = {
        "name": "baselines", "quick": args.quick, "model": b.name, "device": str(b.device), "dtype": str(b.dtype),
        "batch": b.batch, "max_tokens": b.max_tokens, "k": b.k, "seq_requests": b.seq_requests,
        "num_adapters": b.num_adapters, "equal_len": b.equal_len, "load_s": time.perf_counter() - t_load,
        "load_avg_start": C.load_average(), "rounds": [],
    }
    # Warm-up (first calls allocate, and HF generate's first call is slow): not timed.
    warm_engine = C.make_engine(b.model, b.tok, max_batch_size=max(32, b.batch))
    b.hf_static()
    b.ours_homog(warm_engine)
    rounds = args.rounds or (1 if args.quick else 2)
    parity = None
    for r in range(rounds):
        row = {}
        order = ["peft_seq", "ours_seq", "hf_static", "ours_homog", "ours_pair"]
        if r % 2:
            order = order[::-1]
        for case in order:
            if case == "peft_seq":
                tokens, dt, peft_out = b.peft_seq()
                row["peft_seq"] = tokens / dt
            elif case == "ours_seq":
                tokens, dt, ours_out = b.ours_seq(warm_engine)
                row["ours_seq"] = tokens / dt
            elif case == "hf_static":
                tokens, dt = b.hf_static()
                row["hf_static"] = tokens / dt
            elif case == "ours_homog":
                tokens, dt = b.ours_homog(warm_engine)
                row["ours_homog"] = tokens / dt
            else:
                (t1, d1), (t2, d2) = b.ours_cold_and_warm()
                row["ours_cold"], row["ours_warm"] = t1 / d1, t2 / d2
            print(f"round {r} {case}: done", file=sys.stderr, flush=True)
        if parity is None:
            # Sanity: PEFT's adapter + hand loop and our engine agree on greedy tokens (same inputs).
            parity = sum(a == o for a, o in zip(peft_out, ours_out)) / len(peft_out)
        result["rounds"].append(row)
        print(f"round {r}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in row.items()), file=sys.stderr, flush=True)
    result["peft_vs_ours_identical_fraction"] = parity
    result["tokens_per_s"] = {k: sum(r[k] for r in result["rounds"]) / rounds for k in CASES}
    tps = result["tokens_per_s"]
    result["ratios"] = {
        "ours_warm/peft_seq": tps["ours_warm"] / tps["peft_seq"],
        "ours_cold/peft_seq": tps["ours_cold"] / tps["peft_seq"],
        "ours_warm/hf_static": tps["ours_warm"] / tps["hf_static"],
        "ours_cold/hf_static": tps["ours_cold"] / tps["hf_static"],
        "ours_homog/hf_static": tps["ours_homog"] / tps["hf_static"],
        "ours_seq/peft_seq": tps["ours_seq"] / tps["peft_seq"],
    }
    result["paired_ratios"] = paired_ratios(result)
    result["load_avg_end"] = C.load_average()
    b.tmp.cleanup()
    return result


def paired_ratios(result: dict) -> dict:
    """Median over rounds of the ratio measured within each round (cancels drift between rounds)."""
    pairs = {"ours_warm/peft_seq": ("ours_warm", "peft_seq"), "ours_cold/peft_seq": ("ours_cold", "peft_seq"),
             "ours_warm/hf_static": ("ours_warm", "hf_static"), "ours_cold/hf_static": ("ours_cold", "hf_static"),
             "ours_homog/hf_static": ("ours_homog", "hf_static"), "ours_seq/peft_seq": ("ours_seq", "peft_seq")}
    return {name: C.median([r[a] / r[b] for r in result["rounds"]]) for name, (a, b) in pairs.items()}


def render(result: dict, live: dict | None = None) -> str:
    tps = result["tokens_per_s"]
    B, T = result["batch"], result["max_tokens"]
    lines = [
        f"### Baselines (in-process, {result['model']} {result['dtype']} on {result['device']}, B={B}, "
        f"{T} output tokens, k={result['k']}, {len(result['rounds'])} interleaved round(s))",
        "",
    ]
    rows = []
    for key, label in CASES.items():
        per = [r[key] for r in result["rounds"]]
        rows.append([label, tps[key], " / ".join(f"{x:.1f}" for x in per), tps[key] / tps["peft_seq"], tps[key] / tps["hf_static"]])
    if live:
        rows.append([f"ours, live server, C={live['concurrency']} clients, (b) {live['concurrency']} distinct prompts (bench/load.py)",
                     live["tokens_per_s"], "", live["tokens_per_s"] / tps["peft_seq"], live["tokens_per_s"] / tps["hf_static"]])
    lines.append(C.md_table(["configuration", "output tok/s", "per round", "x (i)", "x (ii)"], rows, digits=2))
    r = result["ratios"]
    pr = result.get("paired_ratios") or paired_ratios(result)
    per_round = "; ".join(
        f"round {i}: warm/(i) {x['ours_warm'] / x['peft_seq']:.1f}x, warm/(ii) {x['ours_warm'] / x['hf_static']:.2f}x"
        for i, x in enumerate(result["rounds"]))
    lines += [
        "",
        f"Goal ours/(i) >= 8: warm {r['ours_warm/peft_seq']:.1f}x, cold {r['ours_cold/peft_seq']:.1f}x (ratio of means); "
        f"median of per-round ratios: warm {pr['ours_warm/peft_seq']:.1f}x. "
        f"Goal ours/(ii) >= 1.0: warm {r['ours_warm/hf_static']:.2f}x, cold {r['ours_cold/hf_static']:.2f}x "
        f"(on (ii)'s own homogeneous input: {r['ours_homog/hf_static']:.2f}x); median of per-round ratios: warm "
        f"{pr['ours_warm/hf_static']:.2f}x, same input {pr['ours_homog/hf_static']:.2f}x. Per round: {per_round}.",
        "",
        f"(i) uses {result['num_adapters']} PEFT adapters round-robin over {result['seq_requests']} requests per round; "
        "`PeftModel.generate` is not used because it is broken for prompt tuning on transformers 5.x, so (i) is a "
        "hand-written greedy loop over the base model with a KV cache (prefill `inputs_embeds = cat(P, embed(ids))`, "
        "then one token per step) — the fastest PEFT-based sequential decode available. "
        f"Greedy outputs of (i) and ours (batch 1) identical for {100 * (result['peft_vs_ours_identical_fraction'] or 0):.0f}% "
        f"of requests. (ii) inputs are {result['equal_len']} tokens each (the mean of ours' 32-64). "
        f"Load average {result['load_avg_start']:.2f} at start, {result['load_avg_end']:.2f} at end.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--batch", type=int, default=None, help="B (default 32; quick 4)")
    p.add_argument("--max-tokens", type=int, default=None, help="output tokens (default 64; quick 8)")
    p.add_argument("--seq-requests", type=int, default=None, help="requests per round for the batch-1 cases (default 4)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--rounds", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
