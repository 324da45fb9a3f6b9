// 16-lane loads, stores and conversions shared by the AVX-512 translation units
// (kernels_avx512.cpp, optim_avx512.cpp). Include only from a TU compiled with the
// avx512 level's flags (CMakeLists.txt: QPEFT_ISA_FLAGS_avx512), after format.h with
// QPEFT_HD defined as static inline. Everything here has internal linkage (anonymous
// namespace), so no copy compiled with AVX-512 can be shared with another TU.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace qpeft {
namespace cpu {
namespace {

// Lanes [0, len) of a 16-lane group (len in [0, 16]).
inline __mmask16 lanes16(int64_t len) {
  return static_cast<__mmask16>(len >= 16 ? 0xffffu : ((1u << len) - 1u));
}

// 16 elements at x + i widened to fp32 exactly (f16: vcvtph2ps; bf16: a shift).
template <int D>
inline __m512 load16(const void* x, int64_t i) {
  if (D == kF32) return _mm512_loadu_ps(static_cast<const float*>(x) + i);
  const __m256i h =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + i));
  if (D == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The same for the lanes in `k` (others read as +0.0; memory outside them is not touched).
template <int D>
inline __m512 load16_masked(const void* x, int64_t i, __mmask16 k) {
  if (D == kF32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(x) + i);
  const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(x) + i);
  if (D == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// format.h's f32_to_bf16 on 16 lanes: round to nearest even by adding 0x7fff + lsb;
// NaN -> (bits >> 16) | 0x40. Returns the results in the low halves of the dwords.
inline __m512i bf16_bits16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  return _mm512_mask_or_epi32(rounded, nan, hi, _mm512_set1_epi32(0x40));
}

// 16 fp32 -> 16 uint16 in the output dtype (f16: vcvtps2ph with round-to-nearest-even,
// which equals f32_to_f16; bf16: bf16_bits16). Every dword is <= 0xffff, so the
// truncating vpmovdw is exact.
template <int D>
inline __m256i cvt_half16(__m512 v) {
  if (D == kF16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtepi32_epi16(bf16_bits16(v));
}

template <int D>
inline void store16(void* out, int64_t i, __m512 v) {
  if (D == kF32) {
    _mm512_storeu_ps(static_cast<float*>(out) + i, v);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                        cvt_half16<D>(v));
  }
}

template <int D>
inline void store16_masked(void* out, int64_t i, __m512 v, __mmask16 k) {
  if (D == kF32)
    _mm512_mask_storeu_ps(static_cast<float*>(out) + i, k, v);
  else
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(out) + i, k, cvt_half16<D>(v));
}

// Max over the 16 lanes (exact: max does not round, so the order is irrelevant).
inline float hmax16(__m512 v) {
  __m256 m = _mm256_max_ps(_mm512_castps512_ps256(v),
                           _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

}  // namespace
}  // namespace cpu
}  // namespace qpeft
