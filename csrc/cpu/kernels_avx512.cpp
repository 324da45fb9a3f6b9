// AVX-512 (F/BW/VL/DQ) quantize/dequantize kernels (4-bit dequantize: the AVX2 one, see
// the table at the end). Compiled with the avx512 level's flags (CMakeLists.txt) and
// entered only when cpu_info.cpp found every one of them.
//
// Bit for bit equal to the scalar kernels, as the AVX2 ones are: the same fp32
// operations in the same order per element (no FMA: -ffp-contract=off and no fmadd
// intrinsic), the same NaN rule for absmax, format.h's conversions in integer SIMD
// (bf16) or by vcvtps2ph with round-to-nearest-even (fp16). What 16 lanes buy:
//   4-bit encode: a 4-step binary search over the 15 midpoints (vpermps of the
//     midpoint table) instead of 15 compares;
//   8-bit: 16-lane gathers, vpmovdb packing and masked tails.

#define QPEFT_HD static inline  // internal linkage for format.h in this TU (see format.h)
#include <qpeft/format.h>

#include <immintrin.h>

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

// No 4-bit dequantize here: a 16-lane kernel (the block's 16 products in one zmm, one
// vpermps per 16 fp32 outputs, one vpermw per 32 bf16/fp16 outputs; commit f61097b)
// measured no faster than the AVX2 kernel's vpshufb decode in benchmarks/isa_ab.py
// (4096x4096 NF4+DQ, one thread, 2-core Sapphire Rapids-class Xeon VM; avx2/avx512
// median ratios over six runs: bf16 out 0.55-1.97, median 0.99; fp32 out 0.98-1.06):
// writing 2-4 bytes per element bounds both. nullptr: this level runs the AVX2 kernel.
const KernelTable kAvx512Kernels = {"avx512", quantize_4bit, nullptr, quantize_blockwise,
                                    dequantize_blockwise};

}  // namespace cpu
}  // namespace qpeft
