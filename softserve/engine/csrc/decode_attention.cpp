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

#include "kernels.h"
#include "parallel.h"

#include <omp.h>

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

// exp_nonpositive on 16 lanes (GCC leaves the scalar loops of softmax_rows unvectorized).
inline __m512 exp16_nonpositive(__m512 x) {
  const __m512 clamped = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(clamped, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), clamped);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~underflow), p, scale);
}

// One row of n scores -> its unnormalized softmax weights in place; returns their sum.
inline float softmax16(float* s, int64_t n) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = neg_inf;
  for (int64_t p = 0; p < n; p += 16) {
    const __mmask16 k = n - p >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - p)) - 1);
    m = _mm512_max_ps(m, _mm512_mask_loadu_ps(neg_inf, k, s + p));
  }
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t p = 0; p < n; p += 16) {
    const __mmask16 k = n - p >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - p)) - 1);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16_nonpositive(_mm512_sub_ps(_mm512_mask_loadu_ps(neg_inf, k, s + p), mx)));
    _mm512_mask_storeu_ps(s + p, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

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

// Software prefetch of the pool rows [from, to) of one extent (each D elements). In a step the weight
// stream of the layers in between has evicted every layer's K/V from the caches, and without this the
// kernel waits on each key and value in turn: the score passes below fetch the keys kPrefetchAhead
// positions ahead, and the values of the positions they score, so the value pass finds them in cache.
// Measured (30 layers of SmolLM2's products and attention, 16 rows, interleaved): 2.33 -> 1.55 ms a step
// at 100 positions, 5.29 -> 4.01 at 300, 13.55 -> 9.70 at 1,000 (docs/performance.md).
constexpr int64_t kPrefetchAhead = 32;

template <typename T, int D>
inline void prefetch_rows(const T* base, int64_t pos_stride, int64_t from, int64_t to) {
  for (int64_t p = from; p < to; ++p)
    for (int64_t i = 0; i < D * static_cast<int64_t>(sizeof(T)); i += 64)
      _mm_prefetch(reinterpret_cast<const char*>(base + p * pos_stride) + i, _MM_HINT_T0);
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
  prefetch_rows<T, D>(k_base, k_pos, 0, std::min(n, kPrefetchAhead));
  for (int64_t p = 0; p < n; ++p) {
    if (p % 16 == 0) {
      prefetch_rows<T, D>(k_base, k_pos, std::min(n, p + kPrefetchAhead), std::min(n, p + kPrefetchAhead + 16));
      prefetch_rows<T, D>(v_base, v_pos, p, std::min(n, p + 16));
    }
    __m512 k[V];
    for (int i = 0; i < V; ++i) k[i] = load16(k_base + p * k_pos + i * 16);
    for (int g = 0; g < G; ++g) {
      __m512 acc = _mm512_mul_ps(q[g][0], k[0]);
      for (int i = 1; i < V; ++i) acc = _mm512_fmadd_ps(q[g][i], k[i], acc);
      scores[g * n + p] = _mm512_reduce_add_ps(acc);
    }
  }
  for (int g = 0; g < G; ++g) totals[g] = softmax16(scores + g * n, n);
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

#if defined(__AVX512BF16__)
// The 16 horizontal sums of a[0..15] as one vector (lane j = sum of a[j]'s lanes): a transpose tree of
// 15 adds instead of 16 separate reductions (each ~8 dependent shuffles and adds).
inline __m512 reduce16(const __m512* a) {
  __m512 b[8], c[4], d[2];
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j)
    b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[j], a[j + 8], 0x44), _mm512_shuffle_f32x4(a[j], a[j + 8], 0xEE));
  for (int j = 0; j < 4; ++j)
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[j], b[j + 4], 0x88), _mm512_shuffle_f32x4(b[j], b[j + 4], 0xDD));
  for (int j = 0; j < 2; ++j)
    d[j] = _mm512_add_ps(_mm512_shuffle_ps(c[j], c[j + 2], 0x44), _mm512_shuffle_ps(c[j], c[j + 2], 0xEE));
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  // e holds the sums in the order 0 2 1 3 8 10 9 11 4 6 5 7 12 14 13 15 (a self-inverse permutation)
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), e);
}

// bf16 storage: G query heads of one (row, KV head). Scores by AVX512-BF16 dot products straight from the
// stored bf16 (each product exact in float32, sums in float32), 16 keys at a time; softmax in float32;
// the weighted sum in float32, each 32 stored values split into their even and odd halves (one shift,
// one mask) instead of widened 16 at a time. scores: G * round16(n) floats of scratch.
template <int D, int G>
void attend_heads_bf16(const c10::BFloat16* q_row, int64_t q_hs, float scale, const c10::BFloat16* k_base, int64_t k_pos,
                       const c10::BFloat16* v_base, int64_t v_pos, int64_t n, float* scores, float* out_f,
                       float* totals) {
  constexpr int W = D / 32;  // 32 bf16 per register
  const int64_t stride = (n + 15) & ~int64_t{15};
  __m512bh q[G][W];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < W; ++i) q[g][i] = (__m512bh)_mm512_loadu_si512(q_row + g * q_hs + i * 32);
  const __m512 vscale = _mm512_set1_ps(scale);
  prefetch_rows<c10::BFloat16, D>(k_base, k_pos, 0, std::min(n, kPrefetchAhead));
  for (int64_t p0 = 0; p0 < n; p0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - p0);
    const c10::BFloat16* kb = k_base + p0 * k_pos;
    prefetch_rows<c10::BFloat16, D>(k_base, k_pos, std::min(n, p0 + kPrefetchAhead), std::min(n, p0 + kPrefetchAhead + 16));
    prefetch_rows<c10::BFloat16, D>(v_base, v_pos, p0, p0 + m);
    for (int g = 0; g < G; ++g) {
      __m512 acc[16];
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        acc[j] = _mm512_setzero_ps();
        if (j < m)
          for (int i = 0; i < W; ++i)
            acc[j] = _mm512_dpbf16_ps(acc[j], q[g][i], (__m512bh)_mm512_loadu_si512(kb + j * k_pos + i * 32));
      }
      _mm512_storeu_ps(scores + g * stride + p0, _mm512_mul_ps(reduce16(acc), vscale));
    }
  }
  for (int g = 0; g < G; ++g) totals[g] = softmax16(scores + g * stride, n);
  __m512 even[G][W], odd[G][W];
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < W; ++i) even[g][i] = odd[g][i] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t p = 0; p < n; ++p) {
    __m512 ve[W], vo[W];
    for (int i = 0; i < W; ++i) {
      const __m512i raw = _mm512_loadu_si512(v_base + p * v_pos + i * 32);
      ve[i] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));  // elements 0, 2, 4, ...
      vo[i] = _mm512_castsi512_ps(_mm512_and_si512(raw, high));  // elements 1, 3, 5, ...
    }
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(scores[g * stride + p]);
      for (int i = 0; i < W; ++i) {
        even[g][i] = _mm512_fmadd_ps(w, ve[i], even[g][i]);
        odd[g][i] = _mm512_fmadd_ps(w, vo[i], odd[g][i]);
      }
    }
  }
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int g = 0; g < G; ++g)
    for (int i = 0; i < W; ++i) {
      _mm512_storeu_ps(out_f + g * D + i * 32, _mm512_permutex2var_ps(even[g][i], lo, odd[g][i]));
      _mm512_storeu_ps(out_f + g * D + i * 32 + 16, _mm512_permutex2var_ps(even[g][i], hi, odd[g][i]));
    }
}

// All `groups` heads, in chunks small enough for the registers (4 heads at D 64, 2 at 128, 1 at 256).
template <int D>
void attend_all_bf16(const c10::BFloat16* q_row, int64_t q_hs, float scale, const c10::BFloat16* k_base, int64_t k_pos,
                     const c10::BFloat16* v_base, int64_t v_pos, int64_t n, int64_t groups, float* scores,
                     float* out_f, float* totals) {
  constexpr int64_t chunk = D <= 64 ? 4 : (D == 128 ? 2 : 1);
  for (int64_t g0 = 0; g0 < groups; g0 += chunk) {
    const int64_t count = std::min<int64_t>(chunk, groups - g0);
    const c10::BFloat16* q = q_row + g0 * q_hs;
    float* o = out_f + g0 * D;
    float* t = totals + g0;
    if constexpr (chunk == 1) {
      attend_heads_bf16<D, 1>(q, q_hs, scale, k_base, k_pos, v_base, v_pos, n, scores, o, t);
    } else if constexpr (chunk == 2) {
      if (count == 1) attend_heads_bf16<D, 1>(q, q_hs, scale, k_base, k_pos, v_base, v_pos, n, scores, o, t);
      else attend_heads_bf16<D, 2>(q, q_hs, scale, k_base, k_pos, v_base, v_pos, n, scores, o, t);
    } else {
      switch (count) {
        case 1: attend_heads_bf16<D, 1>(q, q_hs, scale, k_base, k_pos, v_base, v_pos, n, scores, o, t); break;
        case 2: attend_heads_bf16<D, 2>(q, q_hs, scale, k_base, k_pos, v_base, v_pos, n, scores, o, t); break;
        case 3: attend_heads_bf16<D, 3>(q, q_hs, scale, k_base, k_pos, v_base, v_pos, n, scores, o, t); break;
        default: attend_heads_bf16<D, 4>(q, q_hs, scale, k_base, k_pos, v_base, v_pos, n, scores, o, t); break;
      }
    }
  }
}

inline bool attend_bf16(const c10::BFloat16* q_row, int64_t q_hs, float scale, const c10::BFloat16* k_base, int64_t k_pos,
                        const c10::BFloat16* v_base, int64_t v_pos, int64_t n, int64_t groups, int64_t d,
                        float* scores, float* out_f, float* totals) {
  switch (d) {
    case 64: attend_all_bf16<64>(q_row, q_hs, scale, k_base, k_pos, v_base, v_pos, n, groups, scores, out_f, totals); return true;
    case 128: attend_all_bf16<128>(q_row, q_hs, scale, k_base, k_pos, v_base, v_pos, n, groups, scores, out_f, totals); return true;
    case 256: attend_all_bf16<256>(q_row, q_hs, scale, k_base, k_pos, v_base, v_pos, n, groups, scores, out_f, totals); return true;
    default: return false;
  }
}
#define SOFTSERVE_BF16_DOT 1
#endif

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
#if defined(SOFTSERVE_BF16_DOT)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (d % 16 == 0) {  // round to nearest even, as c10::BFloat16's conversion does, 16 at a time
      for (int64_t g = 0; g < groups; ++g) {
        const __m512 inv = _mm512_set1_ps(1.f / total[g]);
        for (int64_t i = 0; i < d; i += 16) {
          const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + g * d + i), inv));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * d + i), (__m256i)h);
        }
      }
      return;
    }
  }
#endif
  for (int64_t g = 0; g < groups; ++g) {
    const float inv = 1.f / total[g];
    for (int64_t i = 0; i < d; ++i) out[g * d + i] = static_cast<T>(acc[g * d + i] * inv);
  }
}

// Splits tasks [0, n) into `parts` contiguous ranges of about equal cost (cost(t): keys + a fixed
// overhead), so a thread that draws the long prefill rows does not leave the other one waiting.
// bounds: parts + 1 entries. Which thread computes a task never changes what it computes.
template <typename Cost>
void balanced_bounds(int64_t n, int64_t parts, const Cost& cost, std::vector<int64_t>& bounds) {
  bounds.assign(parts + 1, n);
  bounds[0] = 0;
  double total = 0;
  for (int64_t t = 0; t < n; ++t) total += cost(t);
  double done = 0;
  int64_t part = 1;
  for (int64_t t = 0; t < n && part < parts; ++t) {
    done += cost(t);
    while (part < parts && done >= total * part / parts) bounds[part++] = t + 1;
  }
}

// q [rows, q_heads, d]; keys/values [kv_heads, capacity, d] (rows of d contiguous);
// kv_start/kv_len [rows]; out [rows, q_heads, d]. The query heads of KV head h are h*groups .. h*groups+groups-1.
// A "row" here is one query: a prefill row's queries come as rows of their own, each with the extent it
// sees (causal), so one call serves a whole packed batch.
template <typename T>
void decode_kernel(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const int64_t* kv_start,
                   const int64_t* kv_len, at::Tensor& out, int64_t window, double scale) {
  const int64_t rows = q.size(0), q_heads = q.size(1), d = q.size(2);
  const int64_t kv_heads = keys.size(0);
  const int64_t groups = q_heads / kv_heads;
  const T* q_data = q.const_data_ptr<T>();
  const int64_t q_tok = q.stride(0), q_hs = q.stride(1);  // q may be strided (a transposed view)
  const T* k_data = keys.const_data_ptr<T>();
  const T* v_data = values.const_data_ptr<T>();
  T* o_data = out.mutable_data_ptr<T>();
  const int64_t k_head = keys.stride(0), k_pos = keys.stride(1);
  const int64_t v_head = values.stride(0), v_pos = values.stride(1);
  const float fscale = static_cast<float>(scale);
  auto visible = [&](int64_t r) {
    const int64_t len = kv_len[r];
    return (window > 0 && len > window) ? window : len;
  };
  const int64_t tasks = rows * kv_heads;
  const int64_t threads = omp_in_parallel() ? 1 : std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), tasks));
  std::vector<int64_t> bounds;
  balanced_bounds(tasks, threads, [&](int64_t t) { return static_cast<double>(visible(t / kv_heads) + 32); }, bounds);

  softserve::parallel_range(threads, 1, [&](int64_t part_begin, int64_t part_end) {
    // scratch reused by this thread across calls: no heap allocation per task or per call once warm
    thread_local std::vector<float> qf, acc, kv_row, total, scores;
    qf.resize(groups * d);
    acc.resize(groups * d);
    kv_row.resize(d);
    total.resize(groups);
    for (int64_t task = bounds[part_begin]; task < bounds[part_end]; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t n = visible(r);
      T* o_row = o_data + (r * q_heads + h * groups) * d;
      if (n == 0) {  // a query the caller attends elsewhere (a long prefill row): zeros
        std::fill(o_row, o_row + groups * d, static_cast<T>(0.f));
        continue;
      }
      const int64_t slot0 = kv_start[r] + kv_len[r] - n;
      if (static_cast<int64_t>(scores.size()) < groups * (n + 16)) scores.resize(groups * (n + 16));
      const T* q_row = q_data + r * q_tok + h * groups * q_hs;
      const T* k_base = k_data + h * k_head + slot0 * k_pos;
      const T* v_base = v_data + h * v_head + slot0 * v_pos;
#if defined(SOFTSERVE_BF16_DOT)
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (attend_bf16(q_row, q_hs, fscale, k_base, k_pos, v_base, v_pos, n, groups, d, scores.data(), acc.data(), total.data())) {
          store_heads(acc.data(), total.data(), o_row, groups, d);
          continue;
        }
      }
#endif
      for (int64_t g = 0; g < groups; ++g) {
        float* qg = qf.data() + g * d;
        load_row(q_row + g * q_hs, qg, d);
        for (int64_t i = 0; i < d; ++i) qg[i] *= fscale;  // the scale folded into the query once
      }
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
  const at::Tensor qc = q.stride(2) == 1 ? q : q.contiguous();  // rows and heads at any stride
  const at::Tensor starts = kv_start.contiguous(), lengths = kv_len.contiguous();
  const int64_t* start_data = starts.const_data_ptr<int64_t>();
  const int64_t* len_data = lengths.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(0); ++r) {
    TORCH_CHECK(len_data[r] >= 0 && start_data[r] >= 0 && start_data[r] + len_data[r] <= keys.size(1),
                "row extent outside the pool");
  }
  at::Tensor out = at::empty(qc.sizes(), qc.options());  // [rows, q_heads, d] contiguous
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    decode_kernel<scalar_t>(qc, keys, values, start_data, len_data, out, window, scale);
  });
  return out;
}

}  // namespace

namespace softserve {
at::Tensor attend_rows(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& kv_start,
                       const at::Tensor& kv_len, int64_t window, double scale) {
  return decode_attention(q, keys, values, kv_start, kv_len, window, scale);
}
}  // namespace softserve

TORCH_LIBRARY_FRAGMENT(softserve_native, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor kv_start, Tensor kv_len, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(softserve_native, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
