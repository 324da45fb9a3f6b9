// AMX-BF16 GEMM on 4-bit weights: out = a @ W^T (forward) or a @ W (dx), W decoded from
// its packed NF4/FP4 codes straight into tiles, one panel of W at a time, never a whole
// decoded W (docs/design.md, "AMX GEMM"). Compiled with the amx level's flags
// (CMakeLists.txt: QPEFT_ISA_FLAGS_amx) and entered only by qgemm.cpp after cpu_info.cpp
// found AMX-TILE and AMX-BF16 with their state enabled and Linux's permission granted
// (see qgemm.cpp for why that covers every thread). Internal linkage throughout
// (docs/design.md, "Internal linkage in ISA TUs").
//
// Tiles. Every tile has 16 rows of 64 bytes (one configuration, loaded on entry of
// amx_gemm_cols and released on return, in whichever thread runs it). TDPBF16PS
// C[16 x 16 fp32] += A[16 x 32 bf16] B, B's row r holding for each of 16 columns the bf16
// pair of reduction elements (2r, 2r + 1) (the "VNNI" layout):
//   forward, computed as y^T = W x^T: A = W's own rows (tile (ct, rt): W[16 ct + i][32 rt
//     + 0..31], so a decoded row chunk is stored as it is), B = x^T in VNNI pairs
//     (repacked once per call: 16 x 16 dword transposes of x), C^T transposed when written;
//   dx = dy W: A = dy's rows (repacked as they are), B = W in pairs of rows (tile (ct, rt)
//     row r, column j: W[32 rt + 2r, + 1][16 ct + j]: two decoded rows interleaved by one
//     vpermt2w per tile row).
// A 2 x 2 block of C tiles (tmm0..3) takes 2 + 2 operand tiles (tmm4..7). TDPBF16PS sums
// the products of bf16 pairs in fp32, reads subnormal inputs as zero and flushes subnormal
// fp32 results (qpeft/testing.py, ``flush_bound``, derives what that adds to the error).
//
// Blocking. a is repacked once per call into tiles (zero padded: no tile reads past a's
// end, and a tail never meets uninitialized memory). Each task owns a range of column
// blocks (col_block columns of out); for each (column block, reduction block) the W panel
// is decoded once into L2, then swept kSweepRt reduction tiles at a time by every 32-row
// block of a; the fp32 accumulators persist across sweeps in a buffer.
//
// W's bf16 values are those of dequantize_4bit to bf16 bit for bit: fp32
// table[code] * absmax rounded once to nearest even (subnormals kept, format.h's NaN
// rule), computed for the 16 codes of a block and looked up (vpermw).

#define QPEFT_HD static inline  // internal linkage for format.h in this TU (see format.h)
#include <qpeft/format.h>

#include <immintrin.h>

#include <cstring>

#include "avx512_common.h"
#include "qgemm_amx.h"

namespace qpeft {
namespace cpu {
namespace {

constexpr int64_t kTileElems = 512;  // bf16 elements of one 16 x 64-byte tile
constexpr int64_t kSweepRt = 8;      // reduction tiles per sweep of the C tiles (256 elements)
// fp32 accumulator rows are padded by 16 floats: a row stride of a power of two times 1 KiB
// (M = 512 forward: 2 KiB) put the 16 rows of a C tile into two L1 sets.
constexpr int64_t kLdcPad = 16;
// The repacked a's size above which amx_gemm_cols prefetches a's next tiles into L2.
constexpr int64_t kPrefetchABytes = int64_t{1} << 20;

inline int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}
inline int64_t cdiv(int64_t a, int64_t b) {
  return a / b + (a % b != 0);
}
inline int64_t align64(int64_t bytes) {
  return cdiv(bytes, 64) * 64;
}

// The 64-byte tile configuration (palette 1): tiles 0..7 of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

inline void load_tile_config() {
  TileConfig c;
  std::memset(&c, 0, sizeof c);
  c.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// log2 of v when v is a power of two, else -1: the block index of an element is then a
// shift, not a 64-bit division (20-40 cycles each, per block of 64 elements, measured as a
// visible share of the decode).
inline int log2_or_neg(int64_t v) {
  for (int l = 0; l < 62; ++l)
    if (v == (int64_t{1} << l)) return l;
  return -1;
}

struct BlockIndex {
  int bs_shift, nbs_shift;  // -1: divide
  int64_t of(const AmxGemmArgs& g, int64_t e) const {
    return bs_shift >= 0 ? e >> bs_shift : e / g.blocksize;
  }
  float absmax(const AmxGemmArgs& g, int64_t b) const {
    if (g.absmax_q == nullptr) return g.absmax[b];
    const int64_t nb = nbs_shift >= 0 ? b >> nbs_shift : b / g.nested_blocksize;
    return nested_absmax_value(g.absmax_q[b], g.nested_code, g.nested_absmax[nb], g.offset);
  }
};

// lookup32_at's constants: the 16 bytes of a chunk broadcast to the four 128-bit lanes (a
// load, no shuffle), vpshufb puts byte i in the low byte of words 2i and 2i + 1 (the lane
// holding words 8L .. 8L + 7 reads bytes 4L .. 4L + 3), vpsrlvw shifts the even words' high
// nibble down; vpermw then reads 5 index bits (bits 5+ are ignored, bit 4 is absorbed by the
// duplicated table). Three vector operations per chunk instead of lookup32's five.
struct Spread {
  __m512i shuffle, shift;
};

Spread make_spread() {
  alignas(64) uint8_t sh[64];
  alignas(64) uint16_t cnt[32];
  for (int lane = 0; lane < 4; ++lane) {
    for (int j = 0; j < 16; ++j)
      sh[16 * lane + j] = (j % 2 == 0) ? static_cast<uint8_t>(4 * lane + j / 4) : uint8_t{0x80};
  }
  for (int w = 0; w < 32; ++w) cnt[w] = (w % 2 == 0) ? 4 : 0;
  return Spread{_mm512_load_si512(sh), _mm512_load_si512(cnt)};
}

// The decoder's constants: the code table, lookup32_at's spread and the block index.
struct Decoder {
  __m512 table;
  Spread spread;
  BlockIndex bi;
};

Decoder make_decoder(const AmxGemmArgs& g) {
  Decoder d;
  d.table = _mm512_loadu_ps(g.quant_type == kNF4 ? kNF4Values : kFP4Values);
  d.spread = make_spread();
  d.bi.bs_shift = log2_or_neg(g.blocksize);
  d.bi.nbs_shift = log2_or_neg(g.nested_blocksize);
  return d;
}

// Prefetches the packed bytes of W[row, col0 .. col0 + len), a row the decoder reaches
// one tile later (the rows of a tile are short runs at a stride of k / 2 bytes; the code
// loads were the decode's hot spot with W in memory). Neutral to slightly faster in the
// VM's noisy runs; kept: it touches only bytes the decode reads anyway.
inline void prefetch_row(const AmxGemmArgs& g, int64_t row, int64_t col0, int64_t len) {
  if (row >= g.n || col0 >= g.k) return;
  const int64_t e0 = row * g.k + col0, e1 = e0 + min64(len, g.k - col0);
  const char* p = reinterpret_cast<const char*>(g.packed);
  for (int64_t byte = (e0 >> 1) & ~int64_t{63}; byte < (e1 + 1) >> 1; byte += 64)
    _mm_prefetch(p + byte, _MM_HINT_T0);
}

// The 16 bf16 values table[c] * absmax of one block, duplicated into both 256-bit
// halves: vpermw reads 5 index bits, the 5th is then irrelevant. The fp32 products are
// rounded to bf16 as format.h's f32_to_bf16 does. vcvtneps2bf16 rounds to nearest even
// too but reads subnormal inputs as zero (and so would not keep a subnormal product):
// it serves only a block whose every nonzero product is a normal number, that is
// 2^-100 <= |absmax| <= FLT_MAX (the smallest nonzero |table| entry is FP4's
// 0.0625 / 12 > 2^-8, so |products| >= 2^-108, and a product of a finite absmax and
// |table| <= 1 is finite); any other absmax (tiny, 0, inf, NaN) takes the integer
// rounding with the NaN rule (bf16_bits16). Both give the same bits where both apply.
inline bool normal_absmax(float absmax) {
  const float mag = absmax < 0.0f ? -absmax : absmax;
  return mag >= 0x1p-100f && mag <= 3.4028234663852886e38f;  // false for NaN
}

inline __m512i dup_table(__m256i w) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(w), w, 1);
}

// The table of an absmax known to satisfy normal_absmax.
inline __m512i block_table_normal(__m512 table, float absmax) {
  return dup_table((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(table, _mm512_set1_ps(absmax))));
}

inline __m512i block_table(__m512 table, float absmax) {
  if (normal_absmax(absmax)) return block_table_normal(table, absmax);
  return dup_table(
      _mm512_cvtepi32_epi16(bf16_bits16(_mm512_mul_ps(table, _mm512_set1_ps(absmax)))));
}

// 32 bf16 values from 16 packed bytes (code 2i in the high nibble of byte i): dword i
// of the index holds the high nibble in its low word and the byte in its high word
// (of which vpermw reads the low nibble).
inline __m512i lookup32(__m128i bytes, __m512i table) {
  const __m512i d = _mm512_cvtepu8_epi32(bytes);
  const __m512i idx = _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
  return _mm512_permutexvar_epi16(idx, table);
}

// lookup32 on the 16 bytes at src (the same 32 values; Spread says how).
inline __m512i lookup32_at(const uint8_t* src, const Spread& sp, __m512i table) {
  const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m512i idx = _mm512_srlv_epi16(_mm512_shuffle_epi8(b, sp.shuffle), sp.shift);
  return _mm512_permutexvar_epi16(idx, table);
}

inline uint16_t lookup1(__m512i table, int code) {
  alignas(64) uint16_t t[32];
  _mm512_store_si512(t, table);
  return t[code];
}

// Whether decode_row_fast serves the call's rows: a power-of-two blocksize >= 32 and k a
// multiple of 32 (then every 32-element chunk of a row segment starting at a multiple
// of 32 is whole bytes of one block); col0 and len must be multiples of 32.
inline bool fast_rows(const AmxGemmArgs& g, const Decoder& d) {
  return d.bi.bs_shift >= 5 && g.k % 32 == 0;
}

constexpr int64_t kMaxRunBlocks = 8192 / 32 + 1;  // blocks of a row segment (len <= 8192)

// decode_row for fast_rows: the absmax values of the segment's blocks first (one tight
// loop), then per block one table and its 32-element chunks; chunk c of the row goes to
// out + c * chunk_stride (32: contiguous; 512: one row of consecutive tiles).
void decode_row_fast(const AmxGemmArgs& g, const Decoder& d, int64_t row, int64_t col0, int64_t len,
                     uint16_t* out, int64_t chunk_stride = 32) {
  int64_t valid = row < g.n ? min64(len, g.k - col0) : 0;
  if (valid < 0) valid = 0;
  if (valid > 0) {
    const int sh = d.bi.bs_shift;
    const int64_t e0 = row * g.k + col0, e1 = e0 + valid;
    const int64_t b0 = e0 >> sh, nb = ((e1 - 1) >> sh) - b0 + 1;
    float run[kMaxRunBlocks];
    const float* am = run;
    if (g.absmax_q == nullptr) {
      am = g.absmax + b0;
    } else {
      for (int64_t i = 0; i < nb; ++i) run[i] = d.bi.absmax(g, b0 + i);
    }
    // normal_absmax over the run, branch-free on the bits (it vectorizes): |absmax| in
    // [2^-100, FLT_MAX] iff its magnitude bits lie in [0x0d800000, 0x7f7fffff]
    uint32_t outside = 0;
    for (int64_t i = 0; i < nb; ++i) {
      uint32_t u;
      std::memcpy(&u, am + i, 4);
      outside |= static_cast<uint32_t>((u & 0x7fffffffu) - 0x0d800000u) > 0x71ffffffu;
    }
    const bool normal = outside == 0;
    const uint8_t* src = g.packed + (e0 >> 1);
    uint16_t* dst = out;
    int64_t e = e0;
    for (int64_t i = 0; i < nb; ++i) {
      const __m512i t = normal ? block_table_normal(d.table, am[i]) : block_table(d.table, am[i]);
      const int64_t stop = min64((b0 + i + 1) << sh, e1);
      for (; e < stop; e += 32, src += 16, dst += chunk_stride)
        _mm512_storeu_si512(dst, lookup32_at(src, d.spread, t));
    }
  }
  for (int64_t c = valid >> 5; c < len >> 5; ++c)
    _mm512_storeu_si512(out + c * chunk_stride, _mm512_setzero_si512());
}

// W[row, col0 .. col0 + len) as bf16 into out, zeros where row >= n or col >= k. The
// elements are those of the flattened W (blocks may span rows, a row may start in the
// middle of a byte).
void decode_row(const AmxGemmArgs& g, const Decoder& d, int64_t row, int64_t col0, int64_t len,
                uint16_t* out) {
  int64_t valid = row < g.n ? min64(len, g.k - col0) : 0;
  if (valid < 0) valid = 0;
  int64_t e = row * g.k + col0;
  const int64_t end = e + valid;
  uint16_t* o = out;
  while (e < end) {
    const int64_t b = d.bi.of(g, e);
    const int64_t bend = min64((b + 1) * g.blocksize, end);
    const __m512i t = block_table(d.table, d.bi.absmax(g, b));
    if ((e & 1) != 0) {  // the low nibble of a byte
      *o++ = lookup1(t, g.packed[e >> 1] & 15);
      ++e;
    }
    for (; e + 32 <= bend; e += 32, o += 32) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(g.packed + (e >> 1)));
      _mm512_storeu_si512(o, lookup32(bytes, t));
    }
    if (e < bend) {  // 1..31 elements from an even start: ceil(r / 2) bytes, all of W's
      const int64_t r = bend - e;
      const __mmask16 kb = static_cast<__mmask16>((1u << ((r + 1) / 2)) - 1u);
      const __m128i bytes = _mm_maskz_loadu_epi8(kb, g.packed + (e >> 1));
      _mm512_mask_storeu_epi16(o, static_cast<__mmask32>((uint64_t{1} << r) - 1u),
                               lookup32(bytes, t));
      o += r;
      e = bend;
    }
  }
  if (valid < len) std::memset(out + valid, 0, static_cast<size_t>(len - valid) * 2);
}

// In-register transpose of a 16 x 16 matrix of dwords.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  __m512i u[16];  // u[4g + q], lane L: column 4L + q, rows 4g .. 4g + 3
  for (int g = 0; g < 4; ++g) {
    u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int q = 0; q < 4; ++q) {
    const __m512i s0 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0x44);
    const __m512i s1 = _mm512_shuffle_i32x4(u[q], u[4 + q], 0xee);
    const __m512i s2 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0x44);
    const __m512i s3 = _mm512_shuffle_i32x4(u[8 + q], u[12 + q], 0xee);
    r[q] = _mm512_shuffle_i32x4(s0, s2, 0x88);
    r[4 + q] = _mm512_shuffle_i32x4(s0, s2, 0xdd);
    r[8 + q] = _mm512_shuffle_i32x4(s1, s3, 0x88);
    r[12 + q] = _mm512_shuffle_i32x4(s1, s3, 0xdd);
  }
}

// Forward panel: W rows c0 + [0, 16 nct) x columns 32 rt0 + [0, 32 nrt) as A tiles (ct, rt)
// at panel + (ct * rt_stride + rt) * kTileElems: W's own row-major layout cut into 16 x 32
// tiles, so each decoded 32-element chunk is stored once where its tile row lies (the
// forward computes y^T = W x^T; x^T is the VNNI operand, amx_repack_a). tmp: 32 nrt bf16.
void decode_panel_fwd(const AmxGemmArgs& g, const Decoder& d, int64_t c0, int64_t nct, int64_t rt0,
                      int64_t nrt, int64_t rt_stride, uint16_t* panel, uint16_t* tmp) {
  const int64_t len = 32 * nrt;
  const bool fast = fast_rows(g, d);
  for (int64_t ct = 0; ct < nct; ++ct) {
    for (int j = 0; j < 16; ++j) {
      const int64_t row = c0 + 16 * ct + j;
      uint16_t* dst = panel + (ct * rt_stride * 16 + j) * 32;
      prefetch_row(g, row + 16, 32 * rt0, len);  // the next tile's rows
      if (fast) {
        decode_row_fast(g, d, row, 32 * rt0, len, dst, kTileElems);
      } else {
        decode_row(g, d, row, 32 * rt0, len, tmp);
        for (int64_t rt = 0; rt < nrt; ++rt)
          _mm512_storeu_si512(dst + rt * kTileElems, _mm512_loadu_si512(tmp + 32 * rt));
      }
    }
  }
}

// dx panel: W rows 32 rt0 + [0, 32 nrt) x columns c0 + [0, 16 nct) into B tiles (ct, rt)
// (row r: the pairs of W rows 2r, 2r + 1): the two rows decoded into tmp (2 x 16 nct
// bf16, in L1), then one vpermt2w per tile row interleaves them. nct is even.
void decode_panel_dx(const AmxGemmArgs& g, const Decoder& d, int64_t c0, int64_t nct, int64_t rt0,
                     int64_t nrt, int64_t rt_stride, uint16_t* panel, uint16_t* tmp) {
  const int64_t len = 16 * nct;  // a multiple of 32
  const bool fast = fast_rows(g, d);
  // word 2j of the result: row0[j], word 2j + 1: row1[j] (index 32 + j), j in [0, 16) for
  // the first 16 columns, [16, 32) for the next
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int j = 0; j < 16; ++j) {
    lo_idx[2 * j] = static_cast<uint16_t>(j);
    lo_idx[2 * j + 1] = static_cast<uint16_t>(32 + j);
    hi_idx[2 * j] = static_cast<uint16_t>(16 + j);
    hi_idx[2 * j + 1] = static_cast<uint16_t>(48 + j);
  }
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_load_si512(hi_idx);
  for (int64_t rt = 0; rt < nrt; ++rt) {
    for (int r = 0; r < 16; ++r) {
      const int64_t row = 32 * (rt0 + rt) + 2 * r;
      prefetch_row(g, row + 32, c0, len);  // the next tile's rows
      prefetch_row(g, row + 33, c0, len);
      for (int h = 0; h < 2; ++h) {
        if (fast)
          decode_row_fast(g, d, row + h, c0, len, tmp + h * len);
        else
          decode_row(g, d, row + h, c0, len, tmp + h * len);
      }
      for (int64_t ct = 0; ct < nct; ct += 2) {
        const __m512i w0 = _mm512_loadu_si512(tmp + 16 * ct);
        const __m512i w1 = _mm512_loadu_si512(tmp + len + 16 * ct);
        uint16_t* tile = panel + (ct * rt_stride + rt) * kTileElems + 32 * r;
        _mm512_store_si512(tile, _mm512_permutex2var_epi16(w0, ilo, w1));
        _mm512_store_si512(tile + rt_stride * kTileElems, _mm512_permutex2var_epi16(w0, ihi, w1));
      }
    }
  }
}

// C[32 or 16 rows, 32 columns] (+)= A[.., 32 nrt] B for one 32-column pair of B tiles.
template <bool kTwoRows>
inline void micro(const uint16_t* a0, int64_t a_next_row_tile, const uint16_t* b0,
                  const uint16_t* b1, int64_t nrt, float* c, int64_t ldc_bytes, bool first) {
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    if (kTwoRows) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, c, ldc_bytes);
    _tile_loadd(1, c + 16, ldc_bytes);
    if (kTwoRows) {
      _tile_loadd(2, reinterpret_cast<char*>(c) + 16 * ldc_bytes, ldc_bytes);
      _tile_loadd(3, reinterpret_cast<char*>(c + 16) + 16 * ldc_bytes, ldc_bytes);
    }
  }
  for (int64_t rt = 0; rt < nrt; ++rt) {
    _tile_loadd(4, a0 + rt * kTileElems, 64);
    _tile_loadd(6, b0 + rt * kTileElems, 64);
    _tile_loadd(7, b1 + rt * kTileElems, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (kTwoRows) {
      _tile_loadd(5, a0 + (a_next_row_tile + rt) * kTileElems, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldc_bytes);
  _tile_stored(1, c + 16, ldc_bytes);
  if (kTwoRows) {
    _tile_stored(2, reinterpret_cast<char*>(c) + 16 * ldc_bytes, ldc_bytes);
    _tile_stored(3, reinterpret_cast<char*>(c + 16) + 16 * ldc_bytes, ldc_bytes);
  }
}

// Forward: C^T[32 n, 32 or 16 m] (+)= W[32 n, 32 srt] x^T: C tiles (n tile, m tile)
// 0 = (0, 0), 1 = (1, 0), 2 = (0, 1), 3 = (1, 1); W tiles tmm4/5 (A), x^T tiles tmm6/7 (B).
// c: C^T at row n, column m (ldc_bytes per row of n).
template <bool kTwoM>
inline void micro_fwd(const uint16_t* w0, const uint16_t* w1, const uint16_t* x0,
                      int64_t x_next_m_tile, int64_t srt, float* c, int64_t ldc_bytes, bool first) {
  char* c1 = reinterpret_cast<char*>(c) + 16 * ldc_bytes;  // n + 16
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    if (kTwoM) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, c, ldc_bytes);
    _tile_loadd(1, c1, ldc_bytes);
    if (kTwoM) {
      _tile_loadd(2, c + 16, ldc_bytes);
      _tile_loadd(3, c1 + 64, ldc_bytes);
    }
  }
  for (int64_t rt = 0; rt < srt; ++rt) {
    _tile_loadd(6, x0 + rt * kTileElems, 64);
    _tile_loadd(4, w0 + rt * kTileElems, 64);
    _tile_loadd(5, w1 + rt * kTileElems, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if (kTwoM) {
      _tile_loadd(7, x0 + (x_next_m_tile + rt) * kTileElems, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldc_bytes);
  _tile_stored(1, c1, ldc_bytes);
  if (kTwoM) {
    _tile_stored(2, c + 16, ldc_bytes);
    _tile_stored(3, c1 + 64, ldc_bytes);
  }
}

// One row of out (16 lanes from column o, `k` of them valid) from v: fp32 store, fp32
// accumulate, or bf16 (rounded to nearest even).
inline void store_out16(const AmxGemmArgs& g, int64_t o, __m512 v, __mmask16 k) {
  if (g.out_dtype == kF32) {
    float* dst = static_cast<float*>(g.out) + o;
    const __m512 r = g.accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(k, dst), v) : v;
    _mm512_mask_storeu_ps(dst, k, r);
  } else {
    store16_masked<kBF16>(g.out, o, v, k);
  }
}

// The rank-r epilogue's terms of 8 rows of out at 16 columns: lo[i] = sum_q L[row i, q]
// R[q, col .. col + 16) in fp32, q ascending (the first product, then one FMA per q).
// rows[i] are valid rows of L (a caller clamps the tail rows it will not store); R's
// lanes past `k` are read as zero.
inline void lora8(const AmxGemmArgs& g, const int64_t rows[8], int64_t cols, int64_t col,
                  __mmask16 k, __m512 lo[8]) {
  const float* l[8];
  for (int i = 0; i < 8; ++i) l[i] = g.lora_l + rows[i] * g.rank;
  const __m512 r0 = _mm512_maskz_loadu_ps(k, g.lora_r + col);
  for (int i = 0; i < 8; ++i) lo[i] = _mm512_mul_ps(_mm512_set1_ps(l[i][0]), r0);
  for (int64_t q = 1; q < g.rank; ++q) {
    const __m512 rq = _mm512_maskz_loadu_ps(k, g.lora_r + q * cols + col);
    for (int i = 0; i < 8; ++i) lo[i] = _mm512_fmadd_ps(_mm512_set1_ps(l[i][q]), rq, lo[i]);
  }
}

// Forward: out[m, c0 .. c0 + valid) from C^T in cbuf[n][ldc] (16 x 16 transposes), plus
// the rank-r epilogue when g.rank > 0 (C + LoRA: one fp32 add per element).
void write_out_fwd(const AmxGemmArgs& g, const float* cbuf, int64_t ldc, int64_t c0, int64_t valid,
                   int64_t cols) {
  const int64_t mt_n = cdiv(g.m, 16);
  for (int64_t n0 = 0; n0 < valid; n0 += 16) {
    const __mmask16 k = lanes16(valid - n0);
    for (int64_t mt = 0; mt < mt_n; ++mt) {
      __m512i v[16];
      for (int i = 0; i < 16; ++i) v[i] = _mm512_loadu_si512(cbuf + (n0 + i) * ldc + 16 * mt);
      transpose16(v);
      const int64_t rows = min64(16, g.m - 16 * mt);
      if (g.rank > 0) {
        for (int h = 0; h < 16; h += 8) {
          int64_t lr[8];
          for (int i = 0; i < 8; ++i) lr[i] = min64(16 * mt + h + i, g.m - 1);
          __m512 lo[8];
          lora8(g, lr, cols, c0 + n0, k, lo);
          for (int i = 0; i < 8; ++i)
            v[h + i] = _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(v[h + i]), lo[i]));
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        store_out16(g, (16 * mt + r) * cols + c0 + n0, _mm512_castsi512_ps(v[r]), k);
    }
  }
}

// dx: out[m, c0 .. c0 + valid) from the fp32 accumulators cbuf[m][ldc], plus the rank-r
// epilogue when g.rank > 0.
void write_out(const AmxGemmArgs& g, const float* cbuf, int64_t ldc, int64_t c0, int64_t valid,
               int64_t cols) {
  if (g.rank > 0) {  // 8 rows at a time, along them (a column-chunk order ran slower)
    for (int64_t m0 = 0; m0 < g.m; m0 += 8) {
      int64_t lr[8];
      for (int i = 0; i < 8; ++i) lr[i] = min64(m0 + i, g.m - 1);
      const int64_t rows = min64(8, g.m - m0);
      for (int64_t j = 0; j < valid; j += 16) {
        const __mmask16 k = lanes16(valid - j);
        __m512 lo[8];
        lora8(g, lr, cols, c0 + j, k, lo);
        for (int64_t i = 0; i < rows; ++i) {
          const __m512 c = _mm512_maskz_loadu_ps(k, cbuf + (m0 + i) * ldc + j);
          store_out16(g, (m0 + i) * cols + c0 + j, _mm512_add_ps(c, lo[i]), k);
        }
      }
    }
    return;
  }
  for (int64_t m = 0; m < g.m; ++m) {
    const float* src = cbuf + m * ldc;
    const int64_t o = m * cols + c0;
    for (int64_t j = 0; j < valid; j += 16) {
      const __mmask16 k = lanes16(valid - j);
      store_out16(g, o + j, _mm512_maskz_loadu_ps(k, src + j), k);
    }
  }
}

}  // namespace

constexpr int64_t kLoraRows = 32;  // rows of x per block (16: 0.75x oneDNN, 32: 0.68x, 64: ~1x)

void amx_lora_grad_cols(const float* l, int64_t lda, int64_t rank, const uint16_t* x, int64_t m,
                        int64_t cols, int64_t c0, int64_t c1, float* out, bool transpose,
                        float* acc) {
  // Blocks of 16 rows of x, each read along its rows (16 sequential streams), into fp32
  // accumulators acc[q][c - c0] that stay in L2 between blocks (16 loads and stores per 256
  // FMAs). Reading x down its columns instead (16 columns x all m rows per pass) ran 2-3x
  // slower than oneDNN: rows cols * 2 bytes apart hit one L1 set and a page each.
  const int64_t w = c1 - c0, w16 = cdiv(w, 16) * 16;
  std::memset(acc, 0, static_cast<size_t>(lda * w16) * 4);
  for (int64_t i0 = 0; i0 < m; i0 += kLoraRows) {
    const int64_t rows = min64(kLoraRows, m - i0);
    for (int64_t q0 = 0; q0 < lda; q0 += 16) {
      for (int64_t c = 0; c < w; c += 16) {
        const __mmask16 k = lanes16(w - c);
        float* a0 = acc + q0 * w16 + c;
        __m512 a[16];
        for (int q = 0; q < 16; ++q) a[q] = _mm512_load_ps(a0 + q * w16);
        const float* lrow = l + i0 * lda + q0;
        const uint16_t* xrow = x + i0 * cols + c0 + c;
        for (int64_t i = 0; i < rows; ++i, lrow += lda, xrow += cols) {
          const __m512 xv = _mm512_castsi512_ps(
              _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, xrow)), 16));
          for (int q = 0; q < 16; ++q) a[q] = _mm512_fmadd_ps(_mm512_set1_ps(lrow[q]), xv, a[q]);
        }
        for (int q = 0; q < 16; ++q) _mm512_store_ps(a0 + q * w16, a[q]);
      }
    }
  }
  for (int64_t q = 0; q < rank; ++q) {
    const float* src = acc + q * w16;
    if (!transpose) {
      std::memcpy(out + q * cols + c0, src, static_cast<size_t>(w) * 4);
    } else {
      for (int64_t j = 0; j < w; ++j) out[(c0 + j) * rank + q] = src[j];
    }
  }
}

int64_t amx_ap_elems(const AmxGemmArgs& g) {
  const int64_t red = g.dx ? g.n : g.k;
  return cdiv(g.m, 16) * 16 * cdiv(red, 32) * 32;
}

int64_t amx_workspace_bytes(const AmxGemmArgs& g) {
  const int64_t cb = g.col_block, rb = g.red_block;
  const int64_t tmp = (16 * rb > 32 * cb ? 16 * rb : 32 * cb) * 2;
  return align64(cb * rb * 2) + align64(tmp) +
         align64((cdiv(g.m, 16) * 16 + kLdcPad) * (cb + kLdcPad) * 4);
}

void amx_repack_a(const AmxGemmArgs& g, int64_t mt0, int64_t mt1) {
  const int64_t red = g.dx ? g.n : g.k, rt_n = cdiv(red, 32);
  if (!g.dx) {  // x^T in VNNI pairs: tile row r holds (x[m, 2r], x[m, 2r + 1]) for 16 m
    for (int64_t mt = mt0; mt < mt1; ++mt) {
      for (int64_t rt = 0; rt < rt_n; ++rt) {
        const int64_t cnt = min64(32, red - 32 * rt);
        const __mmask32 k =
            static_cast<__mmask32>(cnt >= 32 ? 0xffffffffu : ((uint32_t{1} << cnt) - 1u));
        __m512i v[16];
        for (int i = 0; i < 16; ++i) {
          const int64_t row = 16 * mt + i;
          v[i] = row < g.m ? _mm512_maskz_loadu_epi16(k, g.a + row * red + 32 * rt)
                           : _mm512_setzero_si512();
        }
        transpose16(v);
        uint16_t* dst = g.ap + (mt * rt_n + rt) * kTileElems;
        for (int r = 0; r < 16; ++r) _mm512_store_si512(dst + 32 * r, v[r]);
      }
    }
    return;
  }
  for (int64_t mt = mt0; mt < mt1; ++mt) {
    for (int64_t i = 0; i < 16; ++i) {
      const int64_t row = 16 * mt + i;
      for (int64_t rt = 0; rt < rt_n; ++rt) {
        uint16_t* dst = g.ap + ((mt * rt_n + rt) * 16 + i) * 32;
        if (row >= g.m) {
          _mm512_store_si512(dst, _mm512_setzero_si512());
          continue;
        }
        const int64_t cnt = min64(32, red - 32 * rt);
        const __mmask32 k =
            static_cast<__mmask32>(cnt >= 32 ? 0xffffffffu : ((uint32_t{1} << cnt) - 1u));
        _mm512_store_si512(dst, _mm512_maskz_loadu_epi16(k, g.a + row * red + 32 * rt));
      }
    }
  }
}

void amx_gemm_cols(const AmxGemmArgs& g, int64_t cb0, int64_t cb1, void* ws) {
  const int64_t cols = g.dx ? g.k : g.n, red = g.dx ? g.n : g.k;
  const int64_t cb_cols = g.col_block, rb_elems = g.red_block, rt_stride = rb_elems / 32;
  const int64_t mt_n = cdiv(g.m, 16), rt_n = cdiv(red, 32);
  const int64_t tmp_elems = 16 * rb_elems > 32 * cb_cols ? 16 * rb_elems : 32 * cb_cols;
  char* p = static_cast<char*>(ws);
  uint16_t* panel = reinterpret_cast<uint16_t*>(p);
  p += align64(cb_cols * rb_elems * 2);
  uint16_t* tmp = reinterpret_cast<uint16_t*>(p);
  p += align64(tmp_elems * 2);
  float* cbuf = reinterpret_cast<float*>(p);
  const int64_t ldc_dx = cb_cols + kLdcPad;  // dx: cbuf[m][cb_cols (+ pad)]
  const int64_t ldc_bytes = ldc_dx * 4;
  const int64_t ldc_fwd = mt_n * 16 + kLdcPad;  // forward: cbuf[n][16 mt_n (+ pad)] (C^T)
  const Decoder dec = make_decoder(g);

  load_tile_config();
  for (int64_t cb = cb0; cb < cb1; ++cb) {
    const int64_t c0 = cb * cb_cols;
    const int64_t valid = min64(cb_cols, cols - c0);
    const int64_t nct = cdiv(valid, 32) * 2;  // 16-column tiles, an even count (zero padded)
    for (int64_t rt0 = 0; rt0 < rt_n; rt0 += rt_stride) {
      const int64_t nrt = min64(rt_stride, rt_n - rt0);
      if (g.dx)
        decode_panel_dx(g, dec, c0, nct, rt0, nrt, rt_stride, panel, tmp);
      else
        decode_panel_fwd(g, dec, c0, nct, rt0, nrt, rt_stride, panel, tmp);
      // The sweep takes the panel kSweepRt reduction tiles at a time: the tiles of a's
      // 32-row block (2 x kSweepRt KiB) then stay in L1 while W's tiles stream from the
      // panel in L2 (a micro-benchmark on the AMX VM: TDPBF16PS at full rate with one
      // operand from L2, about half of it with both).
      for (int64_t s0 = 0; s0 < nrt; s0 += kSweepRt) {
        const int64_t srt = min64(kSweepRt, nrt - s0);
        const bool first = rt0 + s0 == 0;
        // While a 32-row block of a runs its micro calls, the tiles it reads next (the
        // next block's in this sweep, or the first block's in the next sweep) are
        // prefetched into L2, a 1 / npairs share before each call: a's repacked tiles (4 MiB
        // at M = 512, K = 4096) do not stay in L2 across column blocks, each is read once
        // per column block from L3, and a tile load that misses L2 stalls the products
        // (docs/design.md, "AMX GEMM": in-process A/B at M = 512, 0-9% on medians, within
        // the VM's noise across processes). Only where a is larger than kPrefetchABytes: a
        // smaller a stays in L2 beside the panel and the accumulators.
        const int64_t npairs = nct / 2;
        const bool pf_a = amx_ap_elems(g) * 2 > kPrefetchABytes;
        for (int64_t mt = 0; mt < mt_n; mt += 2) {
          const uint16_t* a = g.ap + (mt * rt_n + rt0 + s0) * kTileElems;
          int64_t pf_mt = mt + 2, pf_rt = rt0 + s0;
          if (pf_mt >= mt_n) pf_mt = 0, pf_rt += kSweepRt;
          const int64_t pf_bytes =
              pf_a && pf_rt < rt_n ? min64(kSweepRt, rt_n - pf_rt) * kTileElems * 2 : 0;
          const char* pf0 = reinterpret_cast<const char*>(g.ap);  // (no pointer past a)
          if (pf_bytes > 0) pf0 += (pf_mt * rt_n + pf_rt) * kTileElems * 2;
          const char* pf1 = pf_bytes > 0 && pf_mt + 1 < mt_n ? pf0 + rt_n * kTileElems * 2 : pf0;
          const int64_t pf_step = cdiv(pf_bytes / 64, npairs) * 64;
          for (int64_t ct = 0; ct < nct; ct += 2) {
            const int64_t o1 = min64((ct / 2 + 1) * pf_step, pf_bytes);
            for (int64_t o = (ct / 2) * pf_step; o < o1; o += 64) {
              _mm_prefetch(pf0 + o, _MM_HINT_T1);
              _mm_prefetch(pf1 + o, _MM_HINT_T1);
            }
            const uint16_t* b0 = panel + (ct * rt_stride + s0) * kTileElems;
            const uint16_t* b1 = b0 + rt_stride * kTileElems;
            if (!g.dx) {  // forward: W's tiles are the A operand, x^T's the B (micro_fwd)
              float* c = cbuf + ct * 16 * ldc_fwd + mt * 16;
              if (mt + 1 < mt_n)
                micro_fwd<true>(b0, b1, a, rt_n, srt, c, ldc_fwd * 4, first);
              else
                micro_fwd<false>(b0, b1, a, rt_n, srt, c, ldc_fwd * 4, first);
            } else {
              float* c = cbuf + mt * 16 * ldc_dx + ct * 16;
              if (mt + 1 < mt_n)
                micro<true>(a, rt_n, b0, b1, srt, c, ldc_bytes, first);
              else
                micro<false>(a, rt_n, b0, b1, srt, c, ldc_bytes, first);
            }
          }
        }
      }
    }
    if (g.dx)
      write_out(g, cbuf, ldc_dx, c0, valid, cols);
    else
      write_out_fwd(g, cbuf, ldc_fwd, c0, valid, cols);
  }
  _tile_release();
}

}  // namespace cpu
}  // namespace qpeft
