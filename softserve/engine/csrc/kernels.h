// Our kernels that other kernels of this library call directly (not through the dispatcher).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace softserve {

// decode_attention.cpp: torch.ops.softserve_native.decode_attention
at::Tensor attend_rows(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& kv_start,
                       const at::Tensor& kv_len, int64_t window, double scale);

// write_kv.cpp: torch.ops.softserve_native.write_kv
void copy_kv(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& new_k, const at::Tensor& new_v,
             const at::Tensor& slots);

}  // namespace softserve
