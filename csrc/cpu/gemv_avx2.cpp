// The AVX2/FMA 4-bit GEMV (see gemv.cpp). Compiled with -mavx2 -mfma -mf16c and only
// entered at the avx2 level or above (isa_tables.h; cpu_info.cpp detects the level).
//
// Each row of W holds whole quantization blocks (k % blocksize == 0). Per 4 packed bytes:
// 8 codes, spread to the 8 dword lanes by one vpbroadcastd (a load) and one vpsrlvd,
// decoded to the unscaled table values with two permutevar8x32 (codes 0-7 / 8-15)
// blended on code bit 3, then one FMA per row of x (the byte-unpacking and vpmovzxbd per
// 8 codes of the kernel before took a shuffle-port uop more).
// Up to four rows of x share one decode (4 block accumulators + 4 totals + 2 tables
// stay within the 16 ymm registers); more rows run as further passes over the same row
// of W, which is then in L1 (2 KiB for k = 4096).
#define QPEFT_HD static inline  // internal linkage for format.h in this TU (see format.h)
#include <qpeft/format.h>

#include <immintrin.h>

#include <cstring>

#include "gemv_kernels.h"
#include "gemv_scales.h"

namespace qpeft {
namespace cpu {
namespace {

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Rows i0 .. i0+MG-1 of x against row `row` of W.
template <int MG>
void row_group(const Gemv4Args& a, int64_t row, int64_t i0, __m256 tlo, __m256 thi) {
  const int64_t k = a.k, bs = a.blocksize;
  const uint8_t* src = a.packed + ((row * k) >> 1);
  const float* x[MG];
  for (int g = 0; g < MG; ++g) x[g] = a.x + (i0 + g) * k;
  __m256 total[MG];
  for (int g = 0; g < MG; ++g) total[g] = _mm256_setzero_ps();
  const __m256i shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
  BlockScales scales(a, (row * k) / bs);
  for (int64_t j0 = 0; j0 < k; j0 += bs) {
    __m256 acc[MG];
    for (int g = 0; g < MG; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t j = j0; j < j0 + bs; j += 8, src += 4) {
      // 4 bytes to every dword; lane i shifts element i's nibble (the high one of byte
      // i / 2 when i is even) to bits 0-3: vpermps reads bits 0-2, bit 3 picks the half
      int32_t four;
      std::memcpy(&four, src, sizeof(four));
      const __m256i idx = _mm256_srlv_epi32(_mm256_set1_epi32(four), shifts);
      const __m256 w =
          _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, idx), _mm256_permutevar8x32_ps(thi, idx),
                           _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
      for (int g = 0; g < MG; ++g) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(x[g] + j), w, acc[g]);
    }
    const __m256 s = _mm256_set1_ps(scales.next());
    for (int g = 0; g < MG; ++g) total[g] = _mm256_fmadd_ps(acc[g], s, total[g]);
  }
  for (int g = 0; g < MG; ++g) a.out[(i0 + g) * a.n + row] = hsum8(total[g]);
}

}  // namespace

void gemv4_avx2(const Gemv4Args& a, int64_t n0, int64_t n1) {
  const float* table = a.quant_type == kNF4 ? kNF4Values : kFP4Values;
  const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
  for (int64_t row = n0; row < n1; ++row) {
    int64_t i = 0;
    for (; i + 4 <= a.m; i += 4) row_group<4>(a, row, i, tlo, thi);
    switch (a.m - i) {
      case 3:
        row_group<3>(a, row, i, tlo, thi);
        break;
      case 2:
        row_group<2>(a, row, i, tlo, thi);
        break;
      case 1:
        row_group<1>(a, row, i, tlo, thi);
        break;
      default:
        break;
    }
  }
}

}  // namespace cpu
}  // namespace qpeft
