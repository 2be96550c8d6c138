"""The model forward compiled with inductor (`--compile`): one graph for every layer, attention as a custom op.

Eager HF modules cost one Python call and one kernel per op: RMSNorm alone is ~7 ops (casts, pow,
mean, rsqrt, mul) per norm, 61 norms per SmolLM2 step. Inductor fuses the norms, rotary, residual
adds, SiLU x mul and the casts. Our attention (packed_attention.py: pool writes, gathers, SDPA) stays
eager behind `torch.ops.softserve.packed_attention`, an opaque custom op, so the graph does not break
at every layer and the op sees the step's `PackedBatch` through a thread-local set by the runner (a
custom op takes tensors and scalars only; the batch's plan is plain Python). Should torch ever run
the forward eagerly instead (past its recompile limit), the attention finds the batch the same way.

Shapes: the packed token count and the number of kept logits are dynamic (`dynamic=True`), and ONE
graph serves every size: the forward is traced "size-oblivious" (backed_size_oblivious), so torch does
not specialize the sizes 0 and 1 as it otherwise does. Specialized, a run saw three graphs (one token and
one logit / many tokens x one / many logits), each traced anew at every start: tracing, not the C++
compile (inductor caches that on disk), is what a restart pays; one graph took the warm start of
SmolLM2-135M from 46 s to ~20 s here (docs/performance.md). `warm_up` traces it at start-up and checks
that the other shapes reuse it. No graph keeps zero logits: the compiler would drop every layer, the
attention op and its KV writes included (the op is pure to it), so the runner keeps one.

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
import torch.fx.experimental._config  # backed_size_oblivious (see compile_forward)

from softserve.engine.packed_attention import NO_MASK, attend_packed, step_batch

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


def compile_forward(model, max_positions: int | None = None):
    """fn(embeds [1, T, hidden], positions [1, T], logits_index [n]) -> logits [n, vocab], compiled lazily.
    With `max_positions`, the rotary modules read tables of that many positions (`install_rotary_tables`)."""
    if max_positions:
        install_rotary_tables(model, max_positions)

    def forward(embeds: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
        out = model(inputs_embeds=embeds, position_ids=positions, attention_mask=NO_MASK, use_cache=False,
                    logits_to_keep=logits_index)
        return out.logits[0]

    compiled = torch.compile(forward, dynamic=True)

    def run(embeds: torch.Tensor, positions: torch.Tensor, logits_index: torch.Tensor) -> torch.Tensor:
        # Read when torch traces (the first call, or a recompile), so it is set around every call; the
        # graph itself is unaffected by it once traced.
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
            return compiled(embeds, positions, logits_index)

    return run


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
# reuse it (a decode step of one row, a prefill chunk that samples one token). 3 != 2: sizes equal at the
# first trace would be assumed equal in the general graph ("duck sizing"), and every step with fewer
# logits than tokens would then compile another graph.
WARM_UP_SHAPES = ((3, 2), (2, 1), (1, 1))
