// The fused 4-bit GEMM of the avx512_bf16 level (qgemm_avx512bf16.h): out = x @ W^T
// with W decoded from its packed codes a tile of rows at a time and multiplied by
// vdpbf16ps. Compiled with QPEFT_ISA_FLAGS_avx512_bf16 (CMakeLists.txt) and entered only
// when cpu_info.cpp found AVX512-BF16 (qgemm_dpbf16.cpp checks).
//
// Per tile of kDpRowsPerTile (4) rows of W and chunk of up to kDpRedChunk (2048)
// reduction elements: the 4 row segments are decoded to bf16 into a 16 KiB scratch (stays
// in L1), zero-padded to a multiple of 32, and then every row block of x (4 rows at a
// time) runs a 4x4 micro-kernel over it: 16 zmm accumulators, each holding 16 fp32
// partial sums of one output (vdpbf16ps multiplies 16 bf16 pairs of W's row by the same
// 16 pairs of x's row), reduced to 16 sums by a transpose-add tree at the end of the chunk
// and added to out. So W's codes are read once, W is never written beyond the scratch,
// and the decode costs one pass per element however large M is.
//
// The decode equals dequantize_4bit to bf16 bit for bit: per block the 16 products
// table[c] * scale in fp32 (no FMA: -ffp-contract=off), rounded once to nearest even
// by integer SIMD (subnormals kept; the NaN rule only where the scale is not finite),
// looked up 32 codes per vpermw (the register-table decode of kernels_avx512.cpp,
// written again here: that TU's functions have internal linkage). Rows whose 32-element
// chunks may straddle a block or a byte (k % 32 != 0 or blocksize % 32 != 0) are decoded
// element by element with format.h's scalar conversion instead.
//
// Arithmetic of vdpbf16ps (Intel SDM): bf16 x bf16 products (exact in fp32), summed into
// fp32 with round-to-nearest-even regardless of MXCSR, bf16 subnormal inputs read as
// zero and subnormal fp32 results flushed to zero. Each output is thus a plain fp32 dot
// product (at most k / 16 + 4 + k / 2048 roundings per element) plus flushes of values
// below 2^-126: the bound tests/test_cpu_dpbf16.py derives.

#define QPEFT_HD static inline  // internal linkage for format.h in this TU (see format.h)
#include <qpeft/format.h>

#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "qgemm_avx512bf16.h"

// GCC <= 13's masked-less unpack/shuffle/extract intrinsics pass their own
// _mm512_undefined_* (self-initialized) operand, which -Wuninitialized reports once
// inlined here (the level's -Wno-maybe-uninitialized, CMakeLists.txt, covers only the
// "may be" form): a false positive inside the compiler's header.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace qpeft {
namespace cpu {
namespace {

constexpr int64_t kRows = kDpRowsPerTile;
constexpr int64_t kChunk = kDpRedChunk;

// Word indices of the 32 codes in 16 packed bytes in element order, for a table whose
// words 2c and 2c + 1 both hold result c: vpshufb places byte j (even code << 4 | odd
// code) in bytes 0 and 3 of dword j, vpsrlvw moves the even code to bits 1-4 of the low
// word (>> 3) and the odd code to bits 1-4 of the high word (>> 7); vpermw reads bits 0-4.
inline __m512i word_index32(const uint8_t* src) {
  const __m512i bytes =
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512i place =
      _mm512_setr_epi32(0x00808000, 0x01808001, 0x02808002, 0x03808003, 0x04808004, 0x05808005,
                        0x06808006, 0x07808007, 0x08808008, 0x09808009, 0x0a80800a, 0x0b80800b,
                        0x0c80800c, 0x0d80800d, 0x0e80800e, 0x0f80800f);
  return _mm512_srlv_epi16(_mm512_shuffle_epi8(bytes, place), _mm512_set1_epi32(0x00070003));
}

// A block's 16 bf16 results, result c in words 2c and 2c + 1: format.h's f32_to_bf16 on
// the fp32 products (+0x7fff, +0x8000 where bit 16 is set; NaN: the upper bits with the
// quiet bit, only when the scale is not finite -- a finite scale gives finite products,
// |table[c]| <= 1), then the upper word copied into both halves of each dword.
inline __m512i bf16_table(__m512 prod, bool finite) {
  const __m512i u = _mm512_castps_si512(prod);
  const __mmask16 lsb = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000));
  __m512i r = _mm512_mask_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb, u,
                                    _mm512_set1_epi32(0x8000));
  if (!finite) {
    const __mmask16 nan = _mm512_cmp_ps_mask(prod, prod, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  }
  const __m512i upper_twice =
      _mm512_setr_epi32(0x03020302, 0x07060706, 0x0b0a0b0a, 0x0f0e0f0e, 0x03020302, 0x07060706,
                        0x0b0a0b0a, 0x0f0e0f0e, 0x03020302, 0x07060706, 0x0b0a0b0a, 0x0f0e0f0e,
                        0x03020302, 0x07060706, 0x0b0a0b0a, 0x0f0e0f0e);
  return _mm512_shuffle_epi8(r, upper_twice);
}

// Scales of consecutive blocks without a division per block (a 64-bit idiv per block
// and one per nested group cost more than the block's whole decode).
struct ScaleWalk {
  const DpGemmArgs& g;
  int64_t b, group, in_group;
  ScaleWalk(const DpGemmArgs& args, int64_t block)
      : g(args),
        b(block),
        group(block / args.nested_blocksize),
        in_group(block - group * args.nested_blocksize) {}
  float scale() const {
    if (g.absmax_q == nullptr) return g.absmax[b];
    return nested_absmax_value(g.absmax_q[b], g.nested_code, g.nested_absmax[group], g.offset);
  }
  void next() {
    ++b;
    if (++in_group == g.nested_blocksize) in_group = 0, ++group;
  }
};

// W[row, c0 : c0 + len) as bf16 into dst[0, len), dst[len, padded) zeroed.
// Fast path (k % 32 == 0, blocksize % 32 == 0, c0 % 32 == 0): every 32-element chunk
// lies in one block and starts on a byte.
void decode_segment(const DpGemmArgs& g, const float* table, __m512 vtable, int64_t row, int64_t c0,
                    int64_t len, int64_t padded, uint16_t* dst, bool fast) {
  const int64_t e0 = row * g.k + c0, e1 = e0 + len;
  const int64_t bs = g.blocksize;
  ScaleWalk walk(g, e0 / bs);
  int64_t bend = (walk.b + 1) * bs;  // end of the current block
  if (fast) {
    const uint8_t* src = g.packed + (e0 >> 1);
    uint16_t* out = dst;
    for (int64_t e = e0; e < e1; walk.next(), bend += bs) {
      const int64_t stop = bend < e1 ? bend : e1;
      const float s = walk.scale();
      const __m512i tab = bf16_table(_mm512_mul_ps(vtable, _mm512_set1_ps(s)), std::isfinite(s));
      for (; e < stop; e += 32, src += 16, out += 32)
        _mm512_storeu_si512(out, _mm512_permutexvar_epi16(word_index32(src), tab));
    }
  } else {
    float s = walk.scale();
    for (int64_t e = e0; e < e1; ++e) {
      if (e == bend) {
        walk.next();
        bend += bs;
        s = walk.scale();
      }
      const uint8_t byte = g.packed[e >> 1];
      const float v = table[(e & 1) ? (byte & 0x0f) : (byte >> 4)] * s;
      dst[e - e0] = f32_to_bf16(v);
    }
  }
  for (int64_t i = len; i < padded; ++i) dst[i] = 0;
}

// The 16 accumulators acc[4 i + j] (each 16 partial sums) reduced to one vector whose
// lane 4 i + j is acc[4 i + j]'s total: pairs interleaved and added (unpcklps/unpckhps),
// then pairs of pairs (unpcklpd/unpckhpd), then 128-bit lanes (vshuff32x4) twice.
inline __m512 reduce16(const __m512* v) {
  __m512 s1[8], s2[4], s3[2];
  for (int p = 0; p < 8; ++p)
    s1[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]),
                          _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
  for (int q = 0; q < 4; ++q) {
    const __m512d c = _mm512_castps_pd(s1[2 * q]), d = _mm512_castps_pd(s1[2 * q + 1]);
    s2[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)),
                          _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
  }
  for (int h = 0; h < 2; ++h)
    s3[h] = _mm512_add_ps(_mm512_shuffle_f32x4(s2[2 * h], s2[2 * h + 1], 0x88),
                          _mm512_shuffle_f32x4(s2[2 * h], s2[2 * h + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s3[0], s3[1], 0x88),
                       _mm512_shuffle_f32x4(s3[0], s3[1], 0xdd));
}

// out[MR rows, NR columns] (+)= x[MR rows, len] . w[NR rows, padded]: x rows at stride
// ldx, w rows at stride `padded` (zero beyond len), out rows at stride ldo.
template <int MR, int NR>
inline void micro(const uint16_t* x, int64_t ldx, const uint16_t* w, int64_t padded, int64_t len,
                  float* out, int64_t ldo, bool first) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  const int64_t full = len / 32 * 32;
  int64_t c = 0;
  for (; c < full; c += 32) {
    __m512bh wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * padded + c);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + i * ldx + c);
      for (int j = 0; j < NR; ++j) acc[4 * i + j] = _mm512_dpbf16_ps(acc[4 * i + j], xv, wv[j]);
    }
  }
  if (c < len) {  // x's last partial chunk, masked (w is zero-padded): no read past x's row
    const __mmask32 k = static_cast<__mmask32>((uint64_t{1} << (len - c)) - 1);
    __m512bh wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * padded + c);
    for (int i = 0; i < MR; ++i) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(k, x + i * ldx + c);
      for (int j = 0; j < NR; ++j) acc[4 * i + j] = _mm512_dpbf16_ps(acc[4 * i + j], xv, wv[j]);
    }
  }
  const __m512 r = reduce16(acc);
  const __mmask8 cols = static_cast<__mmask8>((1u << NR) - 1);
  const __m128 q[4] = {_mm512_castps512_ps128(r), _mm512_extractf32x4_ps(r, 1),
                       _mm512_extractf32x4_ps(r, 2), _mm512_extractf32x4_ps(r, 3)};
  for (int i = 0; i < MR; ++i) {
    float* o = out + i * ldo;
    if (NR == 4) {
      _mm_storeu_ps(o, first ? q[i] : _mm_add_ps(_mm_loadu_ps(o), q[i]));
    } else {
      const __m128 v = first ? q[i] : _mm_add_ps(_mm_maskz_loadu_ps(cols, o), q[i]);
      _mm_mask_storeu_ps(o, cols, v);
    }
  }
}

template <int NR>
void tile_rows(const DpGemmArgs& g, const uint16_t* w, int64_t padded, int64_t c0, int64_t len,
               int64_t row0, bool first) {
  const int64_t m = g.m;
  const uint16_t* x = g.x + c0;
  float* out = g.out + row0;
  int64_t i = 0;
  for (; i + 4 <= m; i += 4)
    micro<4, NR>(x + i * g.k, g.k, w, padded, len, out + i * g.n, g.n, first);
  switch (m - i) {
    case 3:
      micro<3, NR>(x + i * g.k, g.k, w, padded, len, out + i * g.n, g.n, first);
      break;
    case 2:
      micro<2, NR>(x + i * g.k, g.k, w, padded, len, out + i * g.n, g.n, first);
      break;
    case 1:
      micro<1, NR>(x + i * g.k, g.k, w, padded, len, out + i * g.n, g.n, first);
      break;
    default:
      break;
  }
}

// --- dx = dy @ W ----------------------------------------------------------------------------
// The reduction runs over W's rows, so a decoded W strip is laid out as vdpbf16ps's second
// operand wants it for 16 output columns per vector: pair p of rows (n0 + 2p, n0 + 2p + 1)
// and columns c .. c + 16 as the 32 words (W[2p, c], W[2p + 1, c], W[2p, c + 1], ...), the
// layout qgemm_amx.cpp's decode_panel_dx gives its B tiles. dy's pair (dy[i, 2p], dy[i,
// 2p + 1]) is broadcast to every dword, so each lane accumulates one output column.

constexpr int64_t kDxCols = kDpDxCols;     // columns of a strip (one decoded W strip)
constexpr int64_t kDxRows = kDpDxRedRows;  // W rows (dy columns) per decoded chunk, even

// Rows n0 .. n0 + nrows of W, columns c0 .. c0 + len (zero beyond len and beyond row n),
// decoded and interleaved in pairs into wp[pair][kDxCols / 16][32]. tmp: 2 kDxCols words.
void decode_pairs(const DpGemmArgs& g, const float* table, __m512 vtable, int64_t n0, int64_t nrows,
                  int64_t c0, int64_t len, uint16_t* wp, uint16_t* tmp, bool fast) {
  const __m512i ilo =
      _mm512_setr_epi32(0x00200000, 0x00210001, 0x00220002, 0x00230003, 0x00240004, 0x00250005,
                        0x00260006, 0x00270007, 0x00280008, 0x00290009, 0x002a000a, 0x002b000b,
                        0x002c000c, 0x002d000d, 0x002e000e, 0x002f000f);
  const __m512i ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(16));
  uint16_t* r0 = tmp;
  uint16_t* r1 = tmp + kDxCols;
  for (int64_t p = 0; 2 * p < nrows; ++p) {
    const int64_t row = n0 + 2 * p;
    decode_segment(g, table, vtable, row, c0, len, kDxCols, r0, fast);
    if (2 * p + 1 < nrows)
      decode_segment(g, table, vtable, row + 1, c0, len, kDxCols, r1, fast);
    else
      std::memset(r1, 0, sizeof(uint16_t) * kDxCols);
    uint16_t* dst = wp + p * 2 * kDxCols;
    for (int64_t c = 0; c < kDxCols; c += 32) {
      const __m512i a = _mm512_loadu_si512(r0 + c), b = _mm512_loadu_si512(r1 + c);
      _mm512_storeu_si512(dst + 2 * c, _mm512_permutex2var_epi16(a, ilo, b));
      _mm512_storeu_si512(dst + 2 * c + 32, _mm512_permutex2var_epi16(a, ihi, b));
    }
  }
}

inline uint32_t load_pair(const uint16_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// out[MR rows, cols <= 64] (+)= dy[MR rows, n0 .. n0 + nrows) @ W chunk: dy rows at stride
// ldy (pointing at column n0), wp the chunk's pairs at this sub-strip (pair stride
// 2 kDxCols words), out rows at stride ldo. An odd nrows: the last pair's second row is
// zero and dy's element past the chunk is not read (it may be past dy, or Inf/NaN).
template <int MR>
inline void micro_dx(const uint16_t* dy, int64_t ldy, int64_t nrows, const uint16_t* wp, float* out,
                     int64_t ldo, int64_t cols, bool first) {
  __m512 acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t full = nrows / 2;
  for (int64_t p = 0; p < full; ++p) {
    const uint16_t* w = wp + p * 2 * kDxCols;
    __m512bh wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + 32 * j);
    for (int i = 0; i < MR; ++i) {
      const __m512bh a =
          (__m512bh)_mm512_set1_epi32(static_cast<int>(load_pair(dy + i * ldy + 2 * p)));
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, wv[j]);
    }
  }
  if (nrows & 1) {
    const uint16_t* w = wp + full * 2 * kDxCols;
    __m512bh wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(w + 32 * j);
    for (int i = 0; i < MR; ++i) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(dy[i * ldy + 2 * full]);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a, wv[j]);
    }
  }
  for (int j = 0; j < 4 && 16 * j < cols; ++j) {
    const int64_t left = cols - 16 * j;
    const __mmask16 mk = left >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << left) - 1);
    for (int i = 0; i < MR; ++i) {
      float* o = out + i * ldo + 16 * j;
      const __m512 v = first ? acc[i][j] : _mm512_add_ps(_mm512_maskz_loadu_ps(mk, o), acc[i][j]);
      _mm512_mask_storeu_ps(o, mk, v);
    }
  }
}

}  // namespace

int64_t dpbf16_workspace_bytes(const DpGemmArgs& g) {
  const int64_t chunk = g.k < kChunk ? g.k : kChunk;
  const int64_t padded = (chunk + 31) / 32 * 32;
  return (kRows * padded * 2 + 63) / 64 * 64;
}

void dpbf16_gemm_tiles(const DpGemmArgs& g, int64_t t0, int64_t t1, void* ws) {
  const float* table = g.quant_type == kNF4 ? kNF4Values : kFP4Values;
  const __m512 vtable = _mm512_loadu_ps(table);
  const bool fast = g.k % 32 == 0 && g.blocksize % 32 == 0;
  uint16_t* w = static_cast<uint16_t*>(ws);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row0 = t * kRows;
    const int64_t nr = g.n - row0 < kRows ? g.n - row0 : kRows;
    for (int64_t c0 = 0; c0 < g.k; c0 += kChunk) {
      const int64_t len = g.k - c0 < kChunk ? g.k - c0 : kChunk;
      const int64_t padded = (len + 31) / 32 * 32;
      for (int64_t r = 0; r < nr; ++r)
        decode_segment(g, table, vtable, row0 + r, c0, len, padded, w + r * padded, fast);
      const bool first = c0 == 0;
      switch (nr) {
        case 4:
          tile_rows<4>(g, w, padded, c0, len, row0, first);
          break;
        case 3:
          tile_rows<3>(g, w, padded, c0, len, row0, first);
          break;
        case 2:
          tile_rows<2>(g, w, padded, c0, len, row0, first);
          break;
        default:
          tile_rows<1>(g, w, padded, c0, len, row0, first);
          break;
      }
    }
  }
}

}  // namespace cpu
}  // namespace qpeft

namespace qpeft {
namespace cpu {

int64_t dpbf16_dx_workspace_bytes(const DpGemmArgs&) {
  // the pairs of one chunk plus the two decoded rows
  return ((kDxRows / 2) * 2 * kDxCols * 2 + 2 * kDxCols * 2 + 63) / 64 * 64;
}

void dpbf16_dx_strips(const DpGemmArgs& g, int64_t s0, int64_t s1, void* ws) {
  const float* table = g.quant_type == kNF4 ? kNF4Values : kFP4Values;
  const __m512 vtable = _mm512_loadu_ps(table);
  const bool fast = g.k % 32 == 0 && g.blocksize % 32 == 0;
  uint16_t* wp = static_cast<uint16_t*>(ws);
  uint16_t* tmp = wp + (kDxRows / 2) * 2 * kDxCols;
  const int64_t m = g.m;
  for (int64_t s = s0; s < s1; ++s) {
    const int64_t c0 = s * kDxCols;
    const int64_t len = g.k - c0 < kDxCols ? g.k - c0 : kDxCols;
    for (int64_t n0 = 0; n0 < g.n; n0 += kDxRows) {
      const int64_t nrows = g.n - n0 < kDxRows ? g.n - n0 : kDxRows;
      decode_pairs(g, table, vtable, n0, nrows, c0, len, wp, tmp, fast);
      const bool first = n0 == 0;
      for (int64_t sc = 0; sc < len; sc += 64) {
        const int64_t cols = len - sc < 64 ? len - sc : 64;
        const uint16_t* w = wp + 2 * sc;  // sub-strip sc: words 2 sc .. of every pair
        const uint16_t* dy = g.x + n0;
        float* out = g.out + c0 + sc;
        int64_t i = 0;
        for (; i + 4 <= m; i += 4)
          micro_dx<4>(dy + i * g.n, g.n, nrows, w, out + i * g.k, g.k, cols, first);
        switch (m - i) {
          case 3:
            micro_dx<3>(dy + i * g.n, g.n, nrows, w, out + i * g.k, g.k, cols, first);
            break;
          case 2:
            micro_dx<2>(dy + i * g.n, g.n, nrows, w, out + i * g.k, g.k, cols, first);
            break;
          case 1:
            micro_dx<1>(dy + i * g.n, g.n, nrows, w, out + i * g.k, g.k, cols, first);
            break;
          default:
            break;
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace qpeft
