// The fused fp32 4-bit GEMM (qgemm_f32.h): out = x @ W'^T (forward) or x @ W' (dx), W'
// decoded from its packed codes straight into the micro-kernel's panels. Compiled with
// QPEFT_ISA_FLAGS_avx2 (CMakeLists.txt) and entered only at the avx2 level or above
// (qgemm_f32.cpp checks).
//
// Blocking (the GotoBLAS/BLIS loop nest, with the pack of B replaced by the decode): a
// task owns a block of col_block output columns; per reduction panel of red_block
// elements it decodes the panel's W' (kc x col_block, fp32) into strips of 16 columns x kc
// (one 64-byte row per reduction step: 256 KiB for the default 512 x 128, in L2), then
// runs every 6-row block of x against every strip: a 6 x 16 micro-kernel, 12 ymm
// accumulators, per reduction step two strip loads, six broadcasts of x and 12 FMAs. The
// 6 x kc slice of x a row block reads (12 KiB) stays in L1 across the strips. So W' is
// never written beyond the panel, each weight is decoded once per call, and x needs no
// packing (its rows are read in place, any m).
//
// The decode of a row segment equals dequantize_4bit in fp32 bit for bit: per element
// table[c] * scale (one vmulps, no FMA), scale the block's absmax (double-quantized:
// format.h's nested_absmax_value); 8 elements at a time (one 4-byte load, vpsrlvd, two
// vpermps blended on code bit 3) from the first 8-aligned element on when blocks hold
// whole groups of 8, element by element otherwise; the block index is a shift for a
// power-of-two blocksize, and the scale is recomputed only where a block starts (a 64-bit
// division per row segment and block cost as much as the decode itself at M = 16). The
// forward's rows are decoded 8 at a time and transposed 8 x 8 into the strips (scalar
// strided stores before: 1.3 ns per weight). The LoRA term is then added weight by weight: w' = w +
// sum_q L[row, q] R[q, col] as r FMAs, q ascending (the merge of the panel path,
// qpeft/backends/cpu/qlora.py `merges_lora`, with one rounding per product fewer).
//
// Summation: each output is an fp32 dot product over the reduction, summed per lane of
// the accumulator in kc-long FMA chains; the chains of consecutive panels are added to
// out (or, with accumulate or after the first panel, to what out holds). At most red +
// red / red_block + 1 roundings per product: within the fp32 bound the tests derive for
// any order (tests/test_qgemm_f32.py).
#define QPEFT_HD static inline  // internal linkage for format.h in this TU (see format.h)
#include <qpeft/format.h>

#include <immintrin.h>

#include <cstring>

#include "qgemm_f32.h"

namespace qpeft {
namespace cpu {
namespace {

constexpr int64_t kMr = kF32Mr;
constexpr int64_t kNr = kF32Nr;

float block_scale(const F32GemmArgs& g, int64_t b) {
  if (g.absmax_q == nullptr) return g.absmax[b];
  const int64_t group = g.nested_shift >= 0 ? b >> g.nested_shift : b / g.nested_blocksize;
  return nested_absmax_value(g.absmax_q[b], g.nested_code, g.nested_absmax[group], g.offset);
}

int64_t block_of(const F32GemmArgs& g, int64_t e) {
  return g.blocksize_shift >= 0 ? e >> g.blocksize_shift : e / g.blocksize;
}

// dst[0, len) = W'[row, c0 .. c0 + len): decoded, then the LoRA term added.
void decode_row(const F32GemmArgs& g, int64_t row, int64_t c0, int64_t len, float* dst) {
  const float* table = g.quant_type == kNF4 ? kNF4Values : kFP4Values;
  const int64_t bs = g.blocksize;
  int64_t e = row * g.k + c0;  // flat element index of W
  int64_t i = 0;
  if (bs % 8 == 0) {
    const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
    const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    // element by element up to an 8-aligned flat index, then 8 at a time
    for (; i < len && (e & 7) != 0; ++i, ++e) {
      const uint8_t byte = g.packed[e >> 1];
      dst[i] = table[(e & 1) ? (byte & 0x0f) : (byte >> 4)] * block_scale(g, block_of(g, e));
    }
    // 8 at a time; e starts 8-aligned and blocks hold whole groups of 8, so the scale
    // changes exactly when e reaches the next block's start (no division per group)
    int64_t block = block_of(g, e), next = (block + 1) * bs;
    __m256 s = _mm256_set1_ps(block_scale(g, block));
    for (; i + 8 <= len; i += 8, e += 8) {
      if (e == next) {
        s = _mm256_set1_ps(block_scale(g, ++block));
        next += bs;
      }
      int32_t four;
      std::memcpy(&four, g.packed + (e >> 1), sizeof(four));
      const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(four), shifts);
      const __m256 t =
          _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx),
                           _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      _mm256_storeu_ps(dst + i, _mm256_mul_ps(t, s));
    }
  }
  for (; i < len; ++i, ++e) {
    const uint8_t byte = g.packed[e >> 1];
    dst[i] = table[(e & 1) ? (byte & 0x0f) : (byte >> 4)] * block_scale(g, block_of(g, e));
  }
  if (g.rank == 0) return;
  const float* l = g.lora_l + row * g.rank;
  const float* r = g.lora_r + c0;
  i = 0;
  for (; i + 8 <= len; i += 8) {
    __m256 v = _mm256_loadu_ps(dst + i);
    for (int64_t q = 0; q < g.rank; ++q)
      v = _mm256_fmadd_ps(_mm256_set1_ps(l[q]), _mm256_loadu_ps(r + q * g.k + i), v);
    _mm256_storeu_ps(dst + i, v);
  }
  for (; i < len; ++i) {
    float v = dst[i];
    for (int64_t q = 0; q < g.rank; ++q) v = __builtin_fmaf(l[q], r[q * g.k + i], v);
    dst[i] = v;
  }
}

// dst[c * ldd + r] = src[r * lds + c] for r, c < 8 (dst rows 32-byte aligned).
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  // t[0] = 00 10 01 11 | 04 14 05 15, t[1] = 02 12 03 13 | ..., t[2] = 20 30 21 31 | ...
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // 00 10 20 30 | 04 14 24 34
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);  // 01 11 21 31 | 05 ...
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_store_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_store_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

// out[0 .. MR, 0 .. cols_here) (+)= x[0 .. MR, 0 .. kc) @ strip (kc x 16, row-major).
// (acc0 / acc1 as two 1-D arrays indexed in fully unrolled loops: GCC 12 kept a 2-D
// acc[MR][2] in memory as well, storing all 12 accumulators every reduction step.)
template <int MR>
void micro(const float* x, int64_t ldx, const float* strip, int64_t kc, float* out, int64_t ldo,
           int64_t cols_here, bool add) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  for (int64_t p = 0; p < kc; ++p) {
    const __m256 b0 = _mm256_load_ps(strip + p * kNr);
    const __m256 b1 = _mm256_load_ps(strip + p * kNr + 8);
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * ldx + p);
      acc0[i] = _mm256_fmadd_ps(a, b0, acc0[i]);
      acc1[i] = _mm256_fmadd_ps(a, b1, acc1[i]);
    }
  }
  if (cols_here == kNr) {
#pragma GCC unroll 6
    for (int i = 0; i < MR; ++i) {
      float* o = out + i * ldo;
      if (add) {
        acc0[i] = _mm256_add_ps(_mm256_loadu_ps(o), acc0[i]);
        acc1[i] = _mm256_add_ps(_mm256_loadu_ps(o + 8), acc1[i]);
      }
      _mm256_storeu_ps(o, acc0[i]);
      _mm256_storeu_ps(o + 8, acc1[i]);
    }
    return;
  }
  alignas(32) float tile[kNr];
#pragma GCC unroll 6
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(tile, acc0[i]);
    _mm256_store_ps(tile + 8, acc1[i]);
    float* o = out + i * ldo;
    for (int64_t c = 0; c < cols_here; ++c) o[c] = add ? o[c] + tile[c] : tile[c];
  }
}

using MicroFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                         bool);
constexpr MicroFn kMicro[kMr + 1] = {nullptr,  micro<1>, micro<2>, micro<3>,
                                     micro<4>, micro<5>, micro<6>};

}  // namespace

int64_t f32gemm_workspace_bytes(const F32GemmArgs& g) {
  // the panel (red_block x col_block, strips of 16 columns; the extra block's columns
  // rounded up to 16 fit when extra_cols <= col_block, which the entry ensures) and the
  // decoded rows (forward: 8 x red_block; dx: one row of col_block)
  const int64_t panel = g.red_block * g.col_block;
  const int64_t row = 8 * g.red_block > g.col_block ? 8 * g.red_block : g.col_block;
  return ((panel + row) * 4 + 63) / 64 * 64;
}

void f32gemm_cols(const F32GemmArgs& g, int64_t b0, int64_t b1, void* ws) {
  const int64_t red = g.dx ? g.n : g.k, cols = g.dx ? g.k : g.n;
  const int64_t main_blocks = (cols + g.col_block - 1) / g.col_block;
  const int64_t ne = g.extra_cols;
  float* panel = static_cast<float*>(ws);
  float* row = panel + g.red_block * g.col_block;
  for (int64_t b = b0; b < b1; ++b) {
    // a block of out's columns [j0, j1), or (b == main_blocks) the extra columns [0, ne)
    const bool extra = b >= main_blocks;
    const int64_t j0 = extra ? 0 : b * g.col_block;
    const int64_t j1 = extra ? ne : (j0 + g.col_block < cols ? j0 + g.col_block : cols);
    float* out = extra ? g.out2 : g.out;
    const int64_t ldo = extra ? ne : cols;
    const int64_t strips = (j1 - j0 + kNr - 1) / kNr;
    for (int64_t p0 = 0; p0 < red; p0 += g.red_block) {
      const int64_t kc = p0 + g.red_block < red ? g.red_block : red - p0;
      // decode this panel of the B operand into strips: strip s, step p, lane j holds
      // B[p0 + p, j0 + 16 s + j] (forward B[k][n] = W'[n][k], B[k][e] = extra[e][k];
      // dx B[n][k] = W'[n][k], B[n][e] = extra[n][e])
      if (!g.dx) {
        // 8 rows of B^T (W' rows, or extra rows) at a time into `row` (8 x kc), then 8 x 8
        // transposes into the strips' halves: lane j of a strip is row j0 + 16 s + j
        for (int64_t j = j0; j < j0 + strips * kNr; j += 8) {
          for (int64_t r = 0; r < 8; ++r) {
            float* dst = row + r * kc;
            if (j + r >= j1)
              std::memset(dst, 0, static_cast<size_t>(kc) * 4);  // padding columns
            else if (extra)
              std::memcpy(dst, g.extra + (j + r) * g.k + p0, static_cast<size_t>(kc) * 4);
            else
              decode_row(g, j + r, p0, kc, dst);
          }
          float* strip = panel + ((j - j0) / kNr) * kc * kNr + (j - j0) % kNr;
          int64_t p = 0;
          for (; p + 8 <= kc; p += 8) transpose8(row + p, kc, strip + p * kNr, kNr);
          for (; p < kc; ++p)
            for (int64_t r = 0; r < 8; ++r) strip[p * kNr + r] = row[r * kc + p];
        }
      } else {
        std::memset(row + (j1 - j0), 0, static_cast<size_t>(strips * kNr - (j1 - j0)) * 4);
        for (int64_t p = 0; p < kc; ++p) {
          if (extra)
            std::memcpy(row, g.extra + (p0 + p) * ne, static_cast<size_t>(ne) * 4);
          else
            decode_row(g, p0 + p, j0, j1 - j0, row);
          for (int64_t s = 0; s < strips; ++s)
            std::memcpy(panel + (s * kc + p) * kNr, row + s * kNr, kNr * 4);
        }
      }
      const bool add = (g.accumulate && !extra) || p0 > 0;
      for (int64_t i0 = 0; i0 < g.m; i0 += kMr) {
        const int64_t mr = g.m - i0 < kMr ? g.m - i0 : kMr;
        const float* xs = g.x + i0 * red + p0;
        for (int64_t s = 0; s < strips; ++s) {
          const int64_t c0 = j0 + s * kNr;
          kMicro[mr](xs, red, panel + s * kc * kNr, kc, out + i0 * ldo + c0, ldo,
                     j1 - c0 < kNr ? j1 - c0 : kNr, add);
        }
      }
    }
  }
}

namespace {

// out[j0 + j, c0 + c] = sum_i gs[j0 + j][i] q[i][c0 + c] for j < MR, c < cols_here <= 16:
// 2 x MR accumulators, per i two loads of q (masked at the right edge), MR broadcasts.
template <int MR>
void grad_micro(const LoraGradArgs& a, int64_t j0, int64_t c0, int64_t cols_here) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 6
  for (int j = 0; j < MR; ++j) acc0[j] = acc1[j] = _mm256_setzero_ps();
  const float* q = a.q + c0;
  const float* g = a.gs + j0 * a.m;
  const int64_t m = a.m, ldq = a.cols;
  if (cols_here == kNr) {
    for (int64_t i = 0; i < m; ++i) {
      const __m256 b0 = _mm256_loadu_ps(q + i * ldq), b1 = _mm256_loadu_ps(q + i * ldq + 8);
#pragma GCC unroll 6
      for (int j = 0; j < MR; ++j) {
        const __m256 s = _mm256_broadcast_ss(g + j * m + i);
        acc0[j] = _mm256_fmadd_ps(s, b0, acc0[j]);
        acc1[j] = _mm256_fmadd_ps(s, b1, acc1[j]);
      }
    }
  } else {
    alignas(32) int32_t lanes[kNr];
    for (int c = 0; c < kNr; ++c) lanes[c] = c < cols_here ? -1 : 0;
    const __m256i m0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
    const __m256i m1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes + 8));
    for (int64_t i = 0; i < m; ++i) {
      const __m256 b0 = _mm256_maskload_ps(q + i * ldq, m0);
      const __m256 b1 = _mm256_maskload_ps(q + i * ldq + 8, m1);
#pragma GCC unroll 6
      for (int j = 0; j < MR; ++j) {
        const __m256 s = _mm256_broadcast_ss(g + j * m + i);
        acc0[j] = _mm256_fmadd_ps(s, b0, acc0[j]);
        acc1[j] = _mm256_fmadd_ps(s, b1, acc1[j]);
      }
    }
  }
  alignas(32) float tile[kNr];
#pragma GCC unroll 6
  for (int j = 0; j < MR; ++j) {
    _mm256_store_ps(tile, acc0[j]);
    _mm256_store_ps(tile + 8, acc1[j]);
    if (a.transpose_out) {
      for (int64_t c = 0; c < cols_here; ++c) a.out[(c0 + c) * a.r + j0 + j] = tile[c];
    } else {
      std::memcpy(a.out + (j0 + j) * a.cols + c0, tile, static_cast<size_t>(cols_here) * 4);
    }
  }
}

using GradMicroFn = void (*)(const LoraGradArgs&, int64_t, int64_t, int64_t);
constexpr GradMicroFn kGradMicro[kMr + 1] = {nullptr,       grad_micro<1>, grad_micro<2>,
                                             grad_micro<3>, grad_micro<4>, grad_micro<5>,
                                             grad_micro<6>};

}  // namespace

void lora_grad_cols(const LoraGradArgs& a, int64_t c0, int64_t c1) {
  for (int64_t c = c0; c < c1; c += kNr) {
    const int64_t here = c1 - c < kNr ? c1 - c : kNr;
    for (int64_t j = 0; j < a.r; j += kMr) kGradMicro[a.r - j < kMr ? a.r - j : kMr](a, j, c, here);
  }
}

}  // namespace cpu
}  // namespace qpeft
