// The compiled forward's attention op, in C++: torch.ops.softserve_native.step_attention.
//
// The compiled graph calls one attention op per layer. The Python op (compiled_forward.py,
// softserve::packed_attention) reads the step's plan from a thread-local, writes the new K/V into the
// pool and runs our kernel: ~20 us of Python and dispatch a layer, ~0.6 ms of a 16-row decode step on
// SmolLM2. When the whole step runs on our kernels (every row decode or a prefill row of at most
// NATIVE_PREFILL_MAX_KV positions: the plan's `native_tokens`, no SDPA group, no CUDA-graph padding),
// the runner hands this op the step's pool and extents once (`set_step_attention`, in this thread), and
// each layer's call is the same two kernels, called from here: the same outputs, bit for bit. Any other
// step (nothing set) goes to the Python op, which handles every plan.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include "kernels.h"

#include <cstdint>
#include <vector>

namespace {

struct Step {
  bool active = false;
  std::vector<at::Tensor> keys, values;  // per layer [kv_heads, capacity, d]: views of the pool
  at::Tensor slots;                      // [tokens] int64: each packed token's pool slot
  at::Tensor kv_start, kv_len;           // [tokens] int64: each token's extent (AttentionPlan.native_tokens)
};

thread_local Step current;  // the engine thread's step; a step in another thread never sees it

void set_step_attention(at::TensorList keys, at::TensorList values, const at::Tensor& slots, const at::Tensor& kv_start,
                        const at::Tensor& kv_len) {
  TORCH_CHECK(!keys.empty() && keys.size() == values.size(), "one (keys, values) pair per layer");
  TORCH_CHECK(slots.numel() == kv_start.numel() && slots.numel() == kv_len.numel(), "one slot and extent per token");
  current.keys.assign(keys.begin(), keys.end());
  current.values.assign(values.begin(), values.end());
  current.slots = slots;
  current.kv_start = kv_start;
  current.kv_len = kv_len;
  current.active = true;
}

void clear_step_attention() { current = Step(); }  // drops the references to the pool and the step's tensors

bool step_attention_set() { return current.active; }

// query [1, q_heads, T, d], key/value [1, kv_heads, T, d] -> [1, T, q_heads, d]; writes the new K/V into the pool
at::Tensor step_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t layer_idx,
                          int64_t sliding_window, double scaling) {
  if (!current.active) {
    static const c10::OperatorHandle python_op =
        c10::Dispatcher::singleton().findSchemaOrThrow("softserve::packed_attention", "");
    torch::jit::Stack stack{query, key, value, layer_idx, sliding_window, scaling};
    python_op.callBoxed(&stack);
    return stack[0].toTensor();
  }
  TORCH_CHECK(layer_idx >= 0 && layer_idx < static_cast<int64_t>(current.keys.size()), "layer outside the step's pool");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && query.size(0) == 1 && key.size(0) == 1, "one packed batch");
  TORCH_CHECK(query.size(2) == current.slots.numel(), "the step's tokens and the set step disagree");
  const at::Tensor& keys = current.keys[layer_idx];
  const at::Tensor& values = current.values[layer_idx];
  softserve::copy_kv(keys, values, key.select(0, 0), value.select(0, 0), current.slots);
  const at::Tensor tokens_first = query.select(0, 0).transpose(0, 1);  // [T, q_heads, d], a view
  return softserve::attend_rows(tokens_first, keys, values, current.kv_start, current.kv_len, sliding_window, scaling)
      .unsqueeze(0);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(softserve_native, m) {
  m.def("set_step_attention(Tensor[] keys, Tensor[] values, Tensor slots, Tensor kv_start, Tensor kv_len) -> ()");
  m.def("clear_step_attention() -> ()");
  m.def("step_attention_set() -> bool");
  m.def("step_attention(Tensor query, Tensor key, Tensor value, int layer_idx, int sliding_window, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(softserve_native, CatchAll, m) {
  m.impl("set_step_attention", &set_step_attention);
  m.impl("clear_step_attention", &clear_step_attention);
  m.impl("step_attention_set", &step_attention_set);
}

TORCH_LIBRARY_IMPL(softserve_native, CPU, m) {
  m.impl("step_attention", &step_attention);
}
