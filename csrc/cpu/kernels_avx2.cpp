// AVX2/FMA/F16C CPU kernels. Compiled with -mavx2 -mfma -mf16c (and only this
// TU): the dispatcher enters it only at the avx2 level or above (cpu_info.h).
//
// Results equal the scalar kernels bit for bit (tests hold them to it through
// qpeft._C.set_isa): the same fp32 operations in the same order (no FMA: the
// build uses -ffp-contract=off and no _mm256_fmadd is used), the same NaN rule
// for absmax, and the conversions of format.h done in integer SIMD (bf16) or by
// F16C with round-to-nearest-even (fp16, identical to f32_to_f16).

// Give format.h's functions internal linkage in this TU (see format.h): an
// out-of-line copy compiled with -mavx2 must never be shared with the scalar TU.
#define QPEFT_HD static inline
#include <qpeft/format.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "avx2_common.h"
#include "kernels.h"

namespace qpeft {
namespace cpu {
namespace {

inline int64_t block_end(int64_t begin, int64_t bs, int64_t n) {
  return begin + bs < n ? begin + bs : n;
}

// ---------------------------------------------------------------------------
// Block absmax: max |x| with a separate NaN flag (cmp_unord), because maxps
// drops a NaN in its first operand. Max is exact, so the order of the lanes
// does not matter and the result equals the scalar loop's.

template <int D>
float absmax_range(const void* x, int64_t begin, int64_t end) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 m0 = _mm256_setzero_ps(), m1 = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const __m256 v0 = load8<D>(x, i), v1 = load8<D>(x, i + 8);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
    m0 = _mm256_max_ps(m0, _mm256_and_ps(v0, absmask));
    m1 = _mm256_max_ps(m1, _mm256_and_ps(v1, absmask));
  }
  if (i + 8 <= end) {
    const __m256 v0 = load8<D>(x, i);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v0, v0, _CMP_UNORD_Q));
    m0 = _mm256_max_ps(m0, _mm256_and_ps(v0, absmask));
    i += 8;
  }
  float m = hmax8(_mm256_max_ps(m0, m1));
  bool has_nan = _mm256_movemask_ps(nan) != 0;
  for (; i < end; ++i) {
    float a = load_as_f32(x, i, D);
    a = a < 0.0f ? -a : a;
    if (!(a == a))
      has_nan = true;
    else if (a > m)
      m = a;
  }
  return has_nan ? bits_f32(0x7fc00000u) : m;
}

// 4 x 8 int32 in [0, 255] -> 32 bytes in element order.
inline __m256i pack32(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
  const __m256i b = _mm256_packus_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  // packs work per 128-bit lane: dwords come out as i0[0:4] i1[0:4] i2[0:4] i3[0:4] | i0[4:8] ...
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// ---------------------------------------------------------------------------
// 4-bit quantize.

// Sorted code index #{k : !(v <= mid[k])}: NLE_UQ is true for NaN, so NaN
// counts as above every midpoint (index 15) exactly like sorted_index4. No clamp
// is needed: every midpoint lies in (-1, 1), so clamping to [-1, 1] first
// cannot change the count.
inline __m256i sorted_index8(__m256 v, const __m256* mid) {
  __m256i acc = _mm256_setzero_si256();
  for (int k = 0; k < kNumCodes4 - 1; ++k)
    acc = _mm256_sub_epi32(acc, _mm256_castps_si256(_mm256_cmp_ps(v, mid[k], _CMP_NLE_UQ)));
  return acc;
}

struct Encode4Consts {
  __m256 mid[kNumCodes4 - 1];
  __m256i order_lut;       // sorted index -> code (FP4)
  __m256i nibble_weights;  // maddubs with bytes (16, 1): word = even * 16 + odd = the packed byte
};

// Encodes [i, end) of one block (i even) into packed bytes. DIV: the partial
// last block is normalised by x / floored absmax instead of x * (1 / absmax),
// as format.h's normalize4 (and bitsandbytes' CPU path) does.
template <int D, int QT, bool DIV>
void encode_block(const Quant4Args& a, const Encode4Consts& k, int64_t i, int64_t end,
                  float floored, float inv) {
  const float* mid_s = QT == kNF4 ? kNF4Mid : kFP4Mid;
  const uint8_t* order = QT == kNF4 ? kNF4Order : kFP4Order;
  const __m256 scale = _mm256_set1_ps(DIV ? floored : inv);
  auto norm8 = [&](int64_t j) {
    const __m256 x = load8<D>(a.x, j);
    return DIV ? _mm256_div_ps(x, scale) : _mm256_mul_ps(x, scale);
  };
  for (; i + 32 <= end; i += 32) {
    const __m256i c0 = sorted_index8(norm8(i), k.mid);
    const __m256i c1 = sorted_index8(norm8(i + 8), k.mid);
    const __m256i c2 = sorted_index8(norm8(i + 16), k.mid);
    const __m256i c3 = sorted_index8(norm8(i + 24), k.mid);
    __m256i codes = pack32(c0, c1, c2, c3);
    if (QT != kNF4) codes = _mm256_shuffle_epi8(k.order_lut, codes);
    const __m256i w = _mm256_maddubs_epi16(codes, k.nibble_weights);
    const __m128i bytes =
        _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.packed + (i >> 1)), bytes);
  }
  auto code1 = [&](int64_t j) {
    return encode4(normalize4(load_as_f32(a.x, j, D), floored, inv, DIV), mid_s, order);
  };
  for (; i + 1 < end; i += 2) a.packed[i >> 1] = pack_pair(code1(i), code1(i + 1));
  if (i < end)  // only when end == n is odd: the last byte's low nibble is padding
    a.packed[i >> 1] = pack_pair(code1(i), zero_code4(QT));
}

template <int D, int QT>
void quantize_4bit_impl(const Quant4Args& a, int64_t b0, int64_t b1) {
  Encode4Consts k;
  const float* mid_s = QT == kNF4 ? kNF4Mid : kFP4Mid;
  const uint8_t* order = QT == kNF4 ? kNF4Order : kFP4Order;
  for (int j = 0; j < kNumCodes4 - 1; ++j) k.mid[j] = _mm256_set1_ps(mid_s[j]);
  k.order_lut =
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(order)));
  k.nibble_weights = _mm256_set1_epi16(0x0110);

  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * a.blocksize;  // even: the dispatcher guarantees an even blocksize
    const int64_t end = block_end(begin, a.blocksize, a.n);
    const float am = absmax_range<D>(a.x, begin, end);
    const bool partial = end - begin < a.blocksize;
    a.absmax[b] = stored_absmax4(am, partial);  // full blocks: unfloored, 0 if all zero
    const float floored = floor_absmax4(am), inv = inv_absmax4(am);
    if (partial)
      encode_block<D, QT, true>(a, k, begin, end, floored, inv);
    else
      encode_block<D, QT, false>(a, k, begin, end, floored, inv);
  }
}

template <int QT>
void quantize_4bit_qt(const Quant4Args& a, int64_t b0, int64_t b1) {
  if (a.x_dtype == kF32)
    quantize_4bit_impl<kF32, QT>(a, b0, b1);
  else if (a.x_dtype == kF16)
    quantize_4bit_impl<kF16, QT>(a, b0, b1);
  else
    quantize_4bit_impl<kBF16, QT>(a, b0, b1);
}

void quantize_4bit(const Quant4Args& a, int64_t b0, int64_t b1) {
  if (a.quant_type == kNF4)
    quantize_4bit_qt<kNF4>(a, b0, b1);
  else
    quantize_4bit_qt<kFP4>(a, b0, b1);
}

// ---------------------------------------------------------------------------
// 4-bit dequantize. Per block, the 16 possible outputs table[c] * absmax are
// computed once (the same fp32 products the scalar path makes per element) and
// converted to the output dtype; each element is then a table lookup:
//   fp16/bf16: the 16 uint16 results split into a low-byte and a high-byte
//              table, each broadcast to both 128-bit lanes, and looked up 32
//              codes at a time with vpshufb (64 elements = 22 instructions);
//   fp32:      two permutevar8x32 (codes 0-7 / 8-15) blended on code bit 3.
// The scale of a run of blocks sharing one nested absmax is computed without a
// division per block. 4096x4096 NF4 + double quant to bf16 on the 2-core Xeon
// VM: 1.6 ms on one thread, 0.9 ms on two (the per-block tables of 128-bit
// lookups, an fp32 multiply-round per block and a division for the nested
// absmax took 5.3 and 2.35 ms).

// Calls body(b, scale) for every block in [b0, b1), in order.
template <class Body>
inline void for_each_block_scale(const Dequant4Args& a, int64_t b0, int64_t b1, Body&& body) {
  if (a.absmax_q == nullptr) {
    for (int64_t b = b0; b < b1; ++b) body(b, a.absmax[b]);
    return;
  }
  for (int64_t b = b0; b < b1;) {
    const int64_t group = b / a.nested_blocksize;
    const int64_t group_end = std::min(b1, (group + 1) * a.nested_blocksize);
    const float nested = a.nested_absmax[group];
    for (; b < group_end; ++b)
      body(b, nested_absmax_value(a.absmax_q[b], a.nested_code, nested, a.offset));
  }
}

// 16 packed bytes -> 32 codes in element order (high nibble first).
inline void unpack_nibbles(const uint8_t* p, __m128i& c0, __m128i& c1) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i lo = _mm_and_si128(bytes, mask);
  c0 = _mm_unpacklo_epi8(hi, lo);
  c1 = _mm_unpackhi_epi8(hi, lo);
}

// The 16 results of one block as byte tables: lo_tab holds byte 0 of result c
// at byte c of each lane, hi_tab byte 1. `w` holds the uint16 results of codes
// 0-7 in lane 0 and 8-15 in lane 1.
inline void split_tables(__m256i w, __m256i& lo_tab, __m256i& hi_tab) {
  const __m256i even_odd = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0,
                                            2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  w = _mm256_shuffle_epi8(w, even_odd);  // qwords: lo 0-7, hi 0-7, lo 8-15, hi 8-15
  lo_tab = _mm256_permute4x64_epi64(w, _MM_SHUFFLE(2, 0, 2, 0));
  hi_tab = _mm256_permute4x64_epi64(w, _MM_SHUFFLE(3, 1, 3, 1));
}

// f32_to_bf16 of format.h on 8 finite lanes (no NaN rule needed): the rounded
// upper halves, one per 32-bit lane.
inline __m256i bf16_bits_finite(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb),
                           16);
}

template <int D>
void dequantize_4bit_impl(const Dequant4Args& a, int64_t b0, int64_t b1) {
  const float* table = a.quant_type == kNF4 ? kNF4Values : kFP4Values;
  const __m256 tlo = _mm256_loadu_ps(table), thi = _mm256_loadu_ps(table + 8);
  // For bf16 the products are made in the order codes {0-3, 8-11} / {4-7, 12-15},
  // so that packus (which interleaves 128-bit lanes) yields codes 0-7 | 8-15.
  const __m256 tmix0 = _mm256_setr_ps(table[0], table[1], table[2], table[3], table[8], table[9],
                                      table[10], table[11]);
  const __m256 tmix1 = _mm256_setr_ps(table[4], table[5], table[6], table[7], table[12], table[13],
                                      table[14], table[15]);
  // 32 packed bytes: dwords 0,2,4,6 to lane 0 and 1,3,5,7 to lane 1, so that the
  // in-lane unpacks below leave 16 consecutive outputs in each 256-bit store.
  const __m256i dword_order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  const __m256i nibble = _mm256_set1_epi8(0x0f);

  for_each_block_scale(a, b0, b1, [&](int64_t b, float scale) {
    const int64_t begin = b * a.blocksize;  // even: the dispatcher guarantees an even blocksize
    const int64_t end = block_end(begin, a.blocksize, a.n);
    const __m256 s = _mm256_set1_ps(scale);
    const uint8_t* src = a.packed + (begin >> 1);
    int64_t i = begin;
    if (D == kF32) {
      const __m256 plo = _mm256_mul_ps(tlo, s), phi = _mm256_mul_ps(thi, s);
      float* out = static_cast<float*>(a.out);
      for (; i + 32 <= end; i += 32, src += 16) {
        __m128i c[2];
        unpack_nibbles(src, c[0], c[1]);
        for (int h = 0; h < 2; ++h) {
          for (int q = 0; q < 2; ++q) {
            const __m256i idx = _mm256_cvtepu8_epi32(q == 0 ? c[h] : _mm_srli_si128(c[h], 8));
            const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(plo, idx),
                                              _mm256_permutevar8x32_ps(phi, idx),
                                              _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
            _mm256_storeu_ps(out + i + 16 * h + 8 * q, v);
          }
        }
      }
      float tab[16];
      _mm256_storeu_ps(tab, plo);
      _mm256_storeu_ps(tab + 8, phi);
      for (; i < end; ++i) {
        const uint8_t byte = a.packed[i >> 1];
        out[i] = tab[(i & 1) ? (byte & 0x0f) : (byte >> 4)];
      }
      return;
    }

    __m256i w;
    if (D == kF16) {
      w = _mm256_set_m128i(cvt_half<kF16>(_mm256_mul_ps(thi, s)),
                           cvt_half<kF16>(_mm256_mul_ps(tlo, s)));
    } else {
      const __m256 p0 = _mm256_mul_ps(tmix0, s), p1 = _mm256_mul_ps(tmix1, s);
      // |table[c]| <= 1, so a finite scale gives finite products and the NaN rule
      // of f32_to_bf16 cannot apply; a non-finite one takes the full conversion.
      w = std::isfinite(scale) ? _mm256_packus_epi32(bf16_bits_finite(p0), bf16_bits_finite(p1))
                               : _mm256_packus_epi32(bf16_bits(p0), bf16_bits(p1));
    }
    __m256i lo_tab, hi_tab;
    split_tables(w, lo_tab, hi_tab);

    uint16_t* out = static_cast<uint16_t*>(a.out);
    for (; i + 64 <= end; i += 64, src += 32) {
      const __m256i bytes = _mm256_permutevar8x32_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), dword_order);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
      const __m256i lo = _mm256_and_si256(bytes, nibble);
      const __m256i codes[2] = {_mm256_unpacklo_epi8(hi, lo), _mm256_unpackhi_epi8(hi, lo)};
      for (int h = 0; h < 2; ++h) {
        const __m256i l = _mm256_shuffle_epi8(lo_tab, codes[h]);
        const __m256i u = _mm256_shuffle_epi8(hi_tab, codes[h]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 32 * h),
                            _mm256_unpacklo_epi8(l, u));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i + 32 * h + 16),
                            _mm256_unpackhi_epi8(l, u));
      }
    }
    const __m128i lo128 = _mm256_castsi256_si128(lo_tab), hi128 = _mm256_castsi256_si128(hi_tab);
    for (; i + 32 <= end; i += 32, src += 16) {  // blocksize 32, or a partial last block
      __m128i c[2];
      unpack_nibbles(src, c[0], c[1]);
      for (int h = 0; h < 2; ++h) {
        const __m128i l = _mm_shuffle_epi8(lo128, c[h]);
        const __m128i u = _mm_shuffle_epi8(hi128, c[h]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16 * h), _mm_unpacklo_epi8(l, u));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i + 16 * h + 8), _mm_unpackhi_epi8(l, u));
      }
    }
    if (i < end) {
      uint8_t lo_bytes[16], hi_bytes[16];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(lo_bytes), lo128);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(hi_bytes), hi128);
      for (; i < end; ++i) {
        const uint8_t byte = a.packed[i >> 1];
        const int c = (i & 1) ? (byte & 0x0f) : (byte >> 4);
        out[i] = static_cast<uint16_t>(lo_bytes[c] | (hi_bytes[c] << 8));
      }
    }
  });
}

void dequantize_4bit(const Dequant4Args& a, int64_t b0, int64_t b1) {
  if (a.out_dtype == kF32)
    dequantize_4bit_impl<kF32>(a, b0, b1);
  else if (a.out_dtype == kF16)
    dequantize_4bit_impl<kF16>(a, b0, b1);
  else
    dequantize_4bit_impl<kBF16>(a, b0, b1);
}

// ---------------------------------------------------------------------------
// 8-bit blockwise quantize: bin = trunc(((clamp(v) + 1) * 0.5) * 65535 + 0.5),
// each step rounded as lut_bin does; maxps(v, -1) maps NaN to -1, i.e. bin 0,
// which is lut_bin's NaN rule. The lut lookup is a 32-bit gather at byte
// offsets (the lut carries 3 bytes of padding) masked to the low byte.

template <int D>
void quantize_blockwise_impl(const Quant8Args& a, int64_t b0, int64_t b1) {
  const __m256 one = _mm256_set1_ps(1.0f), minus_one = _mm256_set1_ps(-1.0f);
  const __m256 half = _mm256_set1_ps(0.5f), scale = _mm256_set1_ps(65535.0f);
  const __m256i low_byte = _mm256_set1_epi32(0xff);
  const int* lut32 = reinterpret_cast<const int*>(a.lut);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * a.blocksize;
    const int64_t end = block_end(begin, a.blocksize, a.n);
    const float am = absmax_range<D>(a.x, begin, end);
    a.absmax[b] = am;
    if (am == 0.0f) {
      std::memset(a.q + begin, 0, static_cast<size_t>(end - begin));
      continue;
    }
    const float inv = 1.0f / am;
    const __m256 vinv = _mm256_set1_ps(inv);
    int64_t i = begin;
    for (; i + 32 <= end; i += 32) {
      __m256i c[4];
      for (int k = 0; k < 4; ++k) {
        __m256 v = _mm256_mul_ps(load8<D>(a.x, i + 8 * k), vinv);
        v = _mm256_min_ps(_mm256_max_ps(v, minus_one), one);
        v = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(v, one), half), scale), half);
        const __m256i bin = _mm256_cvttps_epi32(v);
        c[k] = _mm256_and_si256(_mm256_i32gather_epi32(lut32, bin, 1), low_byte);
      }
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q + i), pack32(c[0], c[1], c[2], c[3]));
    }
    for (; i < end; ++i) a.q[i] = a.lut[lut_bin(load_as_f32(a.x, i, D) * inv)];
  }
}

void quantize_blockwise(const Quant8Args& a, int64_t b0, int64_t b1) {
  if (a.x_dtype == kF32)
    quantize_blockwise_impl<kF32>(a, b0, b1);
  else if (a.x_dtype == kF16)
    quantize_blockwise_impl<kF16>(a, b0, b1);
  else
    quantize_blockwise_impl<kBF16>(a, b0, b1);
}

// ---------------------------------------------------------------------------
// 8-bit blockwise dequantize: gather code[q], multiply, convert. 16-bit outputs
// go 16 at a time, and bf16 rounding skips the NaN rule when the block's scale
// is finite (|code| <= 1, so every product is finite): the conversion, not the
// gather, was the cost. 4096x4096 on 2 threads, out=: bf16 7.05 -> 3.1 ms, fp16
// 5.2 -> 3.2 ms (fp32: 2.6 ms). A per-block table of the 256 products (one load
// per element) measured no faster.

template <int D>
void dequantize_blockwise_impl(const Dequant8Args& a, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * a.blocksize;
    const int64_t end = block_end(begin, a.blocksize, a.n);
    const float s = a.absmax[b];
    const __m256 vs = _mm256_set1_ps(s);
    int64_t i = begin;
    if (D != kF32) {
      const bool finite = std::isfinite(s);
      for (; i + 16 <= end; i += 16) {
        __m256 v[2];
        for (int h = 0; h < 2; ++h) {
          const __m256i idx = _mm256_cvtepu8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.q + i + 8 * h)));
          v[h] = _mm256_mul_ps(_mm256_i32gather_ps(a.code, idx, 4), vs);
        }
        __m256i w;
        if (D == kF16) {
          w = _mm256_set_m128i(cvt_half<kF16>(v[1]), cvt_half<kF16>(v[0]));
        } else {
          // packus interleaves 128-bit lanes; the qword permute puts them back in order
          w = finite ? _mm256_packus_epi32(bf16_bits_finite(v[0]), bf16_bits_finite(v[1]))
                     : _mm256_packus_epi32(bf16_bits(v[0]), bf16_bits(v[1]));
          w = _mm256_permute4x64_epi64(w, _MM_SHUFFLE(3, 1, 2, 0));
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(a.out) + i), w);
      }
    }
    for (; i + 8 <= end; i += 8) {
      const __m256i idx =
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.q + i)));
      store8<D>(a.out, i, _mm256_mul_ps(_mm256_i32gather_ps(a.code, idx, 4), vs));
    }
    for (; i < end; ++i) store_from_f32(a.out, i, D, a.code[a.q[i]] * s);
  }
}

void dequantize_blockwise(const Dequant8Args& a, int64_t b0, int64_t b1) {
  if (a.out_dtype == kF32)
    dequantize_blockwise_impl<kF32>(a, b0, b1);
  else if (a.out_dtype == kF16)
    dequantize_blockwise_impl<kF16>(a, b0, b1);
  else
    dequantize_blockwise_impl<kBF16>(a, b0, b1);
}

}  // namespace

const KernelTable kAvx2Kernels = {"avx2", quantize_4bit, dequantize_4bit, quantize_blockwise,
                                  dequantize_blockwise};

}  // namespace cpu
}  // namespace qpeft
