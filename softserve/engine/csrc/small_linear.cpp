// bf16 linear y = x W^T + b for the few rows of a decode step, on CPUs with AVX512-BF16 but no AMX.
//
// At a few rows a linear is a stream of its weight past the input rows. Over SmolLM2-135M's 121
// products on the 2-core Zen 5 host, oneDNN's kernel on its packed weight (packed_linear.py) took 6.5 ms
// at 1 row (41 GB/s) and 10.8 ms at 16; this loop, with the weight in a layout made for it, 4.5 and
// 7.6 ms, and it stays ahead up to 256 rows (1.08x; bench/small_linear.py, docs/performance.md).
//
// Layout (`small_linear_pack`): W [N, K] -> [ceil(N/16), K/2, 16, 2]: for each block of 16 output
// columns and each pair of K, the 16 columns' two weights side by side: one 64-byte load is the
// operand of one VDPBF16PS, which adds x[m, 2p] * w[n, 2p] + x[m, 2p+1] * w[n, 2p+1] into 16 float32
// sums. Columns past N are zero.
//
// Kernel: a tile of up to 6 rows x 4 column blocks (24 accumulators in registers), over all of K, then
// + bias in float32 and one rounding to bf16 (round to nearest even). Every output element is summed
// over K in the same order whatever the row count and the tile it falls in, so a row's output does not
// depend on the other rows of the call. Parallel over column blocks: each thread streams its own part
// of the weight from memory once per call (the first row tile; later tiles re-read it from cache).
//
// Registered as torch.ops.softserve_native.small_linear{,_pack,_supported}; packed_linear.py says where
// it is used. Built without AVX512-BF16 (another CPU), `small_linear_supported` is false and the other
// two raise.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include "parallel.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SOFTSERVE_SMALL_LINEAR 1
#endif

namespace {

constexpr int64_t kBlock = 16;   // output columns per packed block: one zmm of float32 sums
constexpr int kTileBlocks = 4;   // column blocks per tile
constexpr int kTileRows = 6;     // rows per tile: 6 x 4 accumulators + 4 weight registers + 1 broadcast <= 32

bool supported() {
#ifdef SOFTSERVE_SMALL_LINEAR
  return true;
#else
  return false;
#endif
}

void check_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2, "weight [N, K] bf16 on CPU");
  TORCH_CHECK(w.size(1) > 0 && w.size(1) % 2 == 0, "K must be even and positive");
}

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(supported(), "small_linear: built without AVX512-BF16");
  check_weight(weight);
  const int64_t n = weight.size(0), k = weight.size(1), pairs = k / 2, blocks = (n + kBlock - 1) / kBlock;
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::zeros({blocks, pairs, kBlock, 2}, weight.options());
  const at::BFloat16* src = w.const_data_ptr<at::BFloat16>();
  at::BFloat16* dst = out.mutable_data_ptr<at::BFloat16>();
  softserve::parallel_range(n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t col = begin; col < end; ++col) {
      at::BFloat16* block = dst + (col / kBlock) * pairs * kBlock * 2 + (col % kBlock) * 2;
      for (int64_t p = 0; p < pairs; ++p) {
        block[p * kBlock * 2] = src[col * k + 2 * p];
        block[p * kBlock * 2 + 1] = src[col * k + 2 * p + 1];
      }
    }
  });
  return out;
}

#ifdef SOFTSERVE_SMALL_LINEAR
// rows [ROWS] x blocks [BLOCKS]: y[m, 16 z + j] for the BLOCKS column blocks starting at w
// (a block is pairs * 32 elements); `columns` of them are stored (the last block may be partial).
// `next`, if set: the next kTileBlocks blocks, fetched into L2 meanwhile.
template <int ROWS, int BLOCKS>
void tile(const at::BFloat16* x, int64_t ldx, const at::BFloat16* w, int64_t pairs, const float* bias,
          at::BFloat16* y, int64_t ldy, int64_t columns, const at::BFloat16* next) {
  __m512 acc[ROWS][BLOCKS];
  for (int m = 0; m < ROWS; ++m)
    for (int z = 0; z < BLOCKS; ++z) acc[m][z] = _mm512_setzero_ps();
  const int64_t block_stride = pairs * kBlock * 2;
  for (int64_t p = 0; p < pairs; ++p) {
    if (next) {
#pragma GCC unroll 4
      for (int z = 0; z < kTileBlocks; ++z)
        _mm_prefetch(reinterpret_cast<const char*>(next + z * block_stride + p * kBlock * 2), _MM_HINT_T1);
    }
    __m512bh wz[BLOCKS];
#pragma GCC unroll 4
    for (int z = 0; z < BLOCKS; ++z) wz[z] = (__m512bh)_mm512_loadu_si512(w + z * block_stride + p * kBlock * 2);
#pragma GCC unroll 6
    for (int m = 0; m < ROWS; ++m) {
      int32_t pair;  // the bf16 pair x[m, 2p..2p+1], low half first, as VDPBF16PS pairs them
      std::memcpy(&pair, x + m * ldx + 2 * p, sizeof pair);
      const __m512bh xm = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int z = 0; z < BLOCKS; ++z) acc[m][z] = _mm512_dpbf16_ps(acc[m][z], xm, wz[z]);
    }
  }
  for (int z = 0; z < BLOCKS; ++z) {
    const int64_t left = columns - kBlock * z;
    if (left <= 0) break;
    const __mmask16 mask = left >= kBlock ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + kBlock * z) : _mm512_setzero_ps();
    for (int m = 0; m < ROWS; ++m)
      _mm256_mask_storeu_epi16(y + m * ldy + kBlock * z, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[m][z], b)));
  }
}

using TileFn = void (*)(const at::BFloat16*, int64_t, const at::BFloat16*, int64_t, const float*, at::BFloat16*, int64_t, int64_t,
                        const at::BFloat16*);

template <int BLOCKS, int... R>
constexpr std::array<TileFn, sizeof...(R) + 1> tiles_of(std::integer_sequence<int, R...>) {
  return {nullptr, &tile<R + 1, BLOCKS>...};
}

// [blocks - 1][rows]: the tile for `blocks` column blocks and `rows` rows
const std::array<std::array<TileFn, kTileRows + 1>, kTileBlocks> kTiles = {
    tiles_of<1>(std::make_integer_sequence<int, kTileRows>{}), tiles_of<2>(std::make_integer_sequence<int, kTileRows>{}),
    tiles_of<3>(std::make_integer_sequence<int, kTileRows>{}), tiles_of<4>(std::make_integer_sequence<int, kTileRows>{})};
#endif

// x [..., K] bf16; packed from small_linear_pack of W [N, K]; bias [N] or None -> [..., N] bf16
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(supported(), "small_linear: built without AVX512-BF16");
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() >= 1, "x [..., K] bf16 on CPU");
  const int64_t k = x.size(-1), pairs = k / 2, blocks = (n + kBlock - 1) / kBlock;
  TORCH_CHECK(k > 0 && k % 2 == 0 && packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 && packed.size(0) == blocks &&
                  packed.size(1) == pairs && packed.size(2) == kBlock && packed.size(3) == 2 && packed.is_contiguous(),
              "packed must be small_linear_pack of a [N, K] weight");
  TORCH_CHECK(!bias || (bias->numel() == n && bias->device().is_cpu()), "bias [N]");
  const at::Tensor xc = x.contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = n;
  at::Tensor y = at::empty(sizes, x.options());
  const int64_t rows = xc.numel() / k;  // k > 0: checked above
  if (rows == 0 || n == 0) return y;
#ifdef SOFTSERVE_SMALL_LINEAR
  const at::Tensor bias_f = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* bp = bias ? bias_f.const_data_ptr<float>() : nullptr;
  const at::BFloat16* xp = xc.const_data_ptr<at::BFloat16>();
  const at::BFloat16* wp = packed.const_data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.mutable_data_ptr<at::BFloat16>();
  // rows split evenly into tiles of at most kTileRows (16 rows: 6 + 5 + 5)
  const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows, tile_rows = (rows + row_tiles - 1) / row_tiles;
  const int64_t block_elems = pairs * kBlock * 2;
  softserve::parallel_range(blocks, kTileBlocks, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kTileBlocks) {
      const int64_t count = std::min<int64_t>(kTileBlocks, end - b), columns = std::min<int64_t>(count * kBlock, n - b * kBlock);
      // With more than one row tile, the first tile streams these blocks from memory and the others
      // re-read them from cache: prefetching the next group meanwhile overlaps the stream with that
      // arithmetic (1.25x at 16 rows, measured). With one tile it only got in the stream's way.
      const at::BFloat16* next = rows > kTileRows && b + 2 * kTileBlocks <= end ? wp + (b + kTileBlocks) * block_elems : nullptr;
      for (int64_t m0 = 0; m0 < rows; m0 += tile_rows) {
        const int64_t m = std::min<int64_t>(tile_rows, rows - m0);
        kTiles[count - 1][m](xp + m0 * k, k, wp + b * block_elems, pairs, bp ? bp + b * kBlock : nullptr,
                             yp + m0 * n + b * kBlock, n, columns, next);
      }
    }
  });
#endif
  return y;
}

// The compiled forward's product where the kernel has a copy of the weight: up to `max_small_rows` rows
// the kernel, more (prefill chunks) oneDNN's product on its packed weight. The same choice as
// packed_linear.py's `_product`, made here so that the graph calls C++ directly: through the Python
// custom op each of a step's 121 products paid ~7 us of wrappers (~0.8 ms of a 15 ms decode step).
at::Tensor small_or_packed_linear(const at::Tensor& x, const at::Tensor& small, const at::Tensor& packed, int64_t n,
                                  const std::optional<at::Tensor>& bias, int64_t max_small_rows) {
  const int64_t k = x.dim() > 0 ? x.size(-1) : 0;
  const int64_t rows = k > 0 ? x.numel() / k : 0;
  if (rows <= max_small_rows) return small_linear(x, small, n, bias);
  static const c10::OperatorHandle onednn = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, bias ? c10::IValue(*bias) : c10::IValue(), c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  onednn.callBoxed(&stack);
  return stack[0].toTensor();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(softserve_native, m) {
  m.def("small_linear_supported() -> bool");
  m.def("small_linear_pack(Tensor weight) -> Tensor");
  m.def("small_linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.def("small_or_packed_linear(Tensor x, Tensor small, Tensor packed, int n, Tensor? bias, int max_small_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(softserve_native, CatchAll, m) {
  m.impl("small_linear_supported", &supported);
}

TORCH_LIBRARY_IMPL(softserve_native, CPU, m) {
  m.impl("small_linear_pack", &pack);
  m.impl("small_linear", &small_linear);
  m.impl("small_or_packed_linear", &small_or_packed_linear);
}

// oneDNN's packed weight is an MkldnnCPU tensor, and dispatch goes by the most specific argument
TORCH_LIBRARY_IMPL(softserve_native, MkldnnCPU, m) {
  m.impl("small_or_packed_linear", &small_or_packed_linear);
}
