"""`softserve` command line: serve (flags generated from `Settings`), keys, prompts and eval (through
`softserve.client.Client`), tune (softserve/tuning/cli.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from softserve.config import OFFLINE_DEFAULTS, ClientSettings, Settings, add_settings_flags, settings_from_args


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server",
                       description="Every flag also reads SOFTSERVE_<FLAG> from the environment (e.g. "
                                   "SOFTSERVE_MAX_MODEL_LEN); a flag given wins.")
    add_settings_flags(p)


def check_store_writable(store: str) -> None:
    """Exit at once, saying why, when a local prompt store cannot be written: a bind mount owned by
    root used to fail with PermissionError on the first write, after the model had loaded (issue #26)."""
    if "://" in store:  # s3://: credentials and bucket show on the first request
        return
    path = Path(store)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        who = f"uid {os.geteuid()}" if hasattr(os, "geteuid") else "this user"
        raise SystemExit(
            f"softserve serve: the prompt store {str(path)!r} is not writable by {who} "
            f"({type(exc).__name__}: {exc.strerror or exc}). In the Docker image the server runs as uid 10001: "
            f"give it the host directory (chown -R 10001:10001 DIR), or use a named volume (docs/deploy.md)") from None


def cmd_serve(args) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise SystemExit(f"softserve serve: {exc}") from None
    check_store_writable(settings.store)  # before the model loads (tens of seconds), not after
    if not settings.model:  # say what to install before binding a port, not after a background load fails
        from softserve.model_loader import embedded_model_source

        try:
            embedded_model_source()
        except FileNotFoundError as exc:
            raise SystemExit(f"softserve serve: {exc}") from None
    from softserve.logs import configure_logging

    configure_logging(settings.log_level, settings.json_logs)
    from softserve.engine.compute_threads import configure as configure_compute_threads

    configure_compute_threads(settings.torch_threads)  # before any torch work: the engine thread owns the one pool
    from softserve.app import create_app
    from softserve.serving import run_server

    app = create_app(settings)
    state = app.state.service
    state.exit_on_engine_death = True

    def announce() -> None:
        state.loaded.wait()
        if state.load_error:
            print(f"softserve: start-up failed: {state.load_error}", file=sys.stderr, flush=True)
            os._exit(1)
        print(f"softserve: ready — serving {state.served_model_name} at http://{settings.host}:{settings.port}/v1", flush=True)

    print(f"softserve: listening on http://{settings.host}:{settings.port} (loading model...)", flush=True)
    threading.Thread(target=announce, daemon=True).start()
    run_server(app, settings)
    return 0


def cmd_keys_add(args) -> int:
    from softserve.service.auth import add_key

    key = add_key(args.file, args.tenant, args.role)
    print(key)
    print(f"# added a {args.role} key for tenant {args.tenant!r} to {args.file}; it is shown only once", file=sys.stderr)
    return 0


def _client(args):
    from softserve.client import Client

    return Client(args.url, api_key=args.api_key or "", timeout=60)


@contextlib.contextmanager
def _errors_exit():
    """Client errors end the command with `error <status>: <message>` on stderr."""
    from softserve.client import SoftserveError

    try:
        yield
    except SoftserveError as exc:
        raise SystemExit(f"error {exc.status_code}: {exc.message}" if exc.status_code else f"error: {exc.message}") from None


def cmd_prompts(args) -> int:
    with _client(args) as client, _errors_exit():
        if args.prompts_cmd == "push":
            try:
                pushed = client.prompts.push(args.dir, args.name, description=args.description)
            except FileNotFoundError as exc:
                raise SystemExit(f"error: {exc}") from None
            print(json.dumps(pushed.model_dump(mode="json"), indent=2))
        elif args.prompts_cmd == "list":
            for item in client.prompts.list():
                print(f"{item.id:40s} {item.version}  k={item.num_virtual_tokens}  {item.dtype}")
        elif args.prompts_cmd == "rm":
            client.prompts.delete(args.name)
            print(f"deleted {args.name}")
        elif args.prompts_cmd == "pull":
            out = client.prompts.pull(args.name, args.dir)
            print(f"wrote PEFT adapter to {out}")
        elif args.prompts_cmd == "alias":
            _alias_command(client, args)
    return 0


def cmd_batches(args) -> int:
    with _client(args) as client, _errors_exit():
        if args.batches_cmd == "create":
            try:
                batch = client.batches.create(args.input, endpoint=args.endpoint,
                                              metadata=dict(m.split("=", 1) for m in args.metadata or []))
            except (OSError, ValueError) as exc:
                raise SystemExit(f"error: {exc}") from None
            if args.wait:
                batch = client.batches.wait(batch.id, poll_interval=args.poll_interval)
            print(batch.model_dump_json(indent=2))
        elif args.batches_cmd == "get":
            print(client.batches.get(args.batch_id).model_dump_json(indent=2))
        elif args.batches_cmd == "list":
            for b in client.batches.list():
                counts = b.request_counts
                print(f"{b.id}  {b.status:11s} {counts.completed + counts.failed}/{counts.total} done, "
                      f"{counts.failed} failed  {b.endpoint}")
        elif args.batches_cmd == "cancel":
            print(client.batches.cancel(args.batch_id).model_dump_json(indent=2))
        elif args.batches_cmd == "download":
            batch = client.batches.get(args.batch_id)
            written = []
            for file_id, path in ((batch.output_file_id, args.output), (batch.error_file_id, args.errors)):
                if file_id is not None and path is not None:
                    with open(path, "wb") as f:
                        f.write(client.batches.content(file_id))
                    written.append(path)
            if not written:
                raise SystemExit(f"error: batch {batch.id} is {batch.status}: no output or error file yet")
            print(f"wrote {', '.join(written)}")
    return 0


def _split_arg(arms: list[str]) -> list[tuple[str, float]]:
    """`--split V1=90 V2=10` -> [(V1, 90.0), (V2, 10.0)]."""
    out = []
    for arm in arms:
        version, sep, weight = arm.partition("=")
        try:
            out.append((version, float(weight)))
        except ValueError:
            sep = ""
        if not sep or not version:
            raise SystemExit(f"error: --split takes VERSION=WEIGHT pairs, got {arm!r}")
    return out


def _print_alias(alias) -> None:
    arms = "  ".join(f"{a.version}={a.weight:g}" for a in alias.split)
    print(f"{alias.id:40s} {arms}")


def _alias_command(client, args) -> None:
    """`softserve prompts alias set/list/rm/history` (docs/releases.md)."""
    if args.alias_cmd == "set":
        if (args.version is None) == (args.split is None):
            raise SystemExit("error: give a VERSION or --split VERSION=WEIGHT ...")
        split = _split_arg(args.split) if args.split is not None else None
        _print_alias(client.prompts.set_alias(args.name, args.alias, args.version, split=split))
    elif args.alias_cmd == "list":
        for alias in client.prompts.aliases(args.name):
            _print_alias(alias)
    elif args.alias_cmd == "rm":
        client.prompts.delete_alias(args.name, args.alias)
        print(f"deleted {args.name}@{args.alias}")
    elif args.alias_cmd == "history":
        for change in client.prompts.get_alias(args.name, args.alias).history or []:
            arms = lambda xs: "-" if xs is None else ",".join(f"{a.version}={a.weight:g}" for a in xs)  # noqa: E731
            print(f"{change.seq:4d} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(change.at))} {change.by or '-':28s} "
                  f"{arms(change.from_)} -> {arms(change.to)}")


def cmd_eval(args) -> int:
    from softserve.evaluation import EvalDataError, evaluate, load_eval_data

    try:
        items = load_eval_data(args.data)
    except (OSError, EvalDataError) as exc:
        raise SystemExit(f"error: {exc}") from None
    with _client(args) as client:
        try:
            result = evaluate(client, args.model, items, max_tokens=args.max_tokens)
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}") from None
    print(json.dumps({"model": args.model, "data": args.data, **result.summary()}))
    return 0


def cmd_store(args) -> int:
    from softserve.store.backends import open_backend
    from softserve.store.gc import collect_garbage

    overrides = {"store": args.store, "s3_endpoint_url": args.s3_endpoint_url}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    backend = open_backend(settings.store, s3_endpoint_url=settings.s3_endpoint_url)
    grace = args.grace_seconds if args.grace_seconds is not None else settings.store_gc_grace_seconds
    if grace < 0:
        raise SystemExit("error: --grace-seconds must be >= 0")
    report = collect_garbage(backend, grace, dry_run=args.dry_run)
    print(json.dumps(report.to_dict()))
    return 0
RUN_BATCH_SETTINGS = ("model", "gguf_file", "served_model_name", "store", "s3_endpoint_url", "device", "dtype",
                      "max_batch_size", "max_model_len", "max_prefill_tokens", "max_virtual_tokens", "max_prompt_parts",
                      "prompt_cache_bytes", "kv_prefix_cache_bytes", "kv_cache_bytes", "max_tokens_limit", "max_n",
                      "torch_threads", "compile", "pack_linears", "native_kernels", "batch_window",
                      "max_background_step_tokens", "log_level")


def cmd_run_batch(args) -> int:
    from softserve.run_batch import run_batch

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        raise SystemExit(f"softserve run-batch: {exc}") from None
    from softserve.logs import configure_logging

    configure_logging(settings.log_level if args.log_level else "warning", settings.json_logs)
    from softserve.engine.compute_threads import configure as configure_compute_threads

    configure_compute_threads(settings.torch_threads)
    try:
        result = run_batch(settings, args.input, args.output, error_path=args.error_file, tenant=args.tenant,
                           show_progress=not args.no_progress)
    except (OSError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(result.to_dict()))
    return 0 if result.failed == 0 else 3


def _client_flags(parser: argparse.ArgumentParser, env: ClientSettings) -> None:
    fields = ClientSettings.model_fields
    parser.add_argument("--url", default=env.url, help=f"{fields['url'].description} (env SOFTSERVE_URL, default {fields['url'].default})")
    parser.add_argument("--api-key", default=env.api_key, help=f"{fields['api_key'].description} (env SOFTSERVE_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    env = ClientSettings()
    parser = argparse.ArgumentParser(prog="softserve", description="Serve many soft prompts on one frozen LLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_cmd", required=True)
    add = keys.add_parser("add", help="create a key for a tenant and print it once")
    add.add_argument("--tenant", required=True)
    add.add_argument("--role", choices=["user", "admin"], default="user")
    add.add_argument("--file", default=env.api_keys, help="key file to add to (env SOFTSERVE_API_KEYS, default "
                                                          f"{ClientSettings.model_fields['api_keys'].default})")

    prompts = sub.add_parser("prompts", help="push/list/rm/pull soft prompts and set their aliases on a running server")
    _client_flags(prompts, env)
    psub = prompts.add_subparsers(dest="prompts_cmd", required=True)
    push = psub.add_parser("push", help="upload a PEFT adapter directory (or a bare .safetensors file)")
    push.add_argument("dir")
    push.add_argument("--name", required=True)
    push.add_argument("--description")
    psub.add_parser("list", help="list prompts")
    rm = psub.add_parser("rm", help="delete a prompt")
    rm.add_argument("name")
    pull = psub.add_parser("pull", help="download a prompt as a PEFT adapter directory")
    pull.add_argument("name")
    pull.add_argument("dir")
    alias = psub.add_parser("alias", help="release aliases (name@prod): set, list, rm, history (docs/releases.md)")
    asub = alias.add_subparsers(dest="alias_cmd", required=True)
    aset = asub.add_parser("set", help="point NAME@ALIAS at VERSION, or at a weighted --split")
    aset.add_argument("name")
    aset.add_argument("alias")
    aset.add_argument("version", nargs="?")
    aset.add_argument("--split", nargs="+", metavar="VERSION=WEIGHT", help="e.g. --split 3f2a9c=90 81bd07=10 (up to 8)")
    asub.add_parser("list", help="the aliases of a prompt").add_argument("name")
    arm = asub.add_parser("rm", help="delete an alias")
    arm.add_argument("name")
    arm.add_argument("alias")
    ahist = asub.add_parser("history", help="every change of an alias: who, when, from, to")
    ahist.add_argument("name")
    ahist.add_argument("alias")

    ev = sub.add_parser("eval", help="accuracy of a model or soft prompt on a JSONL file, scored by a running server",
                        description="Multiple choice lines ({prompt, choices, answer}) are scored by log-likelihood "
                                    "(echo + logprobs, max_tokens 0); {prompt, completion} lines by exact match of "
                                    "greedy generation. Prints a JSON summary with the accuracy.")
    ev.add_argument("--model", required=True, help="served model name or soft prompt (as in the API's `model`)")
    ev.add_argument("--data", required=True, help="JSONL file")
    ev.add_argument("--max-tokens", type=int, default=32, help="generation length for exact-match lines")
    _client_flags(ev, env)

    store = sub.add_parser("store", help="maintain the prompt store directly (no server needed)")
    ssub = store.add_subparsers(dest="store_cmd", required=True)
    gc = ssub.add_parser("gc", help="delete unreferenced blobs, orphan manifests and stale temp files; recount usage",
                         description="Safe while servers run and upload (also several replicas on one S3 store): "
                                     "nothing younger than the grace period is deleted. Prints a JSON report.")
    gc.add_argument("--store", help="a directory or s3://bucket/prefix (default: env SOFTSERVE_STORE, else ./data/prompts)")
    gc.add_argument("--s3-endpoint-url", help="S3 endpoint (default: env SOFTSERVE_S3_ENDPOINT_URL)")
    gc.add_argument("--grace-seconds", type=float, help="keep anything younger than this "
                                                        "(default: env SOFTSERVE_STORE_GC_GRACE_SECONDS, else 3600)")
    gc.add_argument("--dry-run", action="store_true", help="report what would be deleted, delete nothing")

    batches = sub.add_parser("batches", help="create/get/list/cancel/download Batch API batches on a running server")
    _client_flags(batches, env)
    bsub = batches.add_subparsers(dest="batches_cmd", required=True)
    create = bsub.add_parser("create", help="upload a JSONL input file and start a batch (docs/batch.md)")
    create.add_argument("-i", "--input", required=True, help="JSONL file (or an uploaded file id, file-...)")
    create.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    create.add_argument("--metadata", action="append", metavar="KEY=VALUE", help="repeatable")
    create.add_argument("--wait", action="store_true", help="poll until the batch has finished")
    create.add_argument("--poll-interval", type=float, default=2.0)
    for name, text in (("get", "show a batch"), ("cancel", "cancel a batch")):
        bsub.add_parser(name, help=text).add_argument("batch_id")
    bsub.add_parser("list", help="your batches, newest first")
    download = bsub.add_parser("download", help="write a finished batch's output (and error) file")
    download.add_argument("batch_id")
    download.add_argument("-o", "--output", required=True, help="where the output lines go")
    download.add_argument("--errors", help="where the error lines go (default: not downloaded)")

    rb = sub.add_parser("run-batch", help="answer a Batch API input file offline, in this process (no server)",
                        description="Each line {custom_id, method, url, body} as in the OpenAI Batch API; writes the "
                                    "output lines in input order (error lines with their line number into the output "
                                    "file, or --error-file). Prints a JSON summary; exit status 3 if any line failed.")
    rb.add_argument("-i", "--input", required=True, help="input JSONL file")
    rb.add_argument("-o", "--output", required=True, help="output JSONL file")
    rb.add_argument("--error-file", help="write error lines here instead of into the output file")
    rb.add_argument("--tenant", default="default", help="whose prompts the lines' `model` names (default: default)")
    rb.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_settings_flags(rb, only=RUN_BATCH_SETTINGS, defaults=OFFLINE_DEFAULTS)

    from softserve.tuning.cli import add_tune_parser

    add_tune_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "keys":
        return cmd_keys_add(args)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "store":
        return cmd_store(args)
    if args.command == "batches":
        return cmd_batches(args)
    if args.command == "run-batch":
        return cmd_run_batch(args)
    if args.command == "tune":
        from softserve.tuning.cli import cmd_tune

        return cmd_tune(args)
    return cmd_prompts(args)


if __name__ == "__main__":
    raise SystemExit(main())
