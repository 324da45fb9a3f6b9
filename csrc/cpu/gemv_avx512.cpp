// The AVX-512 4-bit GEMV (see gemv.cpp). Compiled with the avx512 level's flags and
// entered only at that level or above (isa_tables.h).
//
// Each row of W holds whole quantization blocks of >= 32 elements (the dispatcher
// checks k % blocksize == 0 and blocksize >= 32). Per 16 packed bytes: 32 codes,
// decoded 16 at a time to the unscaled table values with one vpermps (the 16-entry
// table is one register), then one FMA per row of x. Every row of x (m <= 8) shares
// one pass over W: two block accumulators per row (even and odd 16-element groups:
// two independent FMA chains, so M=1 is not bound by the FMA latency) plus one total
// per row make 24 of the 32 zmm registers at m = 8.
//
// Rounding differs from the scalar kernel (16 lanes, FMA, a 2-chain block sum and a
// 16-lane horizontal sum) exactly as the AVX2 kernel's does; the bound of
// tests/_helpers.py (cpu_gemv_roundings) covers both: within a block each product
// reaches the block sum through at most blocksize/32 + 1 roundings, then 1 for the
// scaling FMA per block, and 4 for the horizontal sum.
#define QPEFT_HD static inline  // internal linkage for format.h in this TU (see format.h)
#include <qpeft/format.h>

#include <immintrin.h>

#include "gemv_kernels.h"
#include "gemv_scales.h"

namespace qpeft {
namespace cpu {
namespace {

// 8 packed bytes -> the table values of their 16 codes, in element order: qword j of
// the index holds byte j; dword 2j = byte >> 4, dword 2j+1 = byte (vpermps reads the
// low 4 bits only: the low nibble).
inline __m512 decode16(const uint8_t* src, __m512 table) {
  const __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  return _mm512_permutexvar_ps(_mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(q, 32)),
                               table);
}

// Rows 0 .. MG-1 of x against row `row` of W.
template <int MG>
void row_all(const Gemv4Args& a, int64_t row, __m512 table) {
  const int64_t k = a.k, bs = a.blocksize;
  const uint8_t* src = a.packed + ((row * k) >> 1);
  const float* x0 = a.x;
  __m512 total[MG];
  for (int g = 0; g < MG; ++g) total[g] = _mm512_setzero_ps();
  BlockScales scales(a, (row * k) / bs);
  for (int64_t j0 = 0; j0 < k; j0 += bs) {
    __m512 acc0[MG], acc1[MG];
    for (int g = 0; g < MG; ++g) acc0[g] = acc1[g] = _mm512_setzero_ps();
    for (int64_t j = j0; j < j0 + bs; j += 32, src += 16) {
      const __m512 w0 = decode16(src, table), w1 = decode16(src + 8, table);
      for (int g = 0; g < MG; ++g) {
        const float* x = x0 + g * k + j;
        acc0[g] = _mm512_fmadd_ps(_mm512_loadu_ps(x), w0, acc0[g]);
        acc1[g] = _mm512_fmadd_ps(_mm512_loadu_ps(x + 16), w1, acc1[g]);
      }
    }
    const __m512 s = _mm512_set1_ps(scales.next());
    for (int g = 0; g < MG; ++g)
      total[g] = _mm512_fmadd_ps(_mm512_add_ps(acc0[g], acc1[g]), s, total[g]);
  }
  for (int g = 0; g < MG; ++g) a.out[g * a.n + row] = _mm512_reduce_add_ps(total[g]);
}

}  // namespace

void gemv4_avx512(const Gemv4Args& a, int64_t n0, int64_t n1) {
  const __m512 table = _mm512_loadu_ps(a.quant_type == kNF4 ? kNF4Values : kFP4Values);
  for (int64_t row = n0; row < n1; ++row) {
    switch (a.m) {
      case 1:
        row_all<1>(a, row, table);
        break;
      case 2:
        row_all<2>(a, row, table);
        break;
      case 3:
        row_all<3>(a, row, table);
        break;
      case 4:
        row_all<4>(a, row, table);
        break;
      case 5:
        row_all<5>(a, row, table);
        break;
      case 6:
        row_all<6>(a, row, table);
        break;
      case 7:
        row_all<7>(a, row, table);
        break;
      default:  // 8 = kGemvMaxRows, checked by the entry point
        row_all<8>(a, row, table);
        break;
    }
  }
}

}  // namespace cpu
}  // namespace qpeft
