// AVX-512 (F/BW/VL/DQ) quantize/dequantize kernels. Compiled with the avx512 level's
// flags (CMakeLists.txt) and entered only when cpu_info.cpp found every one of them.
//
// Bit for bit equal to the scalar kernels, as the AVX2 ones are: the same fp32
// operations in the same order per element (no FMA: -ffp-contract=off and no fmadd
// intrinsic), the same NaN rule for absmax, format.h's conversions in integer SIMD
// (bf16) or by vcvtps2ph with round-to-nearest-even (fp16). What 16 lanes buy:
//   4-bit encode: a 4-step binary search over the 15 midpoints (vpermps of the
//     midpoint table) instead of 15 compares;
//   4-bit decode: a block's 16 results in one register, looked up 32 codes per vpermw
//     (16 per vpermps for fp32) with the indices made by one vpshufb and one shift;
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
// 4-bit dequantize. Per block, the 16 possible outputs table[c] * scale (the fp32
// products the scalar kernel makes per element, then format.h's conversion, once) sit
// in one register, and each element is a permute indexed by its code: vpermw on 32
// codes for bf16/fp16 (each result in two adjacent words, so that an index's bit 0 is
// free), vpermps on 16 for fp32. The indices cost a broadcast load, one vpshufb and
// one variable shift per permute: no vpmovzx widening, no nibble masks.
//
// The scales of up to 16 blocks are made as one vector (plain absmax: a load; nested:
// a gather of nested_code[absmax_q], then the scalar kernel's multiply and add, so no
// division per block) and tested for finiteness once: a finite scale gives finite
// products (|table[c]| <= 1), so bf16 rounding can skip f32_to_bf16's NaN rule (the
// integer round-to-nearest-even keeps subnormals, which VCVTNEPS2BF16 would flush).
// Full blocks of a blocksize that is a multiple of 32 run an unmasked loop with nothing
// per block but the table (at blocksize 64 a block is two lookups of 3 vector ops each,
// so the table's 5 are nearly half the work); a partial last block, any other even blocksize
// and an odd n (the last byte's low nibble is padding) take the same lookups on masked
// loads and stores, which touch no byte outside the block's elements.
//
// Against the AVX2 kernel (vpshufb on split byte tables, ~15 shuffles per 64 outputs
// on the one shuffle port) this halves the time per element where the output stays in
// L1/L2; the store bandwidth bounds both beyond (docs/design.md, "CPU ISA dispatch").

// Word indices of the 32 codes in 16 packed bytes, in element order, for a table whose
// words 2c and 2c + 1 both hold result c (vpermw reads bits 0-4 of an index). `bytes` holds
// the 16 bytes in each 128-bit lane (vbroadcasti32x4: a load, no shuffle). vpshufb puts
// byte j = (even code << 4) | odd code into bytes 0 and 3 of dword j; vpsrlvw shifts the
// low word right by 3 (bits 1-4: the even code; bit 0 is the odd code's bit 3, which the
// doubled table ignores) and the high word (byte << 8) right by 7 (bits 1-4: the odd
// code, bit 0 clear; the even code in bits 5-8 is ignored).
inline __m512i word_index32(__m512i bytes) {
  const __m512i place =
      _mm512_setr_epi32(0x00808000, 0x01808001, 0x02808002, 0x03808003, 0x04808004, 0x05808005,
                        0x06808006, 0x07808007, 0x08808008, 0x09808009, 0x0a80800a, 0x0b80800b,
                        0x0c80800c, 0x0d80800d, 0x0e80800e, 0x0f80800f);
  return _mm512_srlv_epi16(_mm512_shuffle_epi8(bytes, place), _mm512_set1_epi32(0x00070003));
}
inline __m512i word_index32(const uint8_t* src) {
  return word_index32(
      _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))));
}

// Dword indices of the 16 codes in 8 packed bytes, in element order (vpermps reads bits
// 0-3). `bytes` holds the 8 bytes in each qword (vpbroadcastq: a load); vpshufb puts
// byte j into dwords 2j and 2j + 1, and vpsrlvd shifts the even ones right by 4.
inline __m512i dword_index16(__m512i bytes) {
  const __m512i place =
      _mm512_setr_epi32(0x80808000, 0x80808000, 0x80808001, 0x80808001, 0x80808002, 0x80808002,
                        0x80808003, 0x80808003, 0x80808004, 0x80808004, 0x80808005, 0x80808005,
                        0x80808006, 0x80808006, 0x80808007, 0x80808007);
  const __m512i shift = _mm512_set1_epi64(4);  // dwords: 4, 0, 4, 0, ...
  return _mm512_srlv_epi32(_mm512_shuffle_epi8(bytes, place), shift);
}
inline __m512i dword_index16(const uint8_t* src) {
  int64_t q;
  std::memcpy(&q, src, sizeof q);
  return dword_index16(_mm512_set1_epi64(q));
}

// A block's 16 results for a 16-bit output, result c in words 2c and 2c + 1 (the table
// word_index32 is made for). bf16: format.h's f32_to_bf16 -- the round-to-nearest-even
// add (+0x7fff, +0x8000 where the bf16 lsb, bit 16, is set), and for NaN lanes the
// unrounded bits with the quiet bit -- then vpshufb copies the upper word into both
// halves. FINITE: the block's scale is finite, so no product is NaN (|table[c]| <= 1)
// and the NaN rule is skipped. fp16: vcvtps2ph, its 16 words doubled by vpermw.
template <int D, bool FINITE>
inline __m512i half_table(__m512 prod) {
  if (D == kF16) {
    const __m512i twice =
        _mm512_setr_epi32(0x00000000, 0x00010001, 0x00020002, 0x00030003, 0x00040004, 0x00050005,
                          0x00060006, 0x00070007, 0x00080008, 0x00090009, 0x000a000a, 0x000b000b,
                          0x000c000c, 0x000d000d, 0x000e000e, 0x000f000f);
    const __m256i h = _mm512_cvtps_ph(prod, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_permutexvar_epi16(twice, _mm512_castsi256_si512(h));
  }
  const __m512i u = _mm512_castps_si512(prod);
  const __mmask16 lsb = _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x10000));
  __m512i r = _mm512_mask_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb, u,
                                    _mm512_set1_epi32(0x8000));
  if (!FINITE) {
    const __mmask16 nan = _mm512_cmp_ps_mask(prod, prod, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
  }
  const __m512i upper_twice =
      _mm512_setr_epi32(0x03020302, 0x07060706, 0x0b0a0b0a, 0x0f0e0f0e, 0x03020302, 0x07060706,
                        0x0b0a0b0a, 0x0f0e0f0e, 0x03020302, 0x07060706, 0x0b0a0b0a, 0x0f0e0f0e,
                        0x03020302, 0x07060706, 0x0b0a0b0a, 0x0f0e0f0e);
  return _mm512_shuffle_epi8(r, upper_twice);
}

// Elements [i, end) of one block, i even and end - i < 32 (16 for fp32), codes from src:
// masked loads of the ceil((end - i) / 2) bytes, masked stores.
template <int D>
inline void decode_tail(const uint8_t* src, int64_t i, int64_t end, __m512 prod, __m512i tab,
                        void* out) {
  const int64_t len = end - i;
  const __mmask16 bytes = lanes16((len + 1) >> 1);
  if (D == kF32) {
    const __m512i q = _mm512_broadcastq_epi64(_mm_maskz_loadu_epi8(bytes, src));
    _mm512_mask_storeu_ps(static_cast<float*>(out) + i, lanes16(len),
                          _mm512_permutexvar_ps(dword_index16(q), prod));
    return;
  }
  const __m512i d = _mm512_broadcast_i32x4(_mm_maskz_loadu_epi8(bytes, src));
  _mm512_mask_storeu_epi16(static_cast<uint16_t*>(out) + i,
                           static_cast<__mmask32>((uint64_t{1} << len) - 1),
                           _mm512_permutexvar_epi16(word_index32(d), tab));
}

// One block of any even blocksize, partial or not.
template <int D, bool FINITE>
void decode_block(const Dequant4Args& a, __m512 table, int64_t b, float scale) {
  const int64_t begin = b * a.blocksize;  // even: the dispatcher guarantees an even blocksize
  const int64_t end = block_end(begin, a.blocksize, a.n);
  const __m512 prod = _mm512_mul_ps(table, _mm512_set1_ps(scale));
  const uint8_t* src = a.packed + (begin >> 1);
  int64_t i = begin;
  if (D == kF32) {
    float* out = static_cast<float*>(a.out);
    for (; i + 16 <= end; i += 16, src += 8)
      _mm512_storeu_ps(out + i, _mm512_permutexvar_ps(dword_index16(src), prod));
    if (i < end) decode_tail<D>(src, i, end, prod, _mm512_setzero_si512(), a.out);
    return;
  }
  const __m512i tab = half_table<D, FINITE>(prod);
  uint16_t* out = static_cast<uint16_t*>(a.out);
  for (; i + 32 <= end; i += 32, src += 16)
    _mm512_storeu_si512(out + i, _mm512_permutexvar_epi16(word_index32(src), tab));
  if (i < end) decode_tail<D>(src, i, end, prod, tab, a.out);
}

// Full blocks [b, b + count) of a blocksize that is a multiple of 32, scales s[0, count):
// per block the table, then bs / 64 pairs of 32-element lookups and one more if bs / 32
// is odd. PAIRS >= 0 fixes bs / 64 at compile time (blocksize 64: no inner loop).
template <int D, bool FINITE, int PAIRS>
void decode_full(const Dequant4Args& a, __m512 table, const float* s, int64_t b, int64_t count) {
  const int64_t bs = a.blocksize;
  const int64_t pairs = PAIRS >= 0 ? PAIRS : bs / 64;
  const bool odd32 = PAIRS >= 0 ? false : (bs & 32) != 0;
  const uint8_t* src = a.packed + ((b * bs) >> 1);
  if (D == kF32) {
    float* dst = static_cast<float*>(a.out) + b * bs;
    for (int64_t j = 0; j < count; ++j) {
      const __m512 prod = _mm512_mul_ps(table, _mm512_set1_ps(s[j]));
      for (int64_t k = 0; k < pairs; ++k, src += 32, dst += 64) {
        _mm512_storeu_ps(dst, _mm512_permutexvar_ps(dword_index16(src), prod));
        _mm512_storeu_ps(dst + 16, _mm512_permutexvar_ps(dword_index16(src + 8), prod));
        _mm512_storeu_ps(dst + 32, _mm512_permutexvar_ps(dword_index16(src + 16), prod));
        _mm512_storeu_ps(dst + 48, _mm512_permutexvar_ps(dword_index16(src + 24), prod));
      }
      if (odd32) {
        _mm512_storeu_ps(dst, _mm512_permutexvar_ps(dword_index16(src), prod));
        _mm512_storeu_ps(dst + 16, _mm512_permutexvar_ps(dword_index16(src + 8), prod));
        src += 16, dst += 32;
      }
    }
    return;
  }
  uint16_t* dst = static_cast<uint16_t*>(a.out) + b * bs;
  for (int64_t j = 0; j < count; ++j) {
    const __m512i tab = half_table<D, FINITE>(_mm512_mul_ps(table, _mm512_set1_ps(s[j])));
    for (int64_t k = 0; k < pairs; ++k, src += 32, dst += 64) {
      _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(word_index32(src), tab));
      _mm512_storeu_si512(dst + 32, _mm512_permutexvar_epi16(word_index32(src + 16), tab));
    }
    if (odd32) {
      _mm512_storeu_si512(dst, _mm512_permutexvar_epi16(word_index32(src), tab));
      src += 16, dst += 32;
    }
  }
}

// Blocks [b, b + count) with scales s[0, count).
template <int D, bool FINITE>
void decode_run(const Dequant4Args& a, __m512 table, const float* s, int64_t b, int64_t count) {
  const int64_t bs = a.blocksize;
  const int64_t full = bs % 32 != 0 ? 0 : (b + count) * bs > a.n ? count - 1 : count;
  if (bs == 64)
    decode_full<D, FINITE, 1>(a, table, s, b, full);
  else
    decode_full<D, FINITE, -1>(a, table, s, b, full);
  for (int64_t j = full; j < count; ++j) decode_block<D, FINITE>(a, table, b + j, s[j]);
}

template <int D>
void decode_run16(const Dequant4Args& a, __m512 table, __m512 scales, int64_t b, int64_t count) {
  alignas(64) float s[16];
  _mm512_store_ps(s, scales);
  const __mmask16 finite =  // lanes past count do not count (nested: offset, or NaN for inf)
      _mm512_cmp_ps_mask(_mm512_abs_ps(scales), _mm512_set1_ps(bits_f32(0x7f800000u)), _CMP_LT_OQ) |
      static_cast<__mmask16>(~lanes16(count));
  if (D != kBF16 || finite == 0xffff)
    decode_run<D, true>(a, table, s, b, count);
  else
    decode_run<D, false>(a, table, s, b, count);
}

template <int D>
void dequantize_4bit_impl(const Dequant4Args& a, int64_t b0, int64_t b1) {
  const __m512 table = _mm512_loadu_ps(a.quant_type == kNF4 ? kNF4Values : kFP4Values);
  if (a.absmax_q == nullptr) {
    for (int64_t b = b0; b < b1; b += 16) {
      const int64_t count = b1 - b < 16 ? b1 - b : 16;
      decode_run16<D>(a, table, _mm512_maskz_loadu_ps(lanes16(count), a.absmax + b), b, count);
    }
    return;
  }
  const __m512 offset = _mm512_set1_ps(a.offset);
  for (int64_t b = b0; b < b1;) {  // runs of blocks sharing one nested absmax
    const int64_t group = b / a.nested_blocksize;
    const int64_t group_end =
        (group + 1) * a.nested_blocksize < b1 ? (group + 1) * a.nested_blocksize : b1;
    const __m512 nested = _mm512_set1_ps(a.nested_absmax[group]);
    for (; b < group_end; b += 16) {
      const int64_t count = group_end - b < 16 ? group_end - b : 16;
      const __mmask16 k = lanes16(count);
      const __m512i q = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, a.absmax_q + b));
      const __m512 code = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, q, a.nested_code, 4);
      decode_run16<D>(a, table, _mm512_add_ps(_mm512_mul_ps(code, nested), offset), b, count);
    }
    b = group_end;
  }
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
