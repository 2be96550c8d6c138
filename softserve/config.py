"""Configuration: the one place that reads environment variables (SOFTSERVE_*). `Settings` is the
server's (every field is also a `softserve serve` flag: `add_settings_flags` below); `ClientSettings`
the client side's."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SOFTSERVE_", extra="ignore")

    model: str | None = Field(None, description="HF model directory or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    gguf_file: str | None = Field(None, description="GGUF file name inside --model DIR")
    served_model_name: str | None = Field(None, description="name of the base model in the API (default: the model's name)")
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=0, le=65535, description="listen port")
    store: str = Field("./data/prompts", description="prompt store: a directory, or s3://bucket/prefix")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint for s3:// stores (SeaweedFS, MinIO, ...); credentials and region from AWS_* env")
    store_revalidate_seconds: float = Field(1.0, ge=0, le=60, description="seconds a name -> version resolution is cached before the store is re-read (replicas see each other's changes within this)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs (auto: cuda when available)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="model dtype (auto: bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, else float32)")
    compile: Literal["off", "auto", "on"] = Field("auto", description="compile the model forward with torch.compile and inductor "
                                                  "(one graph, attention as a custom op; traced at start-up: ~80 s on a 2-core CPU the first "
                                                  "time, ~10 s once inductor's cache holds the kernels). auto: bfloat16 and float16 models on "
                                                  "CPU with a C++ compiler, falling back to eager if compiling fails (float32 stays eager, "
                                                  "exactly equal to PEFT; CUDA stays eager, never run here); on: always, and a failure stops "
                                                  "the start; off: eager modules")
    native_kernels: bool = Field(True, description="on CPU, our C++ kernels: attention for decode rows and prefill rows of up to 256 positions in one call per layer, reading each row's KV from the pool in place, and (bf16/fp16 models) the Llama family's RMSNorm in one pass, and (bf16 on CPUs with AVX512-BF16 and no AMX, with --pack-linears) linear products of up to 256 rows on a weight packed for our kernel (one more copy of the linear weights); built at the first start on a machine (~20-60 s, cached by torch; needs a C++ compiler and ninja, else the SDPA path and the modules' own norms are used)")
    pack_linears: bool = Field(True, description="on CPU in bfloat16, pack every linear weight once for oneDNN instead of on every call, used for products of every size on CPUs with AVX512-BF16 and no AMX and of up to 256 rows elsewhere (the outputs of F.linear, bitwise except at a few row counts, see performance.md; one more copy of the linear weights in memory; small products may run our kernel instead, see native_kernels); q/k/v and gate/up then run as one product each (the same oneDNN kernels over a wider weight: not held bitwise to the separate products; bf16 is not held token-exact, fp32 packs and fuses nothing)")
    max_batch_size: int = Field(32, ge=1, le=1024, description="rows decoding together")
    max_model_len: int = Field(2048, ge=16, description="virtual + prompt + generated tokens per request (capped at the model's positions)")
    max_queue: int = Field(256, ge=1, description="waiting requests, all tenants together, before 429")
    max_prefill_tokens: int = Field(4096, ge=16, description="prompt and soft-prompt tokens computed per engine step; longer prompts are split over steps (chunked prefill)")
    max_virtual_tokens: int = Field(256, ge=1, description="most virtual tokens of one prompt, or of all parts of a composed prompt (model a+b) together")
    max_prompt_parts: int = Field(4, ge=1, le=64, description="most prompts one composed model (a+b+c) may name")
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest upload (prompt or training file)")
    prompt_cache_bytes: int = Field(512 * 1024 * 1024, ge=0, description="device cache of soft-prompt tensors")
    kv_prefix_cache_bytes: int = Field(512 * 1024 * 1024, ge=0, description="device cache of soft-prompt KV prefixes")
    kv_tier_dir: str | None = Field(None, description="local directory of the soft-prompt KV tier: every prompt's KV prefix, computed once (at upload or at first use) and read back from disk when the device cache of prompt KV misses, so a large prompt library does not pay its virtual tokens' prefill again; kept across restarts, keyed by the prompt's content hash and a fingerprint of the model, dtype and kernels (unset = off)")
    kv_tier_bytes: int = Field(4 * 1024**3, ge=0, description="disk bytes of the prompt-KV tier (least recently used prompts removed beyond; ~0.4 MB a k=16 prompt of SmolLM2 in bfloat16)")
    kv_tier_warm_on_upload: bool = Field(True, description="with --kv-tier-dir: compute an uploaded prompt's KV in spare engine capacity (as a Batch API row would) so that its first request reads it from the tier")
    kv_cache_bytes: int = Field(0, ge=0, description="KV pool of the running requests, preallocated (0 = every row at full length, capped at 30 percent of free RAM on CPU, 50 percent of free GPU memory); when full, new requests wait")
    api_keys: str | None = Field(None, description="YAML/JSON file of hashed API keys; unset = no auth, one 'default' tenant")
    max_n: int = Field(16, ge=1, description="largest `n` a request may ask for")
    max_choices_per_request: int = Field(128, ge=1, description="largest len(prompt) x n of one request: the sequences it may start (400 beyond)")
    max_request_tokens: int = Field(131072, ge=1, description="largest prompt tokens x n of one request, summed over its prompts (400 beyond)")
    max_tokens_limit: int = Field(4096, ge=1, description="cap on a request's max_tokens")
    max_queue_per_tenant: int = Field(128, ge=0, description="waiting requests per tenant before 429 (0 = only --max-queue)")
    max_tuning_queue: int = Field(16, ge=1, description="tuning jobs waiting to run, all tenants together (429 beyond)")
    tuning_pack_jobs: int = Field(1, ge=1, le=64, description="tuning jobs one replica trains at once, any tenants, sharing one packed forward/backward per step (each keeps its own prompt, optimizer, data order and checkpoints)")
    max_tuning_jobs_per_tenant: int = Field(2, ge=1, description="tuning jobs one tenant may have queued or running (429 beyond)")
    request_timeout: float = Field(600.0, ge=0, description="seconds before a request is failed (0 = never)")
    shutdown_timeout: float = Field(30.0, ge=0, description="seconds SIGTERM waits for in-flight requests")
    rate_limit_rps: float = Field(0.0, ge=0, description="requests per second per tenant, burst of one second's worth (0 = off; 429 beyond)")
    rate_limit_tokens_per_minute: int = Field(0, ge=0, description="prompt + max_tokens per minute per tenant (0 = off; 429 beyond)")
    max_concurrent_uploads: int = Field(16, ge=1, description="uploads (prompts, files) received at once, all tenants together (429 beyond)")
    max_concurrent_uploads_per_tenant: int = Field(4, ge=1, description="uploads one tenant may have in progress at once (429 beyond)")
    guided_max_bytes: int = Field(64 * 1024, ge=256, description="largest structured-output constraint (JSON schema, regex, Lark grammar, guided_choice list as JSON) in bytes (400 invalid_grammar beyond)")
    guided_max_depth: int = Field(128, ge=4, description="deepest nesting of JSON objects and arrays in a json_schema, counted through $refs (400 invalid_grammar beyond)")
    guided_max_definitions: int = Field(256, ge=1, description="most $defs/definitions entries of a json_schema (400 invalid_grammar beyond)")
    guided_max_rules: int = Field(1000, ge=1, description="most rules and terminals of a Lark guided_grammar (400 invalid_grammar beyond)")
    guided_sandbox: bool = Field(True, description="compile each new grammar first in a sandbox process, so a grammar that crashes the grammar library (stack overflow) costs that process, not the server; off: compiled in the server process only, behind the static limits (for embedding and tests)")
    guided_compile_timeout: float = Field(10.0, gt=0, description="seconds a new grammar may take to compile in the sandbox process (400 invalid_grammar beyond)")
    guided_compile_workers: int = Field(1, ge=1, le=64, description="sandbox processes that compile new grammars, i.e. grammar compiles running at once (more wait; 429 too_many_compiles when --max-queue are waiting)")
    guided_compiles_per_tenant: int = Field(2, ge=1, description="new (uncached) grammars one tenant may have compiling or waiting to compile at once (429 too_many_compiles beyond)")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="largest JSON request body")
    max_connections: int = Field(1024, ge=1, description="open client connections (idle keep-alive ones included) "
                                 "before new ones are answered 503 at once; bounds what many slow or idle clients can hold")
    header_timeout: float = Field(10.0, gt=0, le=3600, description="seconds a client has to send a complete request head, from connecting or from the end of the previous response on a keep-alive connection; then the connection is closed without a response (idle or trickling sockets cannot hold --max-connections)")
    max_header_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024, description="largest request head (request line and headers); a longer one is answered 431 and its connection closed")
    http_parser: Literal["auto", "httptools", "h11"] = Field("auto", description="HTTP/1.1 implementation of the API server (auto: httptools, a C parser, where installed, as it is by `pip install softserve`; h11 is pure Python and costs more CPU per streamed token)")
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field("auto", description="event loop of the API server (auto: uvloop where installed, as it is by `pip install softserve` on Linux and macOS; else asyncio's own)")
    keep_alive_timeout: float = Field(5.0, gt=0, le=3600, description="seconds an idle keep-alive connection stays open after a response")
    metrics_port: int = Field(0, ge=0, le=65535, description="also serve /metrics without a key on this port (0 = off)")
    metrics_host: str = Field("127.0.0.1", description="listen address of --metrics-port")
    metrics_tenant_labels: bool = Field(False, description="label request and token counters with the tenant name")
    version_metrics_max_series: int = Field(64, ge=0, le=100_000, description="per-version metrics (requests, tokens, TTFT, latency, errors, feedback by prompt and version): at most this many (tenant, prompt, version) series, only for versions served through an alias; the rest count as prompt=\"other\" (0 = off)")
    torch_threads: int = Field(0, ge=0, description="CPU threads of the engine's forward (and of a running tuning job); every other thread runs torch on one thread, so the process keeps one OpenMP pool (0 = torch's default, the CPU count)")
    json_logs: bool = Field(True, description="structured JSON log lines (false: plain text)")
    log_level: str = Field("info", description="debug, info, warning, error or critical")
    ui: bool = Field(True, description="serve the web console at /ui")
    tuning_lease_seconds: float = Field(30.0, gt=0, description="a tuning job's lease in the store: a replica that stops renewing it (died) loses the job to another replica after this long")
    tuning_replica_id: str | None = Field(None, description="this replica's name in tuning-job leases (default: random per process); unique among live replicas, stable across restarts (e.g. the pod name) lets a restarted replica resume its own jobs at once")
    tuning_scan_seconds: float = Field(5.0, gt=0, description="how often a replica looks in the store for unfinished tuning jobs nobody runs")
    max_prompts_per_tenant: int = Field(10_000, ge=0, description="prompt names one tenant may have, '-ckpt' names of tuning jobs included (0 = unlimited; 429 prompt_quota_exceeded beyond)")
    max_store_bytes_per_tenant: int = Field(1024**3, ge=0, description="bytes one tenant may store: prompt tensors of every live version plus uploaded files (0 = unlimited; 413 storage_quota_exceeded beyond)")
    store_gc_interval_seconds: float = Field(0.0, ge=0, description="run the store's garbage collection every this many seconds on this replica (0 = off; or run `softserve store gc`)")
    store_gc_grace_seconds: float = Field(3600.0, ge=60, description="garbage collection deletes nothing younger than this: longer than any upload takes")
    tuning_job_retention_seconds: float = Field(30 * 86400.0, ge=0, description="a finished tuning job (record, events, data copy) is deleted this long after it finished and disappears from the job list (0 = keep forever); its published prompts stay")
    max_finished_tuning_jobs_per_tenant: int = Field(100, ge=0, description="finished tuning jobs kept per tenant: beyond it the oldest finished ones are deleted (record, events, data copy) as retention deletes them, whatever their age (0 = no cap); their prompts stay")
    max_tuning_examples: int = Field(100_000, ge=1, le=10_000_000, description="most examples in one training or validation file, or inline list (400 invalid_training_data beyond)")
    tuning_validation_workers: int = Field(2, ge=1, le=64, description="threads that validate (tokenize) new tuning jobs' data; tenants take turns and one tenant uses at most one, so a huge file does not hold other tenants' jobs")
    max_batches_per_tenant: int = Field(4, ge=1, description="Batch API batches one tenant may have unfinished (429 beyond)")
    max_batch_requests: int = Field(50_000, ge=1, description="most requests (lines) in one Batch API input file (400 beyond)")
    max_running_batches: int = Field(4, ge=1, description="batches this replica runs at once (others wait, or run on other replicas)")
    batch_window: int = Field(0, ge=0, description="lines of one running batch in the engine at once (0 = 2 x --max-batch-size)")
    batch_retention_seconds: float = Field(30 * 86400.0, ge=0, description="a finished batch (record, output and error files) is deleted this long after it finished and disappears from the batch list (0 = keep forever); its uploaded input file stays")
    max_background_tokens: int = Field(2, ge=0, description="while interactive requests run or wait (or one left less than --background-grace-seconds ago), Batch API rows together get at most this many prompt tokens (prompt chunks and new rows) per engine step (one a row in a step whose interactive rows only decode); their decode tokens ride along in the rows interactive ones leave free; the rest pause, keeping their KV; 0: no batch prompt tokens then")
    max_background_step_tokens: int = Field(256, ge=1, description="tokens in an engine step made only of Batch API rows (no interactive work present), so an interactive request that arrives waits behind a short step")
    background_grace_seconds: float = Field(0.5, ge=0, description="background rows stay capped (--max-background-tokens) this long after the last interactive request left, so a client's next request does not wait for a step full of batch rows")
    background_hold_seconds: float = Field(0.1, ge=0, description="once the last interactive request has left, the engine waits this long before it runs a step of Batch API rows only, so a client's next request, sent as soon as it has its answer, finds the engine free instead of behind a batch step (0: no wait)")
    batch_lease_seconds: float = Field(30.0, gt=0, description="a running batch's lease in the store: a replica that stops renewing it (died) loses the batch to another after this long")
    batch_scan_seconds: float = Field(2.0, gt=0, description="how often a replica looks in the store for unfinished batches nobody runs")
    batch_flush_seconds: float = Field(1.0, gt=0, description="how often a running batch commits its finished lines to the store (at most this much work is redone after a crash)")


class ClientSettings(BaseSettings):
    """What the client side (`softserve prompts`, `eval`, `keys` and `softserve.client`) reads from the
    environment; their flags override it."""

    model_config = SettingsConfigDict(env_prefix="SOFTSERVE_", extra="ignore")

    url: str = Field("http://127.0.0.1:8000", description="base URL of a running server")
    api_key: str | None = Field(None, description="API key sent as a bearer token")
    api_keys: str = Field("api_keys.yaml", description="the key file `softserve keys add` writes (the server's --api-keys)")


def setting_default(name: str):
    """A `Settings` field's default, for the lower layers' own defaults (engine, tuning), so a value is
    written once."""
    return Settings.model_fields[name].default


# ---- the command-line form of Settings (`softserve serve`, and the model flags of `softserve tune`) ----
def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {value!r}")


def _flag_type(name: str, annotation) -> tuple[type, list | None]:
    """(argparse type, choices) of a Settings field: str/int/float/bool, a Literal, or one of them | None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Literal:
        choices = list(typing.get_args(annotation))
        return type(choices[0]), choices
    if annotation in (str, int, float, bool):
        return annotation, None
    raise TypeError(f"Settings.{name}: no command-line type for {annotation!r}")


# `softserve run-batch`'s own defaults, applied unless given (flag or env). Offline nothing interactive
# ever arrives, so the limits that keep interactive latency low only cost throughput there:
# --max-batch-size (32 for `serve`) and the size of a step made of batch rows only
# (--max-background-step-tokens, 256 for `serve`, so that an arriving request waits behind a short
# step). Bigger steps amortise the weight reads over more tokens: a prefill-only step of 1,280 tokens
# runs at 1.7x the tokens/s of one of 160 (bf16, 2 threads), and on a 2,000-line classification file
# 4,096 tokens x 512 rows made 113-130 req/s against 85 with the serve limits (docs/batch.md).
OFFLINE_DEFAULTS = {"max_batch_size": 512, "max_background_step_tokens": 4096}


def _flag_help(name: str, info, default=None) -> str:
    default = info.default if default is None else default
    if default is None:
        default = "unset"
    elif isinstance(default, bool):
        default = str(default).lower()
    text = f"{info.description or name.replace('_', ' ')} (env SOFTSERVE_{name.upper()}, default {default})"
    return text.replace("%", "%%")  # argparse formats help with %


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[Settings] = Settings,
                       only: tuple[str, ...] | None = None, defaults: dict | None = None) -> None:
    """One flag per Settings field (`max_model_len` -> `--max-model-len`), or per field in `only`; an
    unset flag stays None, so Settings falls back to SOFTSERVE_<FIELD> and then its default. `defaults`:
    the defaults this command applies instead (shown in the help; the command applies them itself)."""
    defaults = defaults or {}
    for name, info in settings_cls.model_fields.items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        typ, choices = _flag_type(name, info.annotation)
        if typ is bool:  # --x, --x true|false, --no-x
            parser.add_argument(flag, dest=name, nargs="?", const=True, type=_bool, default=None,
                                metavar="true|false", help=_flag_help(name, info, defaults.get(name)) + f"; --no-{flag[2:]} = false")
            parser.add_argument(f"--no-{flag[2:]}", dest=name, action="store_false", default=None, help=argparse.SUPPRESS)
        else:
            parser.add_argument(flag, dest=name, type=typ, choices=choices, default=None,
                                help=_flag_help(name, info, defaults.get(name)))


def settings_from_args(args: argparse.Namespace, settings_cls: type[Settings] = Settings) -> Settings:
    given = {name: getattr(args, name, None) for name in settings_cls.model_fields}  # a command may take a subset
    return settings_cls(**{name: value for name, value in given.items() if value is not None})
