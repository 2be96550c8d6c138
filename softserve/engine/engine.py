"""The engine: one step is exactly schedule() -> run() -> postprocess().

Synchronous and single-threaded; `AsyncEngine` (async_engine.py) runs it in its own thread.
A request's state lives on its `Request`; it finishes only through `Scheduler.finish`, and leaves
the engine in `final_output` (its last delta, its on_finish callback), whatever ended it.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from softserve.engine.compiled_forward import use_compile
from softserve.engine.compute_threads import run_in_compute_thread
from softserve.engine import native_kernels
from softserve.engine.fused_linear import fuse_linears
from softserve.engine.packed_linear import pack_linears
from softserve.engine.config import EngineConfig
from softserve.engine.detokenizer import Detokenizer
from softserve.engine.guided import attach_guided_state
from softserve.engine.kv_cache import KVPool, PrefixKVCache, default_kv_cache_bytes, kv_shape
from softserve.engine.kv_tier import PrefixKVTier, TierStats, engine_fingerprint, model_fingerprint
from softserve.engine.model_runner import ModelRunner
from softserve.engine.outputs import RequestOutput, RowLogprobs, RunnerOutput, TokenLogprob
from softserve.engine.request import ErrorKind, FinishReason, Request
from softserve.engine.scheduler import Scheduler, SchedulerOutput

log = logging.getLogger("softserve.engine")


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def kv_cache_tokens(model, config: EngineConfig) -> int:
    """Token slots of the KV pool: `kv_cache_bytes`, or a default derived from free memory."""
    param = next(model.parameters())
    per_token = KVPool.bytes_per_token(*kv_shape(model), param.dtype)
    sched = config.scheduler
    budget = config.kv_cache_bytes or default_kv_cache_bytes(param.device, per_token, sched.max_batch_size, sched.max_model_len)
    return budget // per_token


def _is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


@dataclasses.dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics, read without the step lock (each number is current, not all from one step)."""

    num_waiting: int
    num_running: int
    steps_run: int  # steps that ran the model
    forward_passes: int  # model calls: equal to steps_run (one forward per step)
    kv_pool_tokens: int
    kv_pool_used_tokens: int
    prefix_cache_hits: int
    prefix_cache_misses: int
    prefix_cache_evictions: int
    prefix_cache_bytes: int
    kv_tier: TierStats | None = None  # the disk tier under the prefix cache (kv_tier.py); None: off


class LLMEngine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig()) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.prefix_cache = PrefixKVCache(config.kv_prefix_cache_bytes)
        # before packing and fusing replace the linear modules: the checkpoint's own parameters
        model_digest = model_fingerprint(model) if config.kv_tier_dir else None
        sched_config = config.scheduler
        kv_tokens = kv_cache_tokens(model, config)
        if kv_tokens < sched_config.max_model_len:
            raise ValueError(
                f"the KV pool holds {kv_tokens} tokens, less than one request of max_model_len "
                f"{sched_config.max_model_len}: raise kv_cache_bytes or lower max_model_len"
            )
        self.runner = ModelRunner(
            model,
            model_id=config.model_id,
            eos_token_ids=self.eos_token_ids,
            prefix_cache=self.prefix_cache,
            kv_cache_tokens=kv_tokens,
        )
        self.runner.native_kernels = config.native_kernels and native_kernels.available(self.runner.device)
        if config.native_kernels:
            native_kernels.install_rms_norms(model)  # bf16/fp16 on CPU only; fp32 keeps the modules' own code
        if config.pack_linears:
            # bf16 on CPU only; a no-op otherwise. Before compiling: the graph calls the packed op
            pack_linears(model, small_kernel=config.native_kernels)
            fuse_linears(model)  # q/k/v and gate/up as one packed product each (fused_linear.py)
        if use_compile(config.compile, next(model.parameters()).dtype, self.runner.device):
            self._compile_forward(config.compile)
        if model_digest is not None:
            runner = self.runner
            fingerprint = engine_fingerprint(model_digest, dtype=runner.dtype, device_type=runner.device.type,
                                             compiled=runner.compiled_forward is not None,
                                             native_kernels=runner.native_kernels, pack_linears=config.pack_linears,
                                             kernels_digest=native_kernels.build_digest() if runner.native_kernels else "")
            runner.kv_tier = PrefixKVTier(config.kv_tier_dir, fingerprint, config.kv_tier_bytes)
            stats = runner.kv_tier.stats()
            log.info("prompt-KV tier %s: %d prompts, %.1f MiB of %.1f MiB", runner.kv_tier.directory,
                     stats.files, stats.bytes / 2**20, config.kv_tier_bytes / 2**20)
        if config.cuda_graphs and self.runner.device.type == "cuda":
            self.runner.use_step_graphs(max_kv=sched_config.max_model_len)
            if config.capture_graphs_at_start and self.runner.compiled_forward is None:  # compiled: never replayed
                self._capture_graphs()
        self.scheduler = Scheduler(
            dataclasses.replace(sched_config, kv_cache_tokens=kv_tokens), self.eos_token_ids, self.runner.lookup_prefix
        )
        self.steps_run = 0  # steps that ran a forward (the scheduler also counts empty ones)
        self.last_step_rows = 0  # rows in the last step's forward (the rows-per-step metric)
        self.detokenizer = Detokenizer(tokenizer)
        self.on_out_of_memory = None  # set by the service: trim other device caches after an OOM

    def _capture_graphs(self) -> None:
        """The step graphs of short sequences, captured now rather than by the first requests (cuda_graphs.py)."""
        graphs = self.runner.step_graphs
        assert graphs is not None
        started = time.perf_counter()
        done = graphs.warm_up()
        log.info("captured %d CUDA graphs in %.1f s%s", done, time.perf_counter() - started,
                 f" ({len(graphs.failed)} failed, the last with {graphs.capture_error}: their steps run without a graph)"
                 if graphs.capture_error else "")

    def _compile_forward(self, setting: str) -> None:
        """Trace and compile the forward now, not on the first requests. Under `auto` a failure (a broken
        toolchain, an op inductor cannot lower) costs the speed-up, not the server: eager modules serve."""
        started = time.perf_counter()
        log.info("compiling the model forward (--compile %s): ~80 s on a small CPU the first time, less "
                 "once inductor's cache holds the kernels", setting)
        try:
            self.runner.use_compiled_forward(True, max_positions=self.config.scheduler.max_model_len)
            # Traced in a thread with the engine thread's OpenMP count: dynamo guards the graph on
            # torch.get_num_threads(), and a graph traced here (1 thread) made the first step trace again.
            run_in_compute_thread(self.runner.warm_up, name="softserve-compile")
        except Exception as error:
            if setting == "on":
                raise
            self.runner.use_compiled_forward(False)
            log.warning("compiling the model forward failed (%s: %s); serving the eager modules",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
            return
        log.info("model forward compiled in %.0f s", time.perf_counter() - started)

    # ---- intake -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        limit = self.config.scheduler.max_model_len
        needed = request.num_virtual_tokens + len(request.prompt_ids) + request.sampling.max_tokens
        if needed > limit:  # the API checks this first; this guards direct engine users
            raise ValueError(f"request needs {needed} tokens, max_model_len is {limit}")
        if not request.prompt_ids:
            raise ValueError("prompt must contain at least one token")
        if request.soft_prompt is not None:
            self._check_prompt_shape(request.soft_prompt)
        attach_guided_state(request, self.tokenizer, self.eos_token_ids)  # ValueError if the grammar is bad
        request.detok = self.detokenizer.new_state(
            request.prompt_ids, request.sampling.stop, request.sampling.skip_special_tokens
        )
        self.scheduler.add(request)

    def reject(self, request: Request, error: str, error_kind: ErrorKind) -> None:
        """A request `add_request` refused: it finishes like any other (its last delta comes from the next step)."""
        self.scheduler.finish(request, FinishReason.ERROR, error=error, error_kind=error_kind)

    def _check_prompt_shape(self, prompt) -> None:
        """The store validates shapes at upload; this keeps one wrong tensor from failing a whole batch."""
        runner = self.runner
        width = prompt.embeddings.shape[-1]
        if prompt.is_prefix:
            expected = runner.num_layers * 2 * runner.num_kv_heads * runner.head_dim
        else:
            expected = runner.embed.embedding_dim
        if prompt.embeddings.ndim != 2 or width != expected or prompt.embeddings.shape[0] != prompt.ref.num_virtual_tokens:
            raise ValueError(f"soft prompt {prompt.ref.name!r} has shape {tuple(prompt.embeddings.shape)}, "
                             f"expected [{prompt.ref.num_virtual_tokens}, {expected}] for this model")

    def abort_request(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def model(self):
        return self.runner.model

    def stats(self) -> EngineStats:
        kv, prefix = self.scheduler.kv, self.prefix_cache
        return EngineStats(
            num_waiting=self.num_waiting, num_running=self.num_running, steps_run=self.steps_run,
            forward_passes=self.runner.forward_passes, kv_pool_tokens=kv.capacity, kv_pool_used_tokens=kv.used_tokens,
            prefix_cache_hits=prefix.hits, prefix_cache_misses=prefix.misses, prefix_cache_evictions=prefix.evictions,
            prefix_cache_bytes=prefix.bytes,
            kv_tier=self.runner.kv_tier.stats() if self.runner.kv_tier is not None else None,
        )

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ---- step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward (if anything is scheduled), then the deltas: one per request that got a token,
        and the last one of every request that finished, by any path, since the previous step."""
        sched = self.scheduler.schedule()
        self.last_step_rows = len(sched.rows)  # rows in this step's forward: paused rows are not in it
        outputs = self._run(sched) if not sched.is_empty else []
        reported = {out.request_id for out in outputs if out.finished}
        outputs.extend(self.final_output(r) for r in self.scheduler.take_finished() if r.request_id not in reported)
        return outputs

    def _run(self, sched: SchedulerOutput) -> list[RequestOutput]:
        self.steps_run += 1
        try:
            result = self.runner.run(sched)
        except Exception as exc:  # one bad step must not kill the loop: fail its rows, keep serving
            log.exception("engine step failed")  # nothing to undo in the runner: rows own only pool slots
            if _is_out_of_memory(exc):
                self.runner.trim_memory()
                if self.on_out_of_memory is not None:
                    self.on_out_of_memory()
            # Mid-prefill rows too: their KV is incomplete. Their last deltas come from take_finished.
            self.scheduler.fail([row.request for row in sched.rows], f"engine error: {type(exc).__name__}")
            return []
        return self.postprocess(sched, result)

    def postprocess(self, sched: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        outputs = []
        for row, request in self.scheduler.update(sched, result):
            try:
                outputs.append(self._request_delta(request, result, row))
            except Exception as exc:  # a bad corner case in one request fails only that request
                log.exception("postprocess failed for %s", request.request_id)
                self.scheduler.finish(request, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}",
                                      error_kind=ErrorKind.ENGINE_ERROR)
        return outputs

    def _request_delta(self, request: Request, result: RunnerOutput, row: int) -> RequestOutput:
        prompt_logprobs = self._prompt_logprobs(request)
        if not request.output_ids:  # max_tokens == 0: scored, nothing generated
            return self.final_output(request, "", prompt_logprobs=prompt_logprobs)
        state = request.detok
        token_id = request.output_ids[-1]
        text, hit_stop = self.detokenizer.step(state, token_id, is_last=request.is_finished)
        if hit_stop:
            self.scheduler.finish(request, FinishReason.STOP)
        logprobs = ()
        row_logprobs = result.logprobs[row] if result.logprobs else None
        if row_logprobs is not None:
            logprobs = (self._token_logprob(token_id, row_logprobs),)
        if request.is_finished:
            text += self.detokenizer.finish(state)
            return self.final_output(request, text, (token_id,), logprobs, prompt_logprobs)
        return RequestOutput(
            request_id=request.request_id,
            text=text,
            token_ids=(token_id,),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            num_prompt_tokens=request.num_prompt_tokens,
            num_virtual_tokens=request.num_virtual_tokens,
            num_output_tokens=request.num_output_tokens,
        )

    def _token_logprob(self, token_id: int, row: RowLogprobs) -> TokenLogprob:
        decode = self.detokenizer.token_text
        return TokenLogprob(
            token_id=token_id,
            token=decode(token_id),
            logprob=row.chosen,
            top=tuple((tid, decode(tid), lp) for tid, lp in row.top),
        )

    def _prompt_logprobs(self, request: Request) -> tuple[TokenLogprob | None, ...] | None:
        """The prefill's prompt logprobs with token text, once (for the request's first delta)."""
        entries, request.prompt_logprobs = request.prompt_logprobs, None
        if entries is None:
            return None
        decode = self.detokenizer.token_text
        return tuple(None if e is None else TokenLogprob(e[0], decode(e[0]), e[1], tuple((t, decode(t), lp) for t, lp in e[2]))
                     for e in entries)

    def final_output(self, request: Request, text: str = "", token_ids=(), logprobs=(), prompt_logprobs=None) -> RequestOutput:
        """The last delta of a finished request; drops its engine state and runs its on_finish."""
        request.release_state()
        if request.on_finish is not None:
            callback, request.on_finish = request.on_finish, None
            try:
                callback(request)
            except Exception:
                log.exception("on_finish callback failed for %s", request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            text=text,
            token_ids=tuple(token_ids),
            logprobs=tuple(logprobs),
            prompt_logprobs=prompt_logprobs,
            finished=True,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_virtual_tokens=request.num_virtual_tokens,
            num_output_tokens=request.num_output_tokens,
            error=request.error,
            error_kind=request.error_kind,
        )

    def generate_sync(self, requests: list[Request]) -> dict[str, list[RequestOutput]]:
        """Run the given requests to completion (tests, benchmarks, offline use)."""
        for request in requests:
            self.add_request(request)
        collected: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        while self.has_unfinished():
            for out in self.step():
                collected.setdefault(out.request_id, []).append(out)
        return collected
