// The step's new keys and values into their pool slots, both in one call: what two index_copy_ calls per
// layer did (~13-23 us each on a 16-row step, 60 per SmolLM2 step), as a plain copy, bit for bit.
// Registered as torch.ops.softserve_native.write_kv; softserve/engine/native_kernels.py says where it is used.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "kernels.h"
#include "parallel.h"

#include <cstdint>
#include <cstring>

namespace {

// keys/values [kv_heads, capacity, d] (the pool's layer views); new_k/new_v [kv_heads, tokens, d] (any
// strides with d contiguous); slots [tokens] int64.
void write_kv(at::Tensor keys, at::Tensor values, const at::Tensor& new_k, const at::Tensor& new_v, const at::Tensor& slots) {
  TORCH_CHECK(keys.device().is_cpu() && new_k.device().is_cpu() && slots.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(keys.dim() == 3 && values.sizes() == keys.sizes() && new_k.dim() == 3 && new_v.sizes() == new_k.sizes(),
              "pool [kv_heads, capacity, d], new [kv_heads, tokens, d]");
  TORCH_CHECK(keys.scalar_type() == new_k.scalar_type() && values.scalar_type() == new_v.scalar_type() &&
              keys.scalar_type() == values.scalar_type(), "one dtype");
  TORCH_CHECK(new_k.size(0) == keys.size(0) && new_k.size(2) == keys.size(2), "heads and head_dim must agree");
  TORCH_CHECK(keys.stride(2) == 1 && values.stride(2) == 1 && new_k.stride(2) == 1 && new_v.stride(2) == 1,
              "head_dim must be contiguous");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == new_k.size(1), "one int64 slot per token");
  const at::Tensor slot_tensor = slots.contiguous();
  const int64_t* slot = slot_tensor.const_data_ptr<int64_t>();
  const int64_t heads = new_k.size(0), tokens = new_k.size(1), capacity = keys.size(1);
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "slot outside the pool");
  const int64_t row_bytes = keys.size(2) * keys.element_size();
  const int64_t es = keys.element_size();
  char* k_dst = static_cast<char*>(keys.data_ptr());
  char* v_dst = static_cast<char*>(values.data_ptr());
  const char* k_src = static_cast<const char*>(new_k.const_data_ptr());
  const char* v_src = static_cast<const char*>(new_v.const_data_ptr());
  softserve::parallel_range(heads * tokens, 512, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / tokens, t = i % tokens;
      std::memcpy(k_dst + (h * keys.stride(0) + slot[t] * keys.stride(1)) * es,
                  k_src + (h * new_k.stride(0) + t * new_k.stride(1)) * es, row_bytes);
      std::memcpy(v_dst + (h * values.stride(0) + slot[t] * values.stride(1)) * es,
                  v_src + (h * new_v.stride(0) + t * new_v.stride(1)) * es, row_bytes);
    }
  });
}

}  // namespace

namespace softserve {
void copy_kv(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& new_k, const at::Tensor& new_v,
             const at::Tensor& slots) {
  write_kv(keys, values, new_k, new_v, slots);
}
}  // namespace softserve

TORCH_LIBRARY_FRAGMENT(softserve_native, m) {
  m.def("write_kv(Tensor(a!) keys, Tensor(b!) values, Tensor new_k, Tensor new_v, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(softserve_native, CPU, m) {
  m.impl("write_kv", &write_kv);
}
