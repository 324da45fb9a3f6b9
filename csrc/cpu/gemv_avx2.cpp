// The AVX2/FMA 4-bit GEMV (see gemv.cpp). Compiled with -mavx2 -mfma -mf16c and only
// entered at the avx2 level or above (isa_tables.h; cpu_info.cpp detects the level).
//
// Each row of W holds whole quantization blocks (k % blocksize == 0, blocksize >= 32), so
// it splits into groups of 32 codes (16 packed bytes). The decode of a group is a byte-table
// lookup in shuffles that run on two ports: the 16 bytes go to both 128-bit lanes (one
// broadcast load), one vpsrlvd + vpand leave the low nibbles (odd elements) in the low lane
// and the high nibbles (even elements) in the high lane, four vpshufb look up the four bytes
// of each code's fp32 table value (one 16-byte table per byte), and four vpunpck*bw plus
// four vpunpck*wd assemble them into 32 fp32 values: 12 shuffles per 32 codes. (The kernel
// before spent two cross-lane vpermps and a blend per 8 codes, into a single FMA chain per
// row of x: at M = 1 it decoded 5.1 G weights/s on a Zen 3 EPYC, this one about 9.)
//
// The assembled values come out in a fixed order: within each 8 elements, the 4 odd ones,
// then the 4 even ones. The kernel reorders x to match once per call (x_perm below), so the
// dot product needs no shuffle back. Each row of x sums its block over CH accumulators
// (the 4 vectors of a group go to accumulators f % CH): MG rows x CH chains of FMAs are
// in flight, so the FMA latency does not bound the loop at M = 1. The block's sum is then
// scaled by its absmax (sum_b absmax_b * sum_{k in b} x_k t_k, as the scalar kernel).
// Up to four rows of x share one decode; more rows run as further passes over the same row
// of W, which is then in L1 (2 KiB for k = 4096).
#define QPEFT_HD static inline  // internal linkage for format.h in this TU (see format.h)
#include <qpeft/format.h>

#include <immintrin.h>

#include <cstring>

#include "gemv_kernels.h"
#include "gemv_scales.h"
#include "gemv_scratch.h"

namespace qpeft {
namespace cpu {
namespace {

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The byte planes of a 16-entry fp32 table, each repeated in both 128-bit lanes.
struct Tables {
  __m256i plane[4];
};

Tables byte_planes(const float* table) {
  alignas(16) uint8_t bytes[4][16];
  for (int v = 0; v < 16; ++v) {
    uint32_t bits;
    std::memcpy(&bits, table + v, sizeof(bits));
    for (int b = 0; b < 4; ++b) bytes[b][v] = static_cast<uint8_t>(bits >> (8 * b));
  }
  Tables t;
  for (int b = 0; b < 4; ++b)
    t.plane[b] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<__m128i*>(bytes[b])));
  return t;
}

thread_local XScratch t_xp;  // x in the decode's order (gemv_scratch.h)

// x reordered to the decode's order: per 8 elements, x1 x3 x5 x7 x0 x2 x4 x6.
void x_perm(const float* x, int64_t len, float* out) {
  for (int64_t j = 0; j < len; j += 8)
    for (int d = 0; d < 4; ++d) {
      out[j + d] = x[j + 2 * d + 1];
      out[j + 4 + d] = x[j + 2 * d];
    }
}

// Rows i0 .. i0+MG-1 of x (already in decode order, xp) against row `row` of W.
template <int MG, int CH>
void row_group(const Gemv4Args& a, const float* xp, int64_t row, int64_t i0, const Tables& t) {
  const int64_t k = a.k, bs = a.blocksize;
  const uint8_t* src = a.packed + ((row * k) >> 1);
  const float* x[MG];
  for (int g = 0; g < MG; ++g) x[g] = xp + (i0 + g) * k;
  __m256 total[MG];
  for (int g = 0; g < MG; ++g) total[g] = _mm256_setzero_ps();
  const __m256i nibble_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  BlockScales scales(a, (row * k) / bs);
  for (int64_t j0 = 0; j0 < k; j0 += bs) {
    // CH accumulator sets as separate arrays picked at compile time (one 2-D array indexed
    // by f % CH stayed in memory: GCC 12 stored and reloaded the M = 1 accumulators every
    // iteration, a store-forward in each FMA chain)
    __m256 acc0[MG], acc1[MG], acc2[MG], acc3[MG];
    for (int g = 0; g < MG; ++g) acc0[g] = acc1[g] = acc2[g] = acc3[g] = _mm256_setzero_ps();
    __m256(&for1)[MG] = CH >= 2 ? acc1 : acc0;
    __m256(&for2)[MG] = CH == 4 ? acc2 : acc0;
    __m256(&for3)[MG] = CH == 4 ? acc3 : (CH == 2 ? acc1 : acc0);
    for (int64_t j = j0; j < j0 + bs; j += 32, src += 16) {
      // byte i of the low lane: code of element 2i + 1; of the high lane: of element 2i
      const __m256i packed =
          _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(packed, nibble_shift), low4);
      const __m256i b0 = _mm256_shuffle_epi8(t.plane[0], codes);
      const __m256i b1 = _mm256_shuffle_epi8(t.plane[1], codes);
      const __m256i b2 = _mm256_shuffle_epi8(t.plane[2], codes);
      const __m256i b3 = _mm256_shuffle_epi8(t.plane[3], codes);
      const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
      const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
      // w_f, lane L, dword d: byte i = 4f + d of lane L, element 8f + 2d + (1 - L)
      const __m256 w0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
      const __m256 w1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
      const __m256 w2 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
      const __m256 w3 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
      for (int g = 0; g < MG; ++g) {
        acc0[g] = _mm256_fmadd_ps(_mm256_loadu_ps(x[g] + j), w0, acc0[g]);
        for1[g] = _mm256_fmadd_ps(_mm256_loadu_ps(x[g] + j + 8), w1, for1[g]);
        for2[g] = _mm256_fmadd_ps(_mm256_loadu_ps(x[g] + j + 16), w2, for2[g]);
        for3[g] = _mm256_fmadd_ps(_mm256_loadu_ps(x[g] + j + 24), w3, for3[g]);
      }
    }
    for (int g = 0; g < MG; ++g) {  // pairwise
      if constexpr (CH == 4) {
        acc0[g] = _mm256_add_ps(_mm256_add_ps(acc0[g], acc1[g]), _mm256_add_ps(acc2[g], acc3[g]));
      } else if constexpr (CH == 2) {
        acc0[g] = _mm256_add_ps(acc0[g], acc1[g]);
      } else {
        static_assert(CH == 1, "CH is 1, 2 or 4");
      }
    }
    const __m256 s = _mm256_set1_ps(scales.next());
    for (int g = 0; g < MG; ++g) total[g] = _mm256_fmadd_ps(acc0[g], s, total[g]);
  }
  for (int g = 0; g < MG; ++g) a.out[(i0 + g) * a.n + row] = hsum8(total[g]);
}

}  // namespace

void gemv4_avx2(const Gemv4Args& a, int64_t n0, int64_t n1) {
  const Tables t = byte_planes(a.quant_type == kNF4 ? kNF4Values : kFP4Values);
  float* xp = t_xp.get(a.m * a.k);  // m <= 8 rows (gemv.cpp checks)
  for (int64_t i = 0; i < a.m; ++i) x_perm(a.x + i * a.k, a.k, xp + i * a.k);
  for (int64_t row = n0; row < n1; ++row) {
    int64_t i = 0;
    for (; i + 4 <= a.m; i += 4) row_group<4, 1>(a, xp, row, i, t);
    switch (a.m - i) {
      case 3:
        row_group<3, 1>(a, xp, row, i, t);
        break;
      case 2:
        row_group<2, 2>(a, xp, row, i, t);
        break;
      case 1:
        row_group<1, 4>(a, xp, row, i, t);
        break;
      default:
        break;
    }
  }
}

}  // namespace cpu
}  // namespace qpeft
