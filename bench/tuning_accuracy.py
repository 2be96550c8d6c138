"""Accuracy of tuned soft prompts on the example datasets (examples/make_datasets.py): the base model
with a written instruction vs prompt tuning vs prefix tuning (with and without PEFT's projection MLP).

    .venv/bin/python bench/tuning_accuracy.py [--steps 60] [--train-limit 0] [--eval-limit 40] [--quick]

Each method trains on the dataset's train split with the trainer `softserve tune` and server jobs run
(`PromptTuner`), then is judged on the held-out eval split (held-out subjects / templates /
combinations, see make_datasets.py) by greedy decoding: "exact" is the trainer's own eval (the
output up to EOS equals the target, whitespace-normalised), "first line" is lenient (the output's
first non-empty line equals the target's, case-insensitive: a base model that answers and then keeps
talking still counts); plus the token-mean eval loss over the completion tokens. The base row puts a
written instruction before each eval prompt (a system message for the chat dataset), no soft prompt.

Recipes (fixed seeds): prompt tuning k=8, init = the instruction's text, AdamW lr 3e-2; prefix tuning
k=8, PEFT's random init, lr 1e-2 (`--lr-prefix`); batch 8, linear decay, grad clip 1.0. Steps are
deliberately few (a CPU budget): the table says how many steps and examples each run saw.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # `python bench/tuning_accuracy.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_common_args, load, load_average, machine_facts, md_table, model_label, script_main, setup_torch  # noqa: E402

DATASETS = {  # name -> (make_datasets function, train size, eval size, written instruction for the base row)
    "sentiment": ("sentiment", 240, 80, "Classify the sentiment of the review. Answer with one word: positive or negative."),
    "extract": ("extract", 200, 60, 'Extract the person\'s name and city from the text as JSON, exactly like '
                                    '{"name": "Ann Lee", "city": "Paris"}.'),
    "pirate": ("pirate", 160, 40, "Rewrite the sentence the way a pirate would say it. Use pirate words like "
                                  "ahoy, matey, be, th', ship, grub. Answer with the rewritten sentence only."),
}
METHODS = ("base", "prompt", "prefix", "prefix-proj")


def build_parser() -> argparse.ArgumentParser:
    p = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--datasets", default="sentiment,extract,pirate")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per tuned run")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-virtual-tokens", type=int, default=8)
    p.add_argument("--lr-prompt", type=float, default=3e-2)
    p.add_argument("--lr-prefix", type=float, default=1e-2)
    p.add_argument("--train-limit", type=int, default=0, help="use the first N training examples (0: all)")
    p.add_argument("--eval-limit", type=int, default=40, help="judge on the first N eval examples (0: all)")
    return p


def _splits(name: str, train_limit: int, eval_limit: int) -> tuple[list[dict], list[dict]]:
    examples = str(Path(__file__).resolve().parent.parent / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import make_datasets

    fn, n_train, n_eval, _ = DATASETS[name]
    # The same split `python examples/make_datasets.py` writes (its default seed 1234).
    train, evals = getattr(make_datasets, fn)(random.Random(f"1234-{name}"), n_train, n_eval)
    return train[:train_limit or None], evals[:eval_limit or None]


def _with_instruction(record: dict, instruction: str) -> dict:
    if "messages" in record:
        return {"messages": [{"role": "system", "content": instruction}] + record["messages"]}
    return {"prompt": f"{instruction}\n\n{record['prompt']}", "completion": record["completion"]}


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " ".join(lines[0].split()).lower() if lines else ""


def _judge(tuner, tensor, evals) -> dict:
    """Eval loss, exact match and first-line match of `tensor` (a prompt, a prefix KV, or a k=0 prompt)."""
    import torch

    with torch.no_grad():
        return _judge_rows(tuner, tensor, evals)


def _judge_rows(tuner, tensor, evals) -> dict:
    from softserve.tuning.prefix import prefix_greedy_generate
    from softserve.tuning.trainer import exact_match, greedy_generate

    loss_sum, count, exact, first = 0.0, 0, 0, 0
    max_new = max(r.num_target_tokens for r in evals) + 4
    for start in range(0, len(evals), 16):
        rows = evals[start:start + 16]
        s, c = tuner._loss_sum(tensor, rows)
        loss_sum, count = loss_sum + float(s), count + c
        prompts = [r.prompt_ids for r in rows]
        if tuner.prefix:
            outs = prefix_greedy_generate(tuner.model, tensor, prompts, max_new, tuner.eos_ids, tuner.pad_id, tuner.shape)
        else:
            outs = greedy_generate(tuner.model, tensor, prompts, max_new, tuner.eos_ids, tuner.pad_id)
        for r, o in zip(rows, outs):
            text = tuner.tokenizer.decode(o, skip_special_tokens=True)
            exact += int(exact_match(text, r.target))
            first += int(_first_line(text) == _first_line(r.target))
    return {"eval_loss": loss_sum / max(1, count), "exact_match": exact / len(evals), "first_line": first / len(evals)}


def _evaluate_base(model, tok, evals) -> dict:
    """The base model, no soft prompt: a k=0 prompt through the trainer's own loss and decoder."""
    import torch

    from softserve.tuning.trainer import PromptTuner, TuningConfig

    tuner = PromptTuner(model, tok, evals, None, TuningConfig(init="random", num_virtual_tokens=1, steps=1))
    return _judge(tuner, torch.zeros(0, model.get_input_embeddings().weight.shape[1]), evals)


def _tune(model, tok, train, evals, method: str, args, instruction: str) -> dict:
    from softserve.tuning.trainer import PromptTuner, TuningConfig

    common = dict(num_virtual_tokens=args.num_virtual_tokens, steps=args.steps, batch_size=args.batch_size,
                  seed=args.seed, max_grad_norm=1.0)
    if method == "prompt":
        cfg = TuningConfig(init="text", init_text=instruction, learning_rate=args.lr_prompt, **common)
    else:
        cfg = TuningConfig(method="prefix", init="random", prefix_projection=method == "prefix-proj",
                           learning_rate=args.lr_prefix, **common)
    t0 = time.perf_counter()

    def tick(info) -> None:
        if info.step % 10 == 0:
            print(f"    {method} {info.line()}", file=sys.stderr, flush=True)

    tuner = PromptTuner(model, tok, train, None, cfg, on_progress=tick)
    result = tuner.run()
    losses = [h.loss for h in result.history if h.loss is not None]
    train_s = round(time.perf_counter() - t0, 1)
    return {**_judge(tuner, result.embeddings, evals), "first_loss": losses[0], "last_loss": losses[-1],
            "train_s": train_s, "seconds": round(time.perf_counter() - t0, 1), "steps": result.steps_done}


def run(args) -> dict:
    from softserve.tuning.data import parse_records, tokenize_examples

    setup_torch(args)
    if args.quick:
        args.steps, args.train_limit, args.eval_limit = 2, 16, 4
    model, tok, _, _, _ = load(args.model, args.device, "float32")
    rows = []
    for name in args.datasets.split(","):
        instruction = DATASETS[name][3]
        train_records, eval_records = _splits(name, args.train_limit, args.eval_limit)
        train = tokenize_examples(tok, parse_records(train_records))
        evals = tokenize_examples(tok, parse_records(eval_records))
        for method in args.methods.split(","):
            print(f"{name} / {method} ...", file=sys.stderr, flush=True)
            if method == "base":
                t0 = time.perf_counter()
                instructed = tokenize_examples(tok, parse_records([_with_instruction(r, instruction) for r in eval_records]))
                out = {**_evaluate_base(model, tok, instructed), "seconds": round(time.perf_counter() - t0, 1), "steps": 0}
            else:
                out = _tune(model, tok, train, evals, method, args, instruction)
            out.update(dataset=name, method=method, n_train=len(train) if method != "base" else 0, n_eval=len(evals),
                       load_average=round(load_average(), 2))
            print(f"  {out}", file=sys.stderr, flush=True)
            rows.append(out)
    return {"name": "tuning_accuracy", "model": model_label(args.model), "rows": rows, "steps": args.steps, "batch_size": args.batch_size,
            "num_virtual_tokens": args.num_virtual_tokens, "lr_prompt": args.lr_prompt, "lr_prefix": args.lr_prefix,
            "machine": machine_facts()}


LABELS = {"base": "base + instruction", "prompt": "prompt tuning", "prefix": "prefix tuning",
          "prefix-proj": "prefix tuning + projection"}


def render(res: dict) -> str:
    table = md_table(
        ["dataset", "method", "exact match", "first-line match", "eval loss", "train examples", "eval examples",
         "steps (x batch)", "s"],
        [[r["dataset"], LABELS[r["method"]], f"{r['exact_match']:.2f}", f"{r['first_line']:.2f}", f"{r['eval_loss']:.3f}", r["n_train"],
          r["n_eval"], f"{r['steps']} x {res['batch_size']}" if r["steps"] else "-", r["seconds"]] for r in res["rows"]])
    loads = [r["load_average"] for r in res["rows"]]
    return (f"{res['model']}, k={res['num_virtual_tokens']}, lr prompt {res['lr_prompt']:g} / prefix {res['lr_prefix']:g}, "
            f"load average {min(loads):.1f}-{max(loads):.1f}\n"
            f"{table}\n`{res['command']}`")


def main(argv: list[str] | None = None) -> dict:
    return script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
