// Greedy picks of a step's sampling rows: for each row of logits [rows, vocab], the index of its first
// maximal value, with the row's banned ids counted as -inf and a NaN counted above every number (the
// first NaN wins): exactly `logits.float()` with the banned ids set to -inf, then `.max(dim=-1).indices`.
//
// The sampler did that with torch ops: a bf16 -> float32 copy of the logits, one index_put per row with
// banned ids (EOS before min_tokens), and max(dim), ~0.55 ms of a ~14 ms 16-row bf16 decode step on the
// 2-core Zen 5 host (torch.profiler), where this kernel reads the logits once where they lie.
//
// Registered as torch.ops.softserve_native.greedy_argmax; sampler.py says where it is used.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "parallel.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)  // masked 16-bit loads
#include <immintrin.h>
#define SOFTSERVE_GREEDY_AVX512 1
#endif

namespace {

// The first maximal index of x[0..n) as float32 (n > 0), a NaN above all.
template <typename T>
int64_t first_argmax_scalar(const T* x, int64_t n) {
  int64_t best = 0;
  float best_value = static_cast<float>(x[0]);
  if (std::isnan(best_value)) return 0;
  for (int64_t i = 1; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::isnan(v)) return i;
    if (v > best_value) {
      best_value = v;
      best = i;
    }
  }
  return best;
}

#if defined(SOFTSERVE_GREEDY_AVX512)
inline __m512 load16(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 k) {  // bf16 is the high half of a float
  const __m256i raw = _mm256_maskz_loadu_epi16(k, reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __mmask16 lanes(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// Two passes over the row: its maximum (and whether it holds a NaN), then the first lane equal to it.
template <typename T>
int64_t first_argmax(const T* x, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = neg_inf;
  __mmask16 nan = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    const __m512 v = _mm512_mask_mov_ps(neg_inf, k, load16(x + i, k));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(v, m);  // a NaN in v gives m (the second operand), so m never holds one
  }
  if (nan) {
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 k = lanes(n - i);
      const __m512 v = load16(x + i, k);
      const __mmask16 hit = _mm512_mask_cmp_ps_mask(k, v, v, _CMP_UNORD_Q);
      if (hit) return i + __builtin_ctz(hit);
    }
  }
  const __m512 best = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(n - i);
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(k, load16(x + i, k), best, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  return 0;  // every value -inf and none equal: cannot happen, -inf == -inf
}
#else
template <typename T>
int64_t first_argmax(const T* x, int64_t n) {
  return first_argmax_scalar(x, n);
}
#endif

template <typename T>
void pick_rows(const at::Tensor& logits, const std::vector<std::vector<int64_t>>& banned, int64_t* out) {
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const T* data = logits.const_data_ptr<T>();
  softserve::parallel_range(rows, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<T> masked;  // a row with banned ids: a copy with them at -inf
    for (int64_t r = begin; r < end; ++r) {
      const T* row = data + r * vocab;
      if (!banned[r].empty()) {
        masked.assign(row, row + vocab);
        for (const int64_t id : banned[r]) masked[id] = static_cast<T>(-std::numeric_limits<float>::infinity());
        row = masked.data();
      }
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
        out[r] = first_argmax(row, vocab);
      } else {
        out[r] = first_argmax_scalar(row, vocab);
      }
    }
  });
}

// logits [rows, vocab] float32, float64, bf16 or fp16;
// banned [n, 2] int64 (row, id) pairs -> [rows] int64
at::Tensor greedy_argmax(const at::Tensor& logits, const at::Tensor& banned) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.size(1) > 0, "logits [rows, vocab] on CPU");
  TORCH_CHECK(banned.device().is_cpu() && banned.scalar_type() == at::kLong && banned.dim() == 2 && banned.size(1) == 2,
              "banned [n, 2] int64 (row, id)");
  const at::Tensor x = logits.contiguous();  // a step's logits are: no copy
  const int64_t rows = x.size(0), vocab = x.size(1);
  std::vector<std::vector<int64_t>> by_row(rows);
  const at::Tensor pairs = banned.contiguous();
  const int64_t* p = pairs.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < pairs.size(0); ++i) {
    TORCH_CHECK(p[2 * i] >= 0 && p[2 * i] < rows && p[2 * i + 1] >= 0 && p[2 * i + 1] < vocab, "banned pair out of range");
    by_row[p[2 * i]].push_back(p[2 * i + 1]);
  }
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "greedy_argmax", [&] {
    pick_rows<scalar_t>(x, by_row, out.mutable_data_ptr<int64_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(softserve_native, m) {
  m.def("greedy_argmax(Tensor logits, Tensor banned) -> Tensor");
}

TORCH_LIBRARY_IMPL(softserve_native, CPU, m) {
  m.impl("greedy_argmax", &greedy_argmax);
}
