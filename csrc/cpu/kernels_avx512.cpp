// AVX-512 (F/BW/VL/DQ) quantize/dequantize kernels. Compiled with the avx512 level's
// flags (CMakeLists.txt) and entered only when cpu_info.cpp found every one of them.
//
// Bit for bit equal to the scalar kernels, as the AVX2 ones are: the same fp32
// operations in the same order per element (no FMA: -ffp-contract=off and no fmadd
// intrinsic), the same NaN rule for absmax, format.h's conversions in integer SIMD
// (bf16) or by vcvtps2ph with round-to-nearest-even (fp16). What 16 lanes buy:
//   4-bit decode: the 16 products table[c] * absmax of a block fit one register, so an
//     element is one vpermps (fp32) or vpermw (16-bit outputs, table repeated in both
//     halves so that vpermw's 5-bit index may carry the byte's bit 4) -- no blend;
//   4-bit encode: a 4-step binary search over the 15 midpoints (vpermps of the
//     midpoint table) instead of 15 compares;
//   8-bit: 16-lane gathers, vpmovdb packing and masked tails.

#define QPEFT_HD static inline  // internal linkage for format.h in this TU (see format.h)
#include <qpeft/format.h>

#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "avx512_common.h"
#include "kernels.h"

namespace qpeft {
namespace cpu {
namespace {

inline int64_t block_end(int64_t begin, int64_t bs, int64_t n) {
  return begin + bs < n ? begin + bs : n;
}

// Block absmax: max |x| with a separate NaN flag (maxps returns its second operand
// when either is NaN); the tail is a masked load (+0.0 in the unused lanes).
template <int D>
float absmax_range(const void* x, int64_t begin, int64_t end) {
  __m512 m0 = _mm512_setzero_ps(), m1 = _mm512_setzero_ps();
  __mmask16 nan = 0;
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    const __m512 v0 = load16<D>(x, i), v1 = load16<D>(x, i + 16);
    nan |= _mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(v0));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(v1));
  }
  for (; i < end; i += 16) {
    const __m512 v = load16_masked<D>(x, i, lanes16(end - i));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(v));
  }
  return nan != 0 ? bits_f32(0x7fc00000u) : hmax16(_mm512_max_ps(m0, m1));
}

// ---------------------------------------------------------------------------
// 4-bit quantize.

// Sorted code index #{k : !(v <= mid[k])} by binary search: the predicate holds for
// a prefix of the sorted midpoints, so four probes find its length. NLE_UQ is true
// for NaN, which therefore ends at 15 like sorted_index4; index 15 is never probed.
inline __m512i sorted_index16(__m512 v, __m512 mid) {
  __m512i idx = _mm512_setzero_si512();
  for (int step = 8; step >= 1; step >>= 1) {
    const __m512i probe = _mm512_add_epi32(idx, _mm512_set1_epi32(step - 1));
    const __mmask16 above = _mm512_cmp_ps_mask(v, _mm512_permutexvar_ps(probe, mid), _CMP_NLE_UQ);
    idx = _mm512_mask_add_epi32(idx, above, idx, _mm512_set1_epi32(step));
  }
  return idx;
}

// 16 codes (one per dword, element order) -> 8 packed bytes (even element high).
inline __m128i pack_nibbles16(__m512i c) {
  const __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
  return _mm512_cvtepi64_epi8(pairs);  // the low byte of each qword
}

template <int D, int QT, bool DIV>
void encode_block(const Quant4Args& a, __m512 mid, __m512i order, int64_t i, int64_t end,
                  float floored, float inv) {
  const float* mid_s = QT == kNF4 ? kNF4Mid : kFP4Mid;
  const uint8_t* order_s = QT == kNF4 ? kNF4Order : kFP4Order;
  const __m512 scale = _mm512_set1_ps(DIV ? floored : inv);
  auto codes16 = [&](int64_t j) {
    const __m512 x = load16<D>(a.x, j);
    const __m512i c = sorted_index16(DIV ? _mm512_div_ps(x, scale) : _mm512_mul_ps(x, scale), mid);
    return QT == kNF4 ? c : _mm512_permutexvar_epi32(c, order);
  };
  for (; i + 32 <= end; i += 32) {
    const __m128i lo = pack_nibbles16(codes16(i)), hi = pack_nibbles16(codes16(i + 16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.packed + (i >> 1)), _mm_unpacklo_epi64(lo, hi));
  }
  auto code1 = [&](int64_t j) {
    return encode4(normalize4(load_as_f32(a.x, j, D), floored, inv, DIV), mid_s, order_s);
  };
  for (; i + 1 < end; i += 2) a.packed[i >> 1] = pack_pair(code1(i), code1(i + 1));
  if (i < end)  // only when end == n is odd: the last byte's low nibble is padding
    a.packed[i >> 1] = pack_pair(code1(i), zero_code4(QT));
}

template <int D, int QT>
void quantize_4bit_impl(const Quant4Args& a, int64_t b0, int64_t b1) {
  const float* mid_s = QT == kNF4 ? kNF4Mid : kFP4Mid;
  const uint8_t* order_s = QT == kNF4 ? kNF4Order : kFP4Order;
  float mid16[16];
  int32_t order16[16];
  for (int j = 0; j < 16; ++j) {
    mid16[j] = j < kNumCodes4 - 1 ? mid_s[j] : mid_s[kNumCodes4 - 2];  // [15] is never probed
    order16[j] = order_s[j];
  }
  const __m512 mid = _mm512_loadu_ps(mid16);
  const __m512i order = _mm512_loadu_si512(order16);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * a.blocksize;  // even: the dispatcher guarantees an even blocksize
    const int64_t end = block_end(begin, a.blocksize, a.n);
    const float am = absmax_range<D>(a.x, begin, end);
    const bool partial = end - begin < a.blocksize;
    a.absmax[b] = stored_absmax4(am, partial);
    const float floored = floor_absmax4(am), inv = inv_absmax4(am);
    if (partial)
      encode_block<D, QT, true>(a, mid, order, begin, end, floored, inv);
    else
      encode_block<D, QT, false>(a, mid, order, begin, end, floored, inv);
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
// 4-bit dequantize. Per block: the 16 products table[c] * absmax (the same fp32
// products the scalar kernel makes per element) in one register, converted once to
// the output dtype; then per element a permute indexed by the code.

// Calls body(b, scale) for every block in [b0, b1), in order; a run of blocks sharing
// one nested absmax reads it once.
template <class Body>
inline void for_each_block_scale(const Dequant4Args& a, int64_t b0, int64_t b1, Body&& body) {
  if (a.absmax_q == nullptr) {
    for (int64_t b = b0; b < b1; ++b) body(b, a.absmax[b]);
    return;
  }
  for (int64_t b = b0; b < b1;) {
    const int64_t group = b / a.nested_blocksize;
    const int64_t group_end =
        (group + 1) * a.nested_blocksize < b1 ? (group + 1) * a.nested_blocksize : b1;
    const float nested = a.nested_absmax[group];
    for (; b < group_end; ++b)
      body(b, nested_absmax_value(a.absmax_q[b], a.nested_code, nested, a.offset));
  }
}

// 8 packed bytes -> 16 dword indices in element order: dword 2j = byte j >> 4,
// dword 2j+1 = byte j (vpermps reads only its low 4 bits: the low nibble).
inline __m512i codes16_dw(const uint8_t* src) {
  const __m512i q = _mm512_cvtepu8_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  return _mm512_or_si512(_mm512_srli_epi64(q, 4), _mm512_slli_epi64(q, 32));
}

// 16 packed bytes -> 32 word indices in element order: word 2j = byte j >> 4, word
// 2j+1 = byte j (vpermw reads its low 5 bits; the table is repeated in words 16-31, so
// bit 4 does not matter).
inline __m512i codes32_w(const uint8_t* src) {
  const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  return _mm512_or_si512(_mm512_srli_epi32(d, 4), _mm512_slli_epi32(d, 16));
}

template <int D>
void dequantize_4bit_impl(const Dequant4Args& a, int64_t b0, int64_t b1) {
  const __m512 table = _mm512_loadu_ps(a.quant_type == kNF4 ? kNF4Values : kFP4Values);
  for_each_block_scale(a, b0, b1, [&](int64_t b, float scale) {
    const int64_t begin = b * a.blocksize;  // even: the dispatcher guarantees an even blocksize
    const int64_t end = block_end(begin, a.blocksize, a.n);
    const __m512 prod = _mm512_mul_ps(table, _mm512_set1_ps(scale));
    const uint8_t* src = a.packed + (begin >> 1);
    int64_t i = begin;
    if (D == kF32) {
      float* out = static_cast<float*>(a.out);
      for (; i + 32 <= end; i += 32, src += 16) {
        _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(codes16_dw(src), prod));
        _mm512_storeu_ps(out + i + 16, _mm512_permutexvar_ps(codes16_dw(src + 8), prod));
      }
      for (; i + 16 <= end; i += 16, src += 8)
        _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(codes16_dw(src), prod));
      if (i < end) {
        float tab[16];
        _mm512_storeu_ps(tab, prod);
        for (; i < end; ++i) {
          const uint8_t byte = a.packed[i >> 1];
          out[i] = tab[(i & 1) ? (byte & 0x0f) : (byte >> 4)];
        }
      }
      return;
    }
    const __m256i half = cvt_half16<D>(prod);
    const __m512i tab = _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
    uint16_t* out = static_cast<uint16_t*>(a.out);
    for (; i + 64 <= end; i += 64, src += 32) {
      _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(codes32_w(src), tab));
      _mm512_storeu_si512(out + i + 32, _mm512_permutexvar_epi16(codes32_w(src + 16), tab));
    }
    for (; i + 32 <= end; i += 32, src += 16)
      _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(codes32_w(src), tab));
    if (i < end) {
      uint16_t t[16];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), half);
      for (; i < end; ++i) {
        const uint8_t byte = a.packed[i >> 1];
        out[i] = t[(i & 1) ? (byte & 0x0f) : (byte >> 4)];
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
// 8-bit blockwise quantize (the AVX2 kernel's arithmetic on 16 lanes):
// bin = trunc(((clamp(v) + 1) * 0.5) * 65535 + 0.5), maxps(v, -1) sending NaN to -1
// (bin 0, lut_bin's NaN rule); a 32-bit gather at byte offsets (the lut carries 3
// bytes of padding) masked to the low byte; the tail as masked lanes.

template <int D>
void quantize_blockwise_impl(const Quant8Args& a, int64_t b0, int64_t b1) {
  const __m512 one = _mm512_set1_ps(1.0f), minus_one = _mm512_set1_ps(-1.0f);
  const __m512 half = _mm512_set1_ps(0.5f), scale = _mm512_set1_ps(65535.0f);
  const __m512i low_byte = _mm512_set1_epi32(0xff);
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
    const __m512 vinv = _mm512_set1_ps(1.0f / am);
    auto codes = [&](__m512 x) {
      __m512 v = _mm512_mul_ps(x, vinv);
      v = _mm512_min_ps(_mm512_max_ps(v, minus_one), one);
      v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(v, one), half), scale), half);
      const __m512i bin = _mm512_cvttps_epi32(v);
      return _mm512_cvtepi32_epi8(
          _mm512_and_si512(_mm512_i32gather_epi32(bin, lut32, 1), low_byte));
    };
    int64_t i = begin;
    for (; i + 16 <= end; i += 16)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q + i), codes(load16<D>(a.x, i)));
    if (i < end) {
      const __mmask16 k = lanes16(end - i);
      _mm_mask_storeu_epi8(a.q + i, k, codes(load16_masked<D>(a.x, i, k)));
    }
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
// 8-bit blockwise dequantize: gather code[q] 16 at a time, multiply, convert; the
// tail as masked lanes.

template <int D>
void dequantize_blockwise_impl(const Dequant8Args& a, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * a.blocksize;
    const int64_t end = block_end(begin, a.blocksize, a.n);
    const __m512 vs = _mm512_set1_ps(a.absmax[b]);
    int64_t i = begin;
    for (; i + 16 <= end; i += 16) {
      const __m512i idx =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.q + i)));
      store16<D>(a.out, i, _mm512_mul_ps(_mm512_i32gather_ps(idx, a.code, 4), vs));
    }
    if (i < end) {
      const __mmask16 k = lanes16(end - i);
      const __m512i idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, a.q + i));
      store16_masked<D>(a.out, i, _mm512_mul_ps(_mm512_i32gather_ps(idx, a.code, 4), vs), k);
    }
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

const KernelTable kAvx512Kernels = {"avx512", quantize_4bit, dequantize_4bit, quantize_blockwise,
                                    dequantize_blockwise};

}  // namespace cpu
}  // namespace qpeft
