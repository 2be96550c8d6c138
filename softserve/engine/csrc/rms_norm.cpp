// RMSNorm of the Llama family in one pass per row, for bf16/fp16 models on CPU:
//   y = weight * to_dtype(x * rsqrt(mean(x^2) + eps))      (x in float32, as transformers' LlamaRMSNorm)
// The eager module runs this as ~8 separate ops (two dtype casts, pow, mean, add, rsqrt, two muls), each a
// pass over the activations and a dispatch; on a 16-row decode step they were ~3 ms of ~37 (61 norms).
// Registered as torch.ops.softserve_native.rms_norm; softserve/engine/native_kernels.py says where it is used.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "parallel.h"

#include <cmath>
#include <cstdint>

namespace {

template <typename T>
void rms_norm_kernel(const T* x, const T* weight, T* out, int64_t rows, int64_t hidden, float eps) {
  softserve::parallel_range(rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * hidden;
      T* yr = out + r * hidden;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < hidden; ++i) {
        const float v = static_cast<float>(xr[i]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(hidden) + eps);
#pragma omp simd
      for (int64_t i = 0; i < hidden; ++i) {
        // two roundings to the model dtype, as the module: the normalized value, then the product
        const T normed = static_cast<T>(static_cast<float>(xr[i]) * inv);
        yr[i] = static_cast<T>(static_cast<float>(weight[i]) * static_cast<float>(normed));
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight must have one dtype");
  TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), "weight [hidden] for x [..., hidden]");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t hidden = weight.size(0);
  const int64_t rows = hidden ? xc.numel() / hidden : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<scalar_t>(xc.const_data_ptr<scalar_t>(), wc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                              rows, hidden, static_cast<float>(eps));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(softserve_native, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(softserve_native, CPU, m) {
  m.impl("rms_norm", &rms_norm);
}
