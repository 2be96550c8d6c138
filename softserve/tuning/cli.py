"""`softserve tune`: learn a soft prompt offline on the (frozen) model and write a PEFT adapter
directory (`--out`) and/or a new version in a prompt store (`--store`).

Imports of torch/transformers happen inside `cmd_tune`, so building the CLI parser stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path

__all__ = ["add_tune_parser", "cmd_tune"]

MODEL_SETTINGS = ("model", "gguf_file", "device", "dtype")  # flags (and SOFTSERVE_* env) shared with `serve`


def add_tune_parser(sub) -> argparse.ArgumentParser:
    from softserve.config import add_settings_flags
    from softserve.tuning.config import INIT_METHODS, LR_SCHEDULES, METHODS, RESULT_PROMPTS, TuningConfig

    d = TuningConfig  # a dataclass's class attributes are its field defaults
    p = sub.add_parser("tune", help="learn a soft prompt (prompt tuning) on the frozen model",
                       description="Train a PEFT prompt-tuning soft prompt on JSONL data "
                                   '({"prompt","completion"} or {"messages"} lines).')
    p.add_argument("--data", required=True, help="training JSONL")
    p.add_argument("--eval", help="held-out JSONL: eval loss and exact-match accuracy (greedy)")
    p.add_argument("--name", required=True, help="prompt name")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="prompt: PEFT PROMPT_TUNING (a [k, hidden] prompt before the input); prefix: PEFT PREFIX_TUNING "
                        "(every layer's keys and values at k positions; trains alone, never packed) (default %(default)s)")
    p.add_argument("--prefix-projection", action="store_true",
                   help="prefix only: learn through PEFT's reparametrisation MLP (the saved file holds its output)")
    p.add_argument("--encoder-hidden-size", type=int,
                   help="prefix projection MLP width (default: num_key_value_heads * head_dim, as PEFT)")
    p.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens, help="k, rows of the soft prompt (default %(default)s)")
    p.add_argument("--init", choices=INIT_METHODS,
                   help="initialisation (default: random for prefix, else text if --init-text, else vocab)")
    p.add_argument("--init-text", help="text whose token embeddings initialise the prompt (repeated/truncated to k)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.learning_rate, help="AdamW learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per step (default %(default)s)")
    p.add_argument("--micro-batch-size", type=int, help="gradient-accumulation unit (default: batch size)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps (default %(default)s)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule, help="(default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps (default: at the end)")
    p.add_argument("--eval-at-start", action="store_true", help="also evaluate the initial prompt")
    p.add_argument("--early-stopping-patience", type=int, default=d.early_stopping_patience,
                   help="stop after N evals (every --eval-every steps) without eval-loss improvement (default 0: off)")
    p.add_argument("--result-prompt", choices=RESULT_PROMPTS,
                   help="write the last prompt or the one of the lowest eval loss (default: best with early stopping)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="longest example in real tokens (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    add_settings_flags(p, only=MODEL_SETTINGS)
    p.add_argument("--out", help="write the PEFT adapter directory here")
    p.add_argument("--store", help="push a new version into this prompt store directory")
    p.add_argument("--tenant", default="default", help="store tenant (default 'default', the no-auth tenant)")
    p.add_argument("--description")
    p.add_argument("--log-every", type=int, help="progress line every N steps (default: about 20 lines)")
    p.add_argument("--checkpoint-dir", help="write resumable checkpoints here (default: OUT/checkpoints with --out)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: ceil(steps / 10))")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --checkpoint-dir (same data and settings; "
                        "the result equals an uninterrupted run's)")
    return p


def cmd_tune(args) -> int:
    from softserve.config import Settings
    from softserve.model_loader import load_model, resolve_device, resolve_dtype, resolve_source
    from softserve.tuning.data import DatasetError, load_examples, tokenize_examples
    from softserve.tuning.export import adapter_files, model_info, push_to_store, save_adapter
    from softserve.config import setting_default
    from softserve.tuning.config import TuningConfig, default_init, default_result_prompt
    from softserve.tuning.trainer import PromptTuner

    if not args.out and not args.store:
        raise SystemExit("softserve tune: give --out DIR and/or --store DIR")
    init = default_init(args.init, args.init_text, args.method)
    if args.method == "prefix" and args.init_text:
        raise SystemExit("softserve tune: --init-text is for --method prompt (prefix tuning starts from PEFT's random init)")
    config = TuningConfig(
        method=args.method, prefix_projection=args.prefix_projection, encoder_hidden_size=args.encoder_hidden_size,
        num_virtual_tokens=args.num_virtual_tokens, init=init, init_text=args.init_text if init == "text" else None,
        steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size, micro_batch_size=args.micro_batch_size,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay,
        seed=args.seed, eval_every=args.eval_every, eval_at_start=args.eval_at_start, max_length=args.max_length,
        early_stopping_patience=args.early_stopping_patience,
        result_prompt=default_result_prompt(args.result_prompt, args.early_stopping_patience),
    )
    try:
        config.validate()
    except ValueError as exc:
        raise SystemExit(f"softserve tune: {exc}") from None

    settings = Settings(**{name: getattr(args, name) for name in MODEL_SETTINGS if getattr(args, name) is not None})
    source = resolve_source(settings.model, settings.gguf_file)
    device = resolve_device(settings.device)
    print(f"loading {source.name} on {device} ...", file=sys.stderr, flush=True)
    model, tokenizer = load_model(source, device, resolve_dtype(settings.dtype, device))
    try:
        train = tokenize_examples(tokenizer, load_examples(args.data), max_length=args.max_length, source=args.data)
        evals = tokenize_examples(tokenizer, load_examples(args.eval), max_length=args.max_length, source=args.eval) if args.eval else []
    except (DatasetError, OSError) as exc:
        raise SystemExit(f"softserve tune: {exc}") from None
    print(f"{len(train)} training examples, {len(evals)} eval examples; method={config.method} "
          f"k={config.num_virtual_tokens} init={init} "
          f"steps={config.steps} lr={config.learning_rate} batch={config.batch_size} seed={config.seed}",
          file=sys.stderr, flush=True)
    every = args.log_every or max(1, config.steps // 20)

    def progress(info) -> None:
        if info.step % every == 0 or info.step == config.steps or info.eval_loss is not None:
            print(info.line(), flush=True)

    ckpt_dir = args.checkpoint_dir or (str(Path(args.out) / "checkpoints") if args.out else None)
    if args.resume and not ckpt_dir:
        raise SystemExit("softserve tune: --resume needs --checkpoint-dir (or --out)")
    fingerprint = {"config": dataclasses.asdict(config), "data_sha256": _data_digest(train, evals)}
    ckpt_every = args.checkpoint_every or max(1, -(-config.steps // 10))
    tuner = None

    def progress_and_checkpoint(info) -> None:
        progress(info)
        if ckpt_dir and info.step and (info.step % ckpt_every == 0 or info.stopping) and info.step < config.steps:
            tensors, meta = tuner.state()
            _write_checkpoint(Path(ckpt_dir), info.step, tensors, {**meta, **fingerprint})

    before = _param_digest(model)
    tuner = PromptTuner(model, tokenizer, train, evals, config, on_progress=progress_and_checkpoint)
    if args.resume:
        step = _resume(tuner, Path(ckpt_dir), fingerprint)
        print(f"resuming from the checkpoint at step {step} in {ckpt_dir}", file=sys.stderr, flush=True)
    result = tuner.run()
    assert _param_digest(model) == before, "model weights changed during tuning"  # cheap guard, never expected

    info = model_info(model, source.name)
    files = adapter_files(result.embeddings, config, info)  # tokenizer: the public model name, not its install path
    summary = {"name": args.name, "method": config.method, "num_virtual_tokens": config.num_virtual_tokens, "steps": config.steps,
               "final_loss": result.history[-1].loss if result.history else None,
               "eval_loss": result.eval_loss, "eval_accuracy": result.eval_accuracy,
               "trained_tokens": result.trained_tokens, "seconds": round(result.elapsed_s, 1),
               "steps_done": result.steps_done, "stopped_early": result.stopped_early, "best_step": result.best_step}
    if args.out:
        summary["adapter_dir"] = str(save_adapter(files, args.out))
    if args.store:
        from softserve.store.backends import LocalBackend
        from softserve.store.store import PromptStore

        Path(args.store).mkdir(parents=True, exist_ok=True)
        store = PromptStore(LocalBackend(Path(args.store)), info, max_virtual_tokens=max(setting_default("max_virtual_tokens"), config.num_virtual_tokens))
        meta, warnings = push_to_store(store, args.tenant, args.name, files, description=args.description)
        summary.update(store=args.store, tenant=args.tenant, version=meta.version, ref=meta.ref, warnings=warnings)
    print(json.dumps(summary, indent=2), flush=True)
    return 0


def _data_digest(train, evals) -> str:
    h = hashlib.sha256()
    for part in (train, evals):
        for ex in part:
            h.update(json.dumps([ex.input_ids, ex.labels, ex.prompt_ids, ex.target]).encode())
        h.update(b"|")
    return h.hexdigest()


def _write_checkpoint(directory: Path, step: int, tensors, meta) -> None:
    from softserve.tuning.persist import encode_state

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".step-{step:08d}.tmp"
    tmp.write_bytes(encode_state(tensors, meta))
    os.replace(tmp, directory / f"step-{step:08d}.safetensors")  # complete or absent


def _resume(tuner, directory: Path, fingerprint: dict) -> int:
    from softserve.tuning.persist import decode_state

    files = sorted(directory.glob("step-*.safetensors")) if directory.is_dir() else []
    if not files:
        raise SystemExit(f"softserve tune: --resume: no checkpoint in {directory}")
    tensors, meta = decode_state(files[-1].read_bytes())
    if meta.get("data_sha256") != fingerprint["data_sha256"]:
        raise SystemExit(f"softserve tune: --resume: {files[-1].name} was trained on other data")
    if meta.get("config") != fingerprint["config"]:
        changed = sorted(k for k, v in fingerprint["config"].items() if (meta.get("config") or {}).get(k) != v)
        raise SystemExit(f"softserve tune: --resume: settings differ from the checkpoint's: {', '.join(changed)}")
    tuner.load_state(tensors, meta)
    return int(meta["step"])


def _param_digest(model) -> int:
    import torch

    with torch.no_grad():
        return hash(tuple(float(p.double().sum()) for p in model.parameters()))
