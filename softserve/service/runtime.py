"""The running product, built once at start-up: the model, the prompt store and its device cache, the
engine thread, the limits and the tuning jobs. HTTP is one way in (softserve/api); nothing here knows it."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

import torch

from softserve.store.backends import open_backend
from softserve.store.cache import PromptCache
from softserve.store.gc import PeriodicGC
from softserve.store.store import PromptStore
from softserve.store.types import ModelInfo
from softserve.config import Settings
from softserve.engine import compute_threads
from softserve.engine.async_engine import AsyncEngine
from softserve.engine.config import EngineConfig, SchedulerConfig
from softserve.engine.engine import LLMEngine
from softserve.engine.grammar_limits import GrammarLimits
from softserve.engine.grammar_sandbox import GrammarSandbox, TokenizerSpec
from softserve.engine.guided import GrammarCompiler
from softserve.model_loader import load_model, resolve_device, resolve_dtype, resolve_source
from softserve.service.auth import ApiKeyRegistry
from softserve.service.errors import not_ready
from softserve.service.kv_warmer import PromptKVWarmer
from softserve.service.slots import TenantSlots
from softserve.service.releases import CompletionLedger

log = logging.getLogger("softserve")


@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    name: str


@dataclass
class Runtime:
    settings: Settings
    registry: ApiKeyRegistry
    served_model_name: str = ""
    engine: AsyncEngine | None = None
    tokenizer: object = None
    store: PromptStore | None = None
    cache: PromptCache | None = None
    load_error: str | None = None
    shutting_down: bool = False
    loaded: threading.Event = field(default_factory=threading.Event)
    metrics: object = None
    rate_limiter: object = None  # RateLimiter (softserve.service.ratelimit)
    tuning: object = None  # TuningService (softserve.service.tuning)
    max_model_len: int = 0  # --max-model-len, capped at the model's position limit
    exit_on_engine_death: bool = False  # the CLI sets it; in-process tests keep their interpreter
    store_gc: PeriodicGC | None = None  # --store-gc-interval-seconds
    grammars: GrammarCompiler | None = None  # structured output: compiles client grammars safely, off the engine
    compile_slots: TenantSlots | None = None  # grammar compiles in progress or waiting, per tenant and in total
    completions: CompletionLedger = field(default_factory=CompletionLedger)  # completion id -> served versions (feedback)
    kv_warmer: PromptKVWarmer | None = None  # uploads' prompt KV computed ahead (--kv-tier-dir, --kv-tier-warm-on-upload)

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and self.engine.is_alive and not self.shutting_down

    def not_ready_reason(self) -> str:
        if self.load_error:
            return f"model failed to load: {self.load_error}"
        if self.engine is not None and not self.engine.is_alive:
            return self._engine_down_reason()
        return "shutting down" if self.shutting_down else "loading"

    def _engine_down_reason(self) -> str:
        """A started engine that is not alive died (or was stopped): never call that "loading"."""
        dead = self.engine.dead_reason
        return f"engine died: {dead}" if dead else "engine loop is not running"

    def require_ready(self) -> None:
        if not self.is_ready:
            if self.load_error:
                raise not_ready("model failed to load")
            if self.shutting_down:
                raise not_ready("server is shutting down")
            if self.engine is not None and not self.engine.is_alive:
                raise not_ready(self._engine_down_reason())
            raise not_ready("model is loading, not ready yet")

    def require_store(self):
        """The prompt store, which opens with the model: not ready until then."""
        if self.store is None:
            raise not_ready()
        return self.store

    def build(self, loaded: LoadedModel | None = None) -> None:
        """Load the model (unless given), open the store, start the engine thread."""
        s = self.settings
        try:
            if s.torch_threads and not compute_threads.configured():  # else the engine thread takes them
                torch.set_num_threads(s.torch_threads)
            if loaded is None:
                source = resolve_source(s.model, s.gguf_file)
                device = resolve_device(s.device)
                model, tokenizer = load_model(source, device, resolve_dtype(s.dtype, device))
                loaded = LoadedModel(model, tokenizer, source.name)
            model, tokenizer = loaded.model, loaded.tokenizer
            self.served_model_name = s.served_model_name or loaded.name
            param = next(model.parameters())
            text_config = model.config.get_text_config()
            positions = getattr(text_config, "max_position_embeddings", None) or s.max_model_len
            self.max_model_len = min(s.max_model_len, positions)
            if self.max_model_len < s.max_model_len:
                log.warning("--max-model-len %d exceeds the model's %d positions; using %d",
                            s.max_model_len, positions, self.max_model_len)
            info = ModelInfo(
                name=self.served_model_name,
                hidden_size=text_config.hidden_size,
                num_layers=text_config.num_hidden_layers,
                num_attention_heads=text_config.num_attention_heads,
                num_key_value_heads=getattr(text_config, "num_key_value_heads", None),
                head_dim=getattr(text_config, "head_dim", None),
            )
            backend = open_backend(s.store, s3_endpoint_url=s.s3_endpoint_url)  # a directory or s3://bucket/prefix
            log.info("prompt store %s (%s)", s.store, type(backend).__name__)
            cleanup = getattr(backend, "remove_stale_temp_files", None)
            if callable(cleanup):  # leftovers of writers killed mid-write (kill -9); never a live writer's
                removed = cleanup()
                if removed:
                    log.info("removed %d stale temp files from the prompt store", removed)
            self.store = PromptStore(
                backend, info,
                max_virtual_tokens=s.max_virtual_tokens, max_upload_bytes=s.max_upload_bytes,
                revalidate_seconds=s.store_revalidate_seconds, max_prompt_parts=s.max_prompt_parts,
                max_prompts_per_tenant=s.max_prompts_per_tenant, max_store_bytes_per_tenant=s.max_store_bytes_per_tenant,
            )
            if s.store_gc_interval_seconds > 0:
                self.store_gc = PeriodicGC(backend, s.store_gc_interval_seconds, s.store_gc_grace_seconds,
                                           on_report=getattr(self.metrics, "count_store_gc", None)).start()
            self.cache = PromptCache(self.store, device=param.device, dtype=param.dtype, budget_bytes=s.prompt_cache_bytes)
            config = EngineConfig(
                scheduler=SchedulerConfig(
                    max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                    max_prefill_tokens=s.max_prefill_tokens, max_model_len=self.max_model_len,
                    max_queue_per_tenant=s.max_queue_per_tenant, request_timeout_s=s.request_timeout,
                    max_background_tokens=s.max_background_tokens, background_grace_s=s.background_grace_seconds,
                    max_background_step_tokens=s.max_background_step_tokens, background_hold_s=s.background_hold_seconds,
                ),
                kv_prefix_cache_bytes=s.kv_prefix_cache_bytes,
                kv_cache_bytes=s.kv_cache_bytes,
                kv_tier_dir=s.kv_tier_dir,
                kv_tier_bytes=s.kv_tier_bytes,
                model_id=f"{self.served_model_name}:{param.dtype}",
                compile=s.compile,
                pack_linears=s.pack_linears,
                native_kernels=s.native_kernels,
            )
            self.tokenizer = tokenizer
            self.grammars = self._grammar_compiler(tokenizer)
            engine = LLMEngine(model, tokenizer, config)
            engine.on_out_of_memory = self._trim_prompt_cache
            self.engine = AsyncEngine(engine, on_step=self._on_step, on_death=self._on_engine_death)
            self.engine.start()
            tier = engine.runner.kv_tier
            if tier is not None and s.kv_tier_warm_on_upload:
                token_id = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), 0)
                self.kv_warmer = PromptKVWarmer(self.engine, self.store, device=param.device, dtype=param.dtype,
                                                token_id=token_id, has_kv=tier.__contains__)
            log.info("model %s loaded on %s (%s)", self.served_model_name, param.device, param.dtype)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("start-up failed")
        finally:
            self.loaded.set()

    def forget_prompt_kv(self, metas) -> None:
        """Deleted prompts' KV out of the engine's caches and off its disk tier. Content-addressed: another
        name or tenant with the same tensor computes it again at its next use."""
        if self.engine is not None:
            for meta in metas:
                self.engine.engine.runner.forget_prefix(meta.sha256)

    def stage_prompt_kv(self, meta) -> None:
        """A prompt's KV from the disk tier into the device cache, in the calling (request) thread, so the
        engine step never reads the disk for it (ModelRunner.stage_prefix). Best effort: never raises."""
        engine = self.engine
        if engine is None or meta.kind != "prompt_tuning" or engine.engine.runner.kv_tier is None:
            return
        try:
            engine.engine.runner.stage_prefix(meta.sha256, meta.num_virtual_tokens)
        except Exception:  # noqa: BLE001 - the engine reads (or computes) it at admission instead
            log.exception("staging the KV of %s failed", meta.ref)

    def _grammar_compiler(self, tokenizer) -> GrammarCompiler:
        s = self.settings
        limits = GrammarLimits(max_bytes=s.guided_max_bytes, max_depth=s.guided_max_depth,
                               max_definitions=s.guided_max_definitions, max_rules=s.guided_max_rules)
        self.compile_slots = TenantSlots(max(s.max_queue, s.guided_compile_workers), s.guided_compiles_per_tenant,
                                         noun="grammar compiles", total_flag="--max-queue",
                                         tenant_flag="--guided-compiles-per-tenant", code="too_many_compiles")
        if not s.guided_sandbox:
            return GrammarCompiler(tokenizer, limits)
        try:
            tokenizer_spec = TokenizerSpec.of(tokenizer)
        except AttributeError:  # not a fast tokenizer: llguidance cannot use it either
            log.warning("the tokenizer has no tokenizers backend; structured output is compiled in-process")
            return GrammarCompiler(tokenizer, limits)
        sandbox = GrammarSandbox(tokenizer_spec, workers=s.guided_compile_workers, timeout_s=s.guided_compile_timeout)
        return GrammarCompiler(tokenizer, limits, sandbox)

    def _on_step(self, seconds: float, batch_size: int) -> None:
        if self.metrics is not None:
            self.metrics.step_time.observe(seconds)
            self.metrics.batch_size.observe(batch_size)

    def _trim_prompt_cache(self) -> None:
        trim = getattr(self.cache, "trim", None)
        if callable(trim):
            trim()

    def _on_engine_death(self, reason: str) -> None:
        """Never a zombie that accepts requests and never answers: report not-ready, then exit non-zero."""
        log.critical("engine loop died (%s); exiting so the orchestrator restarts us", reason)
        if self.exit_on_engine_death:
            threading.Timer(1.0, os._exit, args=(70,)).start()

    def close(self) -> None:
        if self.kv_warmer is not None:
            self.kv_warmer.close()
        if self.grammars is not None:
            self.grammars.close()
        if self.store_gc is not None:
            self.store_gc.stop()
        if self.engine is not None:
            self.engine.stop()
            tier = self.engine.engine.runner.kv_tier
            if tier is not None:
                tier.close()  # the queued writes reach the disk
