// 8-lane loads, stores and reductions shared by the AVX2 translation units
// (kernels_avx2.cpp, optim_avx2.cpp). Include only from a TU compiled with
// -mavx2 -mfma -mf16c, after format.h (with QPEFT_HD static inline there). Everything
// here is in an anonymous namespace: internal linkage, so no out-of-line copy compiled
// with AVX2 can be shared with the scalar TU.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace qpeft {
namespace cpu {
namespace {

template <int D>
inline __m256 load8(const void* x, int64_t i) {
  if (D == kF32) return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  const __m128i h =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
  if (D == kF16) return _mm256_cvtph_ps(h);  // exact, like f16_to_f32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// f32_to_bf16 of format.h on 8 lanes: round to nearest even by adding
// 0x7fff + lsb, NaN -> (bits >> 16) | 0x40 (quiet). Returns the 8 results in
// the low halves of the 32-bit lanes.
inline __m256i bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i absu = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(absu, _mm256_set1_epi32(0x7f800000));
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
  return _mm256_blendv_epi8(rounded, quiet, is_nan);
}

// The same, packed to 8 uint16.
inline __m128i cvt_bf16(__m256 v) {
  const __m256i r = bf16_bits(v);
  // every lane is <= 0xffff, so the signed->unsigned saturating pack is exact
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

template <int D>
inline __m128i cvt_half(__m256 v) {
  if (D == kF16) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return cvt_bf16(v);
}

template <int D>
inline void store8(void* out, int64_t i, __m256 v) {
  if (D == kF32) {
    _mm256_storeu_ps(static_cast<float*>(out) + i, v);
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), cvt_half<D>(v));
  }
}

inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

}  // namespace
}  // namespace cpu
}  // namespace qpeft
