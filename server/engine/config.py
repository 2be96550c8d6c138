"""Engine internals' configuration: small frozen dataclasses (the service's env/CLI live in server/config.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # rows decoding together
    max_queue: int = 256  # waiting requests beyond this are refused (429)
    max_prefill_tokens: int = 4096  # prompt/virtual tokens computed per step; longer prompts are chunked
    max_model_len: int = 2048  # virtual + prompt + generated tokens per request
    max_queue_per_tenant: int = 0  # 0: only the global limit applies
    request_timeout_s: float = 0.0  # 0: no timeout; else a request older than this is failed
    # Fair share between tenants (S-LoRA's virtual token counter): cost of a prompt / generated token.
    input_token_cost: float = 1.0
    output_token_cost: float = 2.0
    kv_cache_tokens: int = 0  # token slots in the KV pool (the engine sets it); 0: unbounded (scheduler tests)


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = SchedulerConfig()
    kv_prefix_cache_bytes: int = 256 * 1024 * 1024  # soft-prompt KV prefixes kept on the device
    kv_cache_bytes: int = 0  # the running rows' KV pool; 0: derived from free memory (see kv_cache.py)
    model_id: str = "model"  # part of every prefix-cache key: a KV prefix is only valid for one model
