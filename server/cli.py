"""`softserve` command line: serve, keys, prompts (a thin HTTP client for the prompt API)."""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
import zipfile
from pathlib import Path

from server.config import Settings

def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


# CLI flag -> Settings field. Every flag also reads SOFTSERVE_<FIELD> (via Settings) when not given.
_SERVE_FLAGS = [
    ("--model", "model", str), ("--gguf-file", "gguf_file", str), ("--served-model-name", "served_model_name", str),
    ("--host", "host", str), ("--port", "port", int), ("--store", "store", str),
    ("--s3-endpoint-url", "s3_endpoint_url", str), ("--store-revalidate-seconds", "store_revalidate_seconds", float),
    ("--device", "device", str), ("--dtype", "dtype", str), ("--max-batch-size", "max_batch_size", int),
    ("--max-model-len", "max_model_len", int), ("--max-queue", "max_queue", int),
    ("--max-prefill-tokens", "max_prefill_tokens", int), ("--max-virtual-tokens", "max_virtual_tokens", int),
    ("--max-prompt-parts", "max_prompt_parts", int),
    ("--max-upload-bytes", "max_upload_bytes", int), ("--prompt-cache-bytes", "prompt_cache_bytes", int),
    ("--kv-prefix-cache-bytes", "kv_prefix_cache_bytes", int), ("--kv-cache-bytes", "kv_cache_bytes", int),
    ("--api-keys", "api_keys", str),
    ("--max-tokens-limit", "max_tokens_limit", int), ("--max-n", "max_n", int),
    ("--max-choices-per-request", "max_choices_per_request", int), ("--max-request-tokens", "max_request_tokens", int),
    ("--max-queue-per-tenant", "max_queue_per_tenant", int), ("--max-tuning-queue", "max_tuning_queue", int),
    ("--max-tuning-jobs-per-tenant", "max_tuning_jobs_per_tenant", int),
    ("--rate-limit-rps", "rate_limit_rps", float), ("--rate-limit-tokens-per-minute", "rate_limit_tokens_per_minute", int),
    ("--request-timeout", "request_timeout", float), ("--shutdown-timeout", "shutdown_timeout", float),
    ("--max-body-bytes", "max_body_bytes", int), ("--max-concurrent-uploads", "max_concurrent_uploads", int),
    ("--max-concurrent-uploads-per-tenant", "max_concurrent_uploads_per_tenant", int),
    ("--metrics-port", "metrics_port", int), ("--metrics-host", "metrics_host", str),
    ("--metrics-tenant-labels", "metrics_tenant_labels", _bool),
    ("--torch-threads", "torch_threads", int), ("--json-logs", "json_logs", _bool),
    ("--log-level", "log_level", str), ("--tuning-lease-seconds", "tuning_lease_seconds", float),
    ("--tuning-scan-seconds", "tuning_scan_seconds", float), ("--tuning-replica-id", "tuning_replica_id", str),
]


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="start the OpenAI-compatible server")
    for flag, field, typ in _SERVE_FLAGS:
        info = Settings.model_fields[field]
        default = info.default
        help_text = (info.description or field.replace("_", " ")) + f" (env SOFTSERVE_{field.upper()}, default {default})"
        kwargs = {"type": typ, "default": None, "help": help_text}
        if field == "device":
            kwargs["choices"] = ["auto", "cpu", "cuda"]
        if field == "dtype":
            kwargs["choices"] = ["auto", "float32", "bfloat16", "float16"]
        p.add_argument(flag, **kwargs)
    p.add_argument("--no-ui", dest="ui", action="store_false", default=None,
                   help="do not serve the web console at /ui (env SOFTSERVE_UI=false; default: served)")


def cmd_serve(args) -> int:
    overrides = {field: getattr(args, field) for _, field, _ in _SERVE_FLAGS if getattr(args, field) is not None}
    if args.ui is not None:
        overrides["ui"] = args.ui
    settings = Settings(**overrides)
    from server.logs import configure_logging

    configure_logging(settings.log_level, settings.json_logs)
    from server.app import create_app
    from server.serving import run_server

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
    from server.service.auth import add_key

    key = add_key(args.file, args.tenant, args.role)
    print(key)
    print(f"# added a {args.role} key for tenant {args.tenant!r} to {args.file}; it is shown only once", file=sys.stderr)
    return 0


def _client(args):
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    return httpx.Client(base_url=args.url, headers=headers, timeout=60)


def _check(resp) -> dict | bytes:
    if resp.status_code >= 400:
        try:
            message = resp.json()["error"]["message"]
        except Exception:
            message = resp.text
        raise SystemExit(f"error {resp.status_code}: {message}")
    return resp


def cmd_prompts(args) -> int:
    with _client(args) as client:
        if args.prompts_cmd == "push":
            directory = Path(args.dir)
            files = {}
            if directory.is_file():
                files["adapter_model"] = ("adapter_model.safetensors", directory.read_bytes(), "application/octet-stream")
            else:
                files["adapter_model"] = ("adapter_model.safetensors", (directory / "adapter_model.safetensors").read_bytes(),
                                          "application/octet-stream")
                config = directory / "adapter_config.json"
                if config.exists():
                    files["adapter_config"] = ("adapter_config.json", config.read_bytes(), "application/json")
            data = {"description": args.description} if args.description else {}
            resp = _check(client.put(f"/v1/prompts/{args.name}", files=files, data=data))
            print(json.dumps(resp.json(), indent=2))
        elif args.prompts_cmd == "list":
            for item in _check(client.get("/v1/prompts")).json()["data"]:
                print(f"{item['id']:40s} {item['version']}  k={item['num_virtual_tokens']}  {item['dtype']}")
        elif args.prompts_cmd == "rm":
            _check(client.delete(f"/v1/prompts/{args.name}"))
            print(f"deleted {args.name}")
        elif args.prompts_cmd == "pull":
            resp = _check(client.get(f"/v1/prompts/{args.name}/download"))
            out = Path(args.dir)
            out.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(io.BytesIO(resp.content)) as zf:
                for member in ("adapter_config.json", "adapter_model.safetensors"):
                    (out / member).write_bytes(zf.read(member))
            print(f"wrote PEFT adapter to {out}")
    return 0


def cmd_eval(args) -> int:
    from server.evaluation import EvalDataError, evaluate, load_eval_data

    try:
        items = load_eval_data(args.data)
    except (OSError, EvalDataError) as exc:
        raise SystemExit(f"error: {exc}")
    with _client(args) as client:
        try:
            result = evaluate(client, args.model, items, max_tokens=args.max_tokens)
        except RuntimeError as exc:
            raise SystemExit(f"error: {exc}")
    print(json.dumps({"model": args.model, "data": args.data, **result.summary()}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="softserve", description="Serve many soft prompts on one frozen LLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)

    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_cmd", required=True)
    add = keys.add_parser("add", help="create a key for a tenant and print it once")
    add.add_argument("--tenant", required=True)
    add.add_argument("--role", choices=["user", "admin"], default="user")
    add.add_argument("--file", default=os.environ.get("SOFTSERVE_API_KEYS", "api_keys.yaml"))

    prompts = sub.add_parser("prompts", help="push/list/rm/pull soft prompts on a running server")
    prompts.add_argument("--url", default=os.environ.get("SOFTSERVE_URL", "http://127.0.0.1:8000"))
    prompts.add_argument("--api-key", default=os.environ.get("SOFTSERVE_API_KEY"))
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

    ev = sub.add_parser("eval", help="accuracy of a model or soft prompt on a JSONL file, scored by a running server",
                        description="Multiple choice lines ({prompt, choices, answer}) are scored by log-likelihood "
                                    "(echo + logprobs, max_tokens 0); {prompt, completion} lines by exact match of "
                                    "greedy generation. Prints a JSON summary with the accuracy.")
    ev.add_argument("--model", required=True, help="served model name or soft prompt (as in the API's `model`)")
    ev.add_argument("--data", required=True, help="JSONL file")
    ev.add_argument("--max-tokens", type=int, default=32, help="generation length for exact-match lines")
    ev.add_argument("--url", default=os.environ.get("SOFTSERVE_URL", "http://127.0.0.1:8000"))
    ev.add_argument("--api-key", default=os.environ.get("SOFTSERVE_API_KEY"))

    from server.tuning.cli import add_tune_parser

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
    if args.command == "tune":
        from server.tuning.cli import cmd_tune

        return cmd_tune(args)
    return cmd_prompts(args)


if __name__ == "__main__":
    raise SystemExit(main())
