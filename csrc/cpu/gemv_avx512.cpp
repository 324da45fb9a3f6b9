// The AVX-512 4-bit GEMV (see gemv.cpp). Compiled with the avx512 level's flags and
// entered only at that level or above (isa_tables.h).
//
// Each row of W holds whole quantization blocks of >= 32 elements (the dispatcher
// checks k % blocksize == 0 and blocksize >= 32), so every 16-element group of a row
// (8 packed bytes) lies in one block. Per group, 3 vector uops besides the FMA per row
// of x (docs/design.md, "CPU ISA dispatch"):
//   - vpbroadcastq of the 8 bytes to all 8 qwords (a load-port uop only);
//   - vpsrlvd: dword lane 2q shifts the low dword (bytes 0-3, elements 0-7) so that the
//     nibble of element q lands in bits 0-3, lane 2q+1 the high dword (bytes 4-7) so that
//     element 8 + q does (the same shift count for both);
//   - vpermps of the block's scaled table, which reads bits 0-3 of each index only.
// So lane 2q holds w[q] and lane 2q+1 w[8 + q]: x is interleaved the same way once per
// call (xp below), and each group is one FMA per row of x against 16 contiguous floats.
//
// The scaled table is the 16 products fl(table[c] * absmax_b), one vmulps per block: the
// same single rounding as dequantize_4bit's, so every decoded weight equals the
// reference's dequantized weight bit for bit, and only the summation rounds (the kernels
// of the lower levels instead factor absmax out of each block's sum). The block scales
// are computed 16 blocks at a time (double quantization: a gather of the 8-bit code
// values, then the same multiply and add as nested_absmax_value).
//
// Summation: each row of x keeps CH accumulators (groups g, g + CH, ... chain into
// accumulator g % CH) over a segment of up to 16 blocks, added pairwise into the row's
// total at the segment's end, then a 16-lane horizontal sum. M = 1 needs 4 chains (an
// FMA's latency is 4 cycles, a group ~1.5) where a block has 4 groups; from M = 2 on the
// rows give the independent chains (2 each). Each product thus reaches the result through
// at most blocksize / CH + 2 + K / (16 blocksize) + 4 roundings, within cpu_gemv_roundings
// (qpeft/testing.py), whose bound also holds the lower levels' factored sums.
#define QPEFT_HD static inline  // internal linkage for format.h in this TU (see format.h)
#include <qpeft/format.h>

#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <new>

#include "gemv_kernels.h"
#include "gemv_scratch.h"

// GCC <= 13's mask-less shuffle intrinsics pass their own _mm512_undefined_* operand
// (self-initialized), which -Wuninitialized reports once inlined here: a false positive
// inside the compiler's header (as in qgemm_avx512bf16.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qpeft {
namespace cpu {
namespace {

// x in the lane order of the decode, per thread (gemv_scratch.h).
thread_local XScratch t_xp;

// dword lanes 2q, 2q+1 <- 8 bytes >> kShift[q]: element q (bytes 0-3) and 8 + q (bytes 4-7);
// element e of a byte pair sits in the high nibble when e is even.
inline __m512i group_shifts() {
  return _mm512_setr_epi32(4, 4, 0, 0, 12, 12, 8, 8, 20, 20, 16, 16, 28, 28, 24, 24);
}

// lane 2q <- x[q], lane 2q + 1 <- x[8 + q]
inline __m512i interleave_index() {
  return _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
}

// The sum of the 16 lanes: a 4-level tree.
inline float hsum16(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0x4e));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, 0xb1));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4e));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xb1));
  return _mm512_cvtss_f32(v);
}

inline __m512 decode16(const uint8_t* src, __m512i shifts, __m512 table_s) {
  int64_t q;
  std::memcpy(&q, src, sizeof(q));
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_set1_epi64(q), shifts), table_s);
}

// The scales of blocks b0 .. b0 + cnt - 1 (cnt in [1, 16]) into lanes 0 .. cnt - 1 of out.
// Double quantization: nested_code[q] * nested_absmax[g] + offset, two roundings as
// nested_absmax_value; `group`/`in_group` is the cursor of block b0 (BlockScales' logic),
// advanced past the cnt blocks.
inline void block_scales16(const Gemv4Args& a, int64_t b0, int cnt, int64_t& group,
                           int64_t& in_group, float* out) {
  const __mmask16 m = static_cast<__mmask16>(cnt >= 16 ? 0xffffu : ((1u << cnt) - 1u));
  if (a.absmax_q == nullptr) {
    _mm512_storeu_ps(out, _mm512_maskz_loadu_ps(m, a.absmax + b0));
    return;
  }
  const int64_t nbs = a.nested_blocksize;
  if (nbs < 16) {  // several groups per 16 blocks: one at a time
    for (int i = 0; i < cnt; ++i) {
      out[i] =
          nested_absmax_value(a.absmax_q[b0 + i], a.nested_code, a.nested_absmax[group], a.offset);
      if (++in_group == nbs) {
        in_group = 0;
        ++group;
      }
    }
    return;
  }
  const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, a.absmax_q + b0));
  const __m512 code = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, q, a.nested_code, 4);
  __m512 na = _mm512_set1_ps(a.nested_absmax[group]);
  const int64_t left = nbs - in_group;  // blocks left in this group, >= 1
  if (left < cnt) {                     // lanes left .. cnt - 1 are in the next group (nbs >= 16)
    const __mmask16 next = static_cast<__mmask16>(m & ~((1u << left) - 1u));
    na = _mm512_mask_mov_ps(na, next, _mm512_set1_ps(a.nested_absmax[group + 1]));
    ++group;
    in_group = cnt - left;
  } else {
    in_group += cnt;
    if (in_group == nbs) {
      in_group = 0;
      ++group;
    }
  }
  _mm512_storeu_ps(out, _mm512_add_ps(_mm512_mul_ps(code, na), _mm512_set1_ps(a.offset)));
}

// Rows 0 .. MG-1 of x (interleaved, xp) against row `row` of W, CH accumulators per row.
// GPB: groups per block when known at compile time (4: blocksize 64, the default), else 0.
template <int MG, int CH, int GPB>
void row_all(const Gemv4Args& a, const float* xp, int64_t row, __m512 table) {
  const int64_t k = a.k, bs = a.blocksize;
  const int64_t groups = GPB > 0 ? GPB : bs / 16;  // per block, a multiple of CH
  const int64_t nb = k / bs;                       // blocks in the row
  const uint8_t* src = a.packed + ((row * k) >> 1);
  const __m512i shifts = group_shifts();
  __m512 acc[MG][CH], total[MG];
  for (int g = 0; g < MG; ++g) total[g] = _mm512_setzero_ps();
  int64_t b0 = (row * k) / bs;  // first block of the row
  int64_t group = 0, in_group = 0;
  if (a.absmax_q != nullptr) {
    group = b0 / a.nested_blocksize;
    in_group = b0 - group * a.nested_blocksize;
  }
  alignas(64) float scale[16];
  const float* x = xp;  // group j's 16 floats of x row g at x + 16 * (MG * j + g)
  for (int64_t done = 0; done < nb;) {
    const int cnt = nb - done < 16 ? static_cast<int>(nb - done) : 16;
    block_scales16(a, b0 + done, cnt, group, in_group, scale);
    for (int g = 0; g < MG; ++g)
      for (int c = 0; c < CH; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int t = 0; t < cnt; ++t) {
      const __m512 table_s = _mm512_mul_ps(table, _mm512_set1_ps(scale[t]));
      for (int64_t j = 0; j < groups; j += CH) {
        for (int c = 0; c < CH; ++c) {
          const __m512 w = decode16(src + 8 * c, shifts, table_s);
          for (int g = 0; g < MG; ++g)
            acc[g][c] = _mm512_fmadd_ps(_mm512_load_ps(x + 16 * (MG * c + g)), w, acc[g][c]);
        }
        src += 8 * CH;
        x += 16 * MG * CH;
      }
    }
    done += cnt;
    // the segment's chains, pairwise, into the row total: chains stay <= 16 blocks long
    for (int g = 0; g < MG; ++g) {
      for (int w = CH / 2; w >= 1; w /= 2)
        for (int c = 0; c < w; ++c) acc[g][c] = _mm512_add_ps(acc[g][c], acc[g][c + w]);
      total[g] = _mm512_add_ps(total[g], acc[g][0]);
    }
  }
  for (int g = 0; g < MG; ++g) a.out[g * a.n + row] = hsum16(total[g]);
}

template <int MG, int CH>
void rows(const Gemv4Args& a, const float* xp, int64_t n0, int64_t n1, __m512 table) {
  if (a.blocksize == 64) {
    for (int64_t row = n0; row < n1; ++row) row_all<MG, CH, 4>(a, xp, row, table);
  } else {
    for (int64_t row = n0; row < n1; ++row) row_all<MG, CH, 0>(a, xp, row, table);
  }
}

}  // namespace

void gemv4_avx512(const Gemv4Args& a, int64_t n0, int64_t n1) {
  if (n1 <= n0) return;
  const __m512 table = _mm512_loadu_ps(a.quant_type == kNF4 ? kNF4Values : kFP4Values);
  // x in the decode's lane order, the rows of each 16-element group together (k % 32 == 0)
  const int64_t k = a.k, m = a.m, groups = k / 16;
  float* xp = t_xp.get(m * k);
  const __m512i il = interleave_index();
  for (int64_t j = 0; j < groups; ++j)
    for (int64_t g = 0; g < m; ++g)
      _mm512_store_ps(xp + 16 * (m * j + g),
                      _mm512_permutexvar_ps(il, _mm512_loadu_ps(a.x + g * k + 16 * j)));
  switch (a.m) {
    case 1:
      // 4 chains where a block has at least 4 groups, else 2 (blocksize 32)
      if (a.blocksize >= 64)
        rows<1, 4>(a, xp, n0, n1, table);
      else
        rows<1, 2>(a, xp, n0, n1, table);
      break;
    case 2:
      rows<2, 2>(a, xp, n0, n1, table);
      break;
    case 3:
      rows<3, 2>(a, xp, n0, n1, table);
      break;
    case 4:
      rows<4, 2>(a, xp, n0, n1, table);
      break;
    case 5:
      rows<5, 2>(a, xp, n0, n1, table);
      break;
    case 6:
      rows<6, 2>(a, xp, n0, n1, table);
      break;
    case 7:
      rows<7, 2>(a, xp, n0, n1, table);
      break;
    default:  // 8 = kGemvMaxRows, checked by the entry point
      rows<8, 2>(a, xp, n0, n1, table);
      break;
  }
}

}  // namespace cpu
}  // namespace qpeft
