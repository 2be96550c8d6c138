"""Engine internals' configuration: small frozen dataclasses. Defaults of the knobs the service also
has come from `Settings` (softserve/config.py), so each is written once."""

from __future__ import annotations

from dataclasses import dataclass, field

from softserve.config import setting_default as _default


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = _default("max_batch_size")  # rows decoding together
    max_queue: int = _default("max_queue")  # waiting requests beyond this are refused (429)
    max_prefill_tokens: int = _default("max_prefill_tokens")  # prompt/virtual tokens per step; longer prompts are chunked
    max_model_len: int = _default("max_model_len")  # virtual + prompt + generated tokens per request
    # Off in a bare engine (tests, benchmarks); the service passes its --max-queue-per-tenant / --request-timeout.
    max_queue_per_tenant: int = 0  # 0: only the global limit applies
    request_timeout_s: float = 0.0  # 0: no timeout; else a request older than this is failed
    # Fair share between tenants (S-LoRA's virtual token counter): cost of a prompt / generated token.
    input_token_cost: float = 1.0
    output_token_cost: float = 2.0
    # Batch API rows while interactive work is present (see scheduler.py, "Background rows").
    max_background_tokens: int = _default("max_background_tokens")  # their prompt tokens per step, all together
    max_background_step_tokens: int = _default("max_background_step_tokens")  # tokens in a step of batch rows only
    background_grace_s: float = _default("background_grace_seconds")  # interactive work counts as present this long after it left
    background_hold_s: float = _default("background_hold_seconds")  # no batch-only step this long after interactive work left
    kv_cache_tokens: int = 0  # token slots in the KV pool (the engine sets it); 0: unbounded (scheduler tests)


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_prefix_cache_bytes: int = _default("kv_prefix_cache_bytes")  # soft-prompt KV prefixes kept on the device
    # The disk tier of soft-prompt KV prefixes under that cache (kv_tier.py); None: off.
    kv_tier_dir: str | None = _default("kv_tier_dir")
    kv_tier_bytes: int = _default("kv_tier_bytes")
    kv_cache_bytes: int = _default("kv_cache_bytes")  # the running rows' KV pool; 0: derived from free memory (see kv_cache.py)
    # off | auto | on: the compiled forward (compiled_forward.py). Off for direct engine users (tests, benches,
    # tuning tools): a compile costs each process ~10-40 s. The server passes its own setting (auto).
    compile: str = "off"
    # CPU attention, KV writes, bf16 RMSNorm and (bf16, AVX512-BF16 without AMX) small-row linears by our C++ kernels (native_kernels.py)
    native_kernels: bool = _default("native_kernels")
    pack_linears: bool = _default("pack_linears")  # bf16 CPU linears on weights packed once (packed_linear.py)
    # Steps replayed as CUDA graphs on a GPU (cuda_graphs.py); no effect on CPU.
    cuda_graphs: bool = True
    capture_graphs_at_start: bool = True  # the short sequences' graphs at engine start (cuda_graphs.py), else on first use
    model_id: str = "model"  # part of every prefix-cache key: a KV prefix is only valid for one model
