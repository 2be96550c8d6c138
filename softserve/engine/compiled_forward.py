"""The model forward compiled with inductor (`--compile`): one graph for every layer, attention as a custom op.

Eager HF modules cost one Python call and one kernel per op: RMSNorm alone is ~7 ops (casts, pow,
mean, rsqrt, mul) per norm, 61 norms per SmolLM2 step. Inductor fuses the norms, rotary, residual
adds, SiLU x mul and the casts. Our attention (packed_attention.py: pool writes, gathers, SDPA) stays
eager behind `torch.ops.softserve.packed_attention`, an opaque custom op, so the graph does not break
at every layer and the op sees the step's `PackedBatch` through a thread-local set by the runner (a
custom op takes tensors and scalars only; the batch's plan is plain Python). Should torch ever run
the forward eagerly instead (past its recompile limit), the attention finds the batch the same way.
With our C++ kernels loaded, the graph calls their op `softserve_native::step_attention` instead: a step
they run whole (KV writes and one kernel call per layer), handed over by the runner before the call, is
attended in C++ without entering Python; any other step goes on to the Python op (csrc/step_attention.cpp).

Shapes: the packed token count and the number of kept logits vary; everything else is static. The
two sizes are marked *unbacked* at every call (`mark_unbacked`): torch then never guards on their
values, so ONE graph serves 1 to N tokens and 1 to N logits. Marked merely dynamic, torch still
guarded on them where a shape rule asked "is it 1?" (the rotary table lookup, `2 <= tokens`), and a
one-token step traced a second graph; and `dynamic=True` made every module float (norm epsilons,
attention scales) and every global tensor's size symbolic, guarded one by one. Tracing, not the C++
compile (inductor caches that on disk), is what a restart pays: the one static graph reloads in ~7 s
of tracing where the old two took ~43 s (SmolLM2-135M, docs/performance.md). `warm_up` runs the step
shapes at start-up; tests check that they and every later step reuse the one graph. No graph keeps
zero logits: the compiler would drop every layer, the attention op and its KV writes included (the
op is pure to it), so the runner keeps one.

Guards: before each call dynamo checks that the graph still applies, and for a whole HF model most of
its ~8,700 checks are on the model's modules: every Parameter's tensor properties, every module's
hook dicts, attributes and closures. After a forward that streamed the weights those objects are out
of the CPU's caches, and the check took ~2 ms of a ~16 ms decode step. The engine's model is frozen:
loaded with `requires_grad_(False)`, packed, fused and given its rotary tables before the compile, and
nothing changes a module afterwards (the tuner reads it; `test_serving_and_tuning_leave_the_model_as_compiled`
holds that). So the compile drops the guards whose source is one of the model's modules
(`frozen_model_guards`) and keeps the rest: the inputs' dtype, device and rank, the globals, grad
mode, the thread count. Unlike `skip_guard_eval_unsafe`, a changed input still recompiles.

Rotary tables: HF computes the rotary cos/sin once per forward, but inductor fuses that computation into
every layer's consumer and so recomputes `cos`/`sin` of every position in every layer (~7 ms of a
~250 ms classification wave, 640 prefill tokens). `install_rotary_tables` gives the Llama family's
rotary module a table of its own outputs for every position the engine serves, computed once by the
module itself, and a forward that indexes it: the layers then load what they used to recompute.
"""

from __future__ import annotations

import inspect
import shutil

import torch
from torch._dynamo.decorators import mark_unbacked

from softserve.engine.packed_attention import NATIVE_OP_KWARG, NO_MASK, attend_packed, step_batch

@torch.library.custom_op("softserve::packed_attention", mutates_args=())
def packed_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                        sliding_window: int, scaling: float) -> torch.Tensor:
    """query [1, q_heads, T, d], key/value [1, kv_heads, T, d] -> [1, T, q_heads, d]; writes K/V into the pool."""
    batch = step_batch()
    if batch is None:
        raise RuntimeError("softserve::packed_attention called outside a compiled engine forward")
    return attend_packed(batch, layer_idx, query, key, value, sliding_window or None, scaling)


@packed_attention_op.register_fake
def _(query, key, value, layer_idx, sliding_window, scaling):
    return query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))


def compile_forward(model, max_positions: int | None = None, native_attention: bool = False):
    """fn(embeds [1, T, hidden], positions [1, T], logits_index [n]) -> logits [n, vocab], compiled lazily.
    With `max_positions`, the rotary modules read tables of that many positions (`install_rotary_tables`).
    `native_attention` (our kernels loaded): the graph calls the C++ attention op, which runs the steps the
    runner hands it (`native_step_attention`) and passes the others to the Python op."""
    if max_positions:
        install_rotary_tables(model, max_positions)
    attention_kwargs = {NATIVE_OP_KWARG: True} if native_attention else {}

    def forward(embeds: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
        out = model(inputs_embeds=embeds, position_ids=positions, attention_mask=NO_MASK, use_cache=False,
                    logits_to_keep=logits_index, **attention_kwargs)
        return out.logits[0]

    on_cpu = next(model.parameters()).device.type == "cpu"
    # cpp_wrapper (CPU): the graph's glue between kernels (buffer allocation, ~250 kernel and op calls a
    # step) is C++ instead of a Python function: ~0.5 ms less of a ~13.5 ms decode step (12 process
    # pairs, docs/performance.md). The first compile on a machine takes longer (~80 vs ~40 s, SmolLM2),
    # a restart reads both from inductor's cache. Not tried on CUDA, which keeps the Python wrapper.
    compiled = torch.compile(forward, dynamic=False,
                             options={"guard_filter_fn": frozen_model_guards, "cpp_wrapper": on_cpu})

    def run(embeds: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
        # Marked at every call, not once: a trace (the first call, or a recompile) reads the marks of the
        # tensors it is given.
        mark_unbacked(embeds, 1)
        mark_unbacked(positions, 1)
        mark_unbacked(logits_index, 0)
        return compiled(embeds, positions, logits_index)

    return run


def frozen_model_guards(entries) -> list[bool]:
    """`guard_filter_fn` of the compiled forward: keep every guard except those on the model's modules,
    as torch's own filter for that does (the model is frozen once compiled: see the module docstring)."""
    return torch.compiler.skip_guard_on_all_nn_modules_unsafe(entries)


# RoPE types whose cos/sin depend on the position alone (not on the sequence length, as "dynamic" does)
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3"})


def install_rotary_tables(model, max_positions: int) -> int:
    """Give every Llama-family rotary module (forward(x, position_ids), a static RoPE type) a table of its
    own (cos, sin) for positions 0 .. max_positions - 1 in the model's dtype, read by its forward from
    then on; returns how many. Other dtypes take the module's own forward. Positions past the table
    must not reach it: the engine's positions are below max_model_len, which `max_positions` is. Idempotent."""
    param = next(model.parameters())
    installed = 0
    for module in model.modules():
        rope_type = getattr(module, "rope_type", None)  # Gemma 3's is a dict per layer type
        if not type(module).__name__.endswith("RotaryEmbedding") or not isinstance(rope_type, str) or rope_type not in STATIC_ROPE_TYPES:
            continue
        if getattr(module, "_softserve_rotary_table", None) is not None:
            installed += 1
            continue
        if list(inspect.signature(module.forward).parameters) != ["x", "position_ids"]:
            continue  # Gemma 3's takes a layer type: left as it is
        with torch.no_grad():
            positions = torch.arange(max_positions, device=param.device)[None]  # [1, max_positions]
            cos, sin = module(param.new_empty(0), positions)  # [1, max_positions, head_dim] each, the model's dtype
        module._softserve_rotary_table = (cos[0], sin[0])
        module.forward = _table_forward(module, module.forward)
        installed += 1
    return installed


def _table_forward(module, module_forward):
    def forward(x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = module._softserve_rotary_table  # [max_positions, head_dim] each
        if x.dtype != cos.dtype or x.device != cos.device:
            return module_forward(x, position_ids)
        return cos[position_ids], sin[position_ids]  # [batch, T, head_dim] each

    return forward


def use_compile(setting: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """`--compile`: on; off; auto = on for half-precision models on CPU that have a C++ compiler for
    inductor. float32 stays eager under auto: the engine's float32 output is held token for token to
    PEFT's eager forward, and a fused graph rounds differently. CUDA stays eager under auto and replays
    CUDA graphs instead (cuda_graphs.py); `on` compiles it there too, and then no step is replayed."""
    if setting not in ("off", "auto", "on"):
        raise ValueError(f"compile must be off, auto or on, not {setting!r}")
    if setting != "auto":
        return setting == "on"
    return dtype in (torch.bfloat16, torch.float16) and torch.device(device).type == "cpu" and has_cpp_compiler()


def has_cpp_compiler() -> bool:
    """Whether inductor can build its CPU kernels: the C++ compiler it would call is on PATH."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return shutil.which(get_cpp_compiler()) is not None
    except Exception:  # no compiler found (it raises), or a torch without this helper
        return False


# The (packed tokens, kept logits) sizes run at start-up: the first traces the one graph, the others must
# reuse it (a decode step of one row, a prefill chunk that samples one token).
WARM_UP_SHAPES = ((3, 2), (2, 1), (1, 1))
