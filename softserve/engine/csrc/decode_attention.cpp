// Decode attention over the KV pool, in place: one query per row, each row's keys and values read
// straight from its own extent of the pool (no gather into a padded copy, no mask).
//
// Built at first use by softserve/engine/native_kernels.py (torch.utils.cpp_extension) and
// registered as torch.ops.softserve_native.decode_attention. Scores, softmax and the weighted sum
// are computed in float32 whatever the storage dtype (as torch's CPU flash attention does), and every
// (row, kv head) is computed by one thread from its own data only, so a row's result does not depend
// on the other rows of the batch.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "parallel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// exp(x) for x <= 0 (scores minus their maximum), in a form the compiler vectorizes (std::exp in a
// loop stays scalar without -ffast-math): 2^(x log2 e) split into 2^n * e^r, |r| <= ln2/2, e^r by its
// degree-6 Taylor polynomial (relative error < 2e-7, about float rounding); below -87 the result is 0.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.f ? -87.f : x;
  // round to nearest by the 1.5 * 2^23 trick: roundf() is a library call the compiler will not vectorize
  const float n = (clamped * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = clamped - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return x < -87.f ? 0.f : p * scale;
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<float>(src[i]);
}

// scores [groups][n] -> their softmax weights, unnormalized, in place; totals[g]: each row's sum.
inline void softmax_rows(float* scores, int64_t n, int64_t groups, float* totals) {
  for (int64_t g = 0; g < groups; ++g) {
    float* sg = scores + g * n;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t p = 0; p < n; ++p) m = sg[p] > m ? sg[p] : m;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t p = 0; p < n; ++p) {
      sg[p] = exp_nonpositive(sg[p] - m);
      sum += sg[p];
    }
    totals[g] = sum;
  }
}

#if defined(__AVX512F__)
#include <immintrin.h>

template <typename T>
inline __m512 load16(const T* src);
template <>
inline __m512 load16<float>(const float* src) { return _mm512_loadu_ps(src); }
template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* src) {  // bf16 is the high half of a float
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
template <>
inline __m512 load16<c10::Half>(const c10::Half* src) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}

// G query heads (of one KV head) of one row against that row's n keys/values, head_dim D: the query
// heads and the output sums stay in registers, one pass over the keys and one over the values.
// scores: n * G floats of scratch; out_f: G * D floats (unnormalized sums); totals: G softmax sums.
template <typename T, int D, int G>
void attend_heads(const float* qf, const T* k_base, int64_t k_pos, const T* v_base, int64_t v_pos, int64_t n,
                  float* scores, float* out_f, float* totals) {
  constexpr int V = D / 16;
  __m512 q[G][V];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) q[g][i] = _mm512_loadu_ps(qf + g * D + i * 16);
  for (int64_t p = 0; p < n; ++p) {
    __m512 k[V];
    for (int i = 0; i < V; ++i) k[i] = load16(k_base + p * k_pos + i * 16);
    for (int g = 0; g < G; ++g) {
      __m512 acc = _mm512_mul_ps(q[g][0], k[0]);
      for (int i = 1; i < V; ++i) acc = _mm512_fmadd_ps(q[g][i], k[i], acc);
      scores[g * n + p] = _mm512_reduce_add_ps(acc);
    }
  }
  softmax_rows(scores, n, G, totals);
  __m512 o[G][V];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) o[g][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; ++p) {
    __m512 v[V];
    for (int i = 0; i < V; ++i) v[i] = load16(v_base + p * v_pos + i * 16);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(scores[g * n + p]);
      for (int i = 0; i < V; ++i) o[g][i] = _mm512_fmadd_ps(w, v[i], o[g][i]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < V; ++i) _mm512_storeu_ps(out_f + g * D + i * 16, o[g][i]);
}

// Heads [0, groups) of one (row, KV head) in chunks of up to 4 query heads; false: D not specialised.
template <typename T, int D>
bool attend_all(const float* qf, const T* k_base, int64_t k_pos, const T* v_base, int64_t v_pos, int64_t n,
                int64_t groups, float* scores, float* out_f, float* totals) {
  for (int64_t g0 = 0; g0 < groups; g0 += 4) {
    const int64_t count = std::min<int64_t>(4, groups - g0);
    const float* q = qf + g0 * D;
    float* o = out_f + g0 * D;
    float* t = totals + g0;
    switch (count) {
      case 1: attend_heads<T, D, 1>(q, k_base, k_pos, v_base, v_pos, n, scores, o, t); break;
      case 2: attend_heads<T, D, 2>(q, k_base, k_pos, v_base, v_pos, n, scores, o, t); break;
      case 3: attend_heads<T, D, 3>(q, k_base, k_pos, v_base, v_pos, n, scores, o, t); break;
      default: attend_heads<T, D, 4>(q, k_base, k_pos, v_base, v_pos, n, scores, o, t); break;
    }
  }
  return true;
}

template <typename T>
bool attend_fast(const float* qf, const T* k_base, int64_t k_pos, const T* v_base, int64_t v_pos, int64_t n,
                 int64_t groups, int64_t d, float* scores, float* out_f, float* totals) {
  if constexpr (std::is_same_v<T, double>) {
    return false;  // float64 keeps the portable loops
  } else {
    switch (d) {
    case 64: return attend_all<T, 64>(qf, k_base, k_pos, v_base, v_pos, n, groups, scores, out_f, totals);
    case 128: return attend_all<T, 128>(qf, k_base, k_pos, v_base, v_pos, n, groups, scores, out_f, totals);
    case 256: return attend_all<T, 256>(qf, k_base, k_pos, v_base, v_pos, n, groups, scores, out_f, totals);
      default: return false;
    }
  }
}
#else
template <typename T>
bool attend_fast(const float*, const T*, int64_t, const T*, int64_t, int64_t, int64_t, int64_t, float*, float*, float*) {
  return false;  // no AVX-512 on the building CPU: the portable loops below
}
#endif

template <typename T>
inline void store_heads(const float* acc, const float* total, T* out, int64_t groups, int64_t d) {
  for (int64_t g = 0; g < groups; ++g) {
    const float inv = 1.f / total[g];
    for (int64_t i = 0; i < d; ++i) out[g * d + i] = static_cast<T>(acc[g * d + i] * inv);
  }
}

// q [rows, q_heads, d]; keys/values [kv_heads, capacity, d] (rows of d contiguous);
// kv_start/kv_len [rows]; out [rows, q_heads, d]. The query heads of KV head h are h*groups .. h*groups+groups-1.
template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const int64_t* kv_start,
                   const int64_t* kv_len, at::Tensor& out, int64_t window, double scale) {
  const int64_t rows = q.size(0), q_heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = keys.size(0);
  const int64_t groups = q_heads / kv_heads;
  const T* q_data = q.const_data_ptr<T>();
  const T* k_data = keys.const_data_ptr<T>();
  const T* v_data = values.const_data_ptr<T>();
  T* o_data = out.mutable_data_ptr<T>();
  const int64_t k_head = keys.stride(0), k_pos = keys.stride(1);
  const int64_t v_head = values.stride(0), v_pos = values.stride(1);
  const float fscale = static_cast<float>(scale);

  softserve::parallel_range(rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(groups * d), acc(groups * d), kv_row(d), total(groups), scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t len = kv_len[r];
      const int64_t first = (window > 0 && len > window) ? len - window : 0;
      const int64_t n = len - first;
      const int64_t slot0 = kv_start[r] + first;
      const T* q_row = q_data + (r * q_heads + h * groups) * d;
      for (int64_t g = 0; g < groups; ++g) {
        float* qg = qf.data() + g * d;
        load_row(q_row + g * d, qg, d);
        for (int64_t i = 0; i < d; ++i) qg[i] *= fscale;  // the scale folded into the query once
      }
      scores.resize(groups * n);
      const T* k_base = k_data + h * k_head + slot0 * k_pos;
      const T* v_base = v_data + h * v_head + slot0 * v_pos;
      T* o_row = o_data + (r * q_heads + h * groups) * d;
      if (attend_fast(qf.data(), k_base, k_pos, v_base, v_pos, n, groups, d, scores.data(), acc.data(), total.data())) {
        store_heads(acc.data(), total.data(), o_row, groups, d);
        continue;
      }
      for (int64_t p = 0; p < n; ++p) {
        load_row(k_base + p * k_pos, kv_row.data(), d);
        for (int64_t g = 0; g < groups; ++g) {
          const float* qg = qf.data() + g * d;
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t i = 0; i < d; ++i) s += qg[i] * kv_row[i];
          scores[g * n + p] = s;
        }
      }
      softmax_rows(scores.data(), n, groups, total.data());
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = 0; p < n; ++p) {
        load_row(v_base + p * v_pos, kv_row.data(), d);
        for (int64_t g = 0; g < groups; ++g) {
          const float w = scores[g * n + p];
          float* ag = acc.data() + g * d;
#pragma omp simd
          for (int64_t i = 0; i < d; ++i) ag[i] += w * kv_row[i];
        }
      }
      store_heads(acc.data(), total.data(), o_row, groups, d);
    }
  });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& kv_start, const at::Tensor& kv_len, int64_t window, double scale) {
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && values.dim() == 3, "q [rows, q_heads, d], keys/values [kv_heads, capacity, d]");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type(), "one dtype");
  TORCH_CHECK(q.size(2) == keys.size(2) && keys.sizes() == values.sizes(), "head_dim and pool shapes must agree");
  TORCH_CHECK(q.size(1) % keys.size(0) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(keys.stride(2) == 1 && values.stride(2) == 1, "pool rows must be contiguous");
  TORCH_CHECK(kv_start.scalar_type() == at::kLong && kv_len.scalar_type() == at::kLong, "int64 extents");
  TORCH_CHECK(kv_start.numel() == q.size(0) && kv_len.numel() == q.size(0), "one extent per row");
  const at::Tensor qc = q.contiguous();
  const at::Tensor starts = kv_start.contiguous(), lengths = kv_len.contiguous();
  const int64_t* start_data = starts.const_data_ptr<int64_t>();
  const int64_t* len_data = lengths.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(0); ++r) {
    TORCH_CHECK(len_data[r] >= 1 && start_data[r] >= 0 && start_data[r] + len_data[r] <= keys.size(1),
                "row extent outside the pool");
  }
  at::Tensor out = at::empty_like(qc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_kernel<scalar_t>(qc, keys, values, start_data, len_data, out, window, scale);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(softserve_native, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor kv_start, Tensor kv_len, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(softserve_native, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
