// AVX2/FMA/F16C optimizer kernels (this TU alone is compiled with -mavx2 -mfma
// -mf16c; optim.cpp enters it only at the avx2 level or above, cpu_info.h).
//
// Bit-identical to optim_scalar.cpp (tests hold them to it via set_isa): the
// 8-lane code performs optim.h's fp32 operations in the same order (no
// _mm256_fmadd, and -ffp-contract=off keeps the compiler from fusing), the
// element tails call optim.h itself, and the encoder computes the same integer:
//   dequantize: gather code[q] (vpgatherdd on the 256-float map) * absmax;
//   requantize: clamp, key = bits >> 16, one 32-bit gather of the key table
//               entry (base and the comparison point), q = base + (point < x).
// Block absmax: maxps over |x| plus an unordered-compare NaN flag (maxps drops
// NaNs), then state_absmax_canonical.
//
// Every stream is prefetched kAhead elements ahead (prefetcht0 every 16
// elements). The hardware prefetcher alone left the steps ~10% slower when the
// state does not fit in cache: on the 2-core VM, 16.8M fp32 elements took
// 12.1 ms without and 10.9 ms with (torch's fused AdamW: 12.3 ms), 128
// LoRA-sized tensors 12.7 vs 11.4 ms (fused: 13.0). 256 to 768 elements ahead
// measured the same; 2048 was slower.

#define QPEFT_HD static inline
#include <qpeft/format.h>
#include <qpeft/optim.h>

#include <immintrin.h>

#include "avx2_common.h"
#include "optim_kernels.h"

namespace qpeft {
namespace cpu {
namespace {

constexpr int64_t kAhead = 512;  // elements

// Prefetch element i + kAhead of a stream of `elem_bytes`-wide elements. Prefetch
// never faults, so running past the end of the buffer is harmless; the address
// is formed as an integer, not as an out-of-range pointer.
inline void prefetch_ahead(const void* base, int64_t i, int64_t elem_bytes) {
  const uintptr_t at =
      reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>((i + kAhead) * elem_bytes);
  _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T0);
}

template <int D>
constexpr int64_t elem_bytes() {
  return D == kF32 ? 4 : 2;
}

// ---------------------------------------------------------------------------
// The updates on 8 lanes (optim.h: adam_update, lion_update).

struct AdamVec {
  __m256 decay, lerp_c, beta2, omb2, bc2_sqrt, eps, neg_step;
  explicit AdamVec(const AdamScalars& s)
      : decay(_mm256_set1_ps(s.decay)),
        lerp_c(_mm256_set1_ps(s.lerp_c)),
        beta2(_mm256_set1_ps(s.beta2)),
        omb2(_mm256_set1_ps(s.omb2)),
        bc2_sqrt(_mm256_set1_ps(s.bc2_sqrt)),
        eps(_mm256_set1_ps(s.eps)),
        neg_step(_mm256_set1_ps(s.neg_step)) {}
};

template <bool FROM_GRAD>
inline void adam_vec(__m256& p, __m256 g, __m256& m, __m256& v, const AdamVec& k) {
  p = _mm256_mul_ps(p, k.decay);
  const __m256 d = _mm256_sub_ps(g, m);
  m = FROM_GRAD ? _mm256_sub_ps(g, _mm256_mul_ps(d, k.lerp_c))
                : _mm256_add_ps(m, _mm256_mul_ps(k.lerp_c, d));
  v = _mm256_add_ps(_mm256_mul_ps(v, k.beta2), _mm256_mul_ps(_mm256_mul_ps(k.omb2, g), g));
  const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), k.bc2_sqrt), k.eps);
  p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(k.neg_step, m), denom));
}

struct LionVec {
  __m256 decay, beta1, omb1, beta2, omb2, neg_lr;
  explicit LionVec(const LionScalars& s)
      : decay(_mm256_set1_ps(s.decay)),
        beta1(_mm256_set1_ps(s.beta1)),
        omb1(_mm256_set1_ps(s.omb1)),
        beta2(_mm256_set1_ps(s.beta2)),
        omb2(_mm256_set1_ps(s.omb2)),
        neg_lr(_mm256_set1_ps(s.neg_lr)) {}
};

inline void lion_vec(__m256& p, __m256 g, __m256& m, const LionVec& k) {
  p = _mm256_mul_ps(p, k.decay);
  const __m256 c = _mm256_add_ps(_mm256_mul_ps(m, k.beta1), _mm256_mul_ps(g, k.omb1));
  const __m256 zero = _mm256_setzero_ps();
  // sign_keep_nan: 1 where c > 0, -1 where c < 0, c itself otherwise (±0, NaN)
  __m256 s = _mm256_blendv_ps(c, _mm256_set1_ps(1.0f), _mm256_cmp_ps(c, zero, _CMP_GT_OQ));
  s = _mm256_blendv_ps(s, _mm256_set1_ps(-1.0f), _mm256_cmp_ps(c, zero, _CMP_LT_OQ));
  p = _mm256_add_ps(p, _mm256_mul_ps(k.neg_lr, s));
  m = _mm256_add_ps(_mm256_mul_ps(m, k.beta2), _mm256_mul_ps(g, k.omb2));
}

// ---------------------------------------------------------------------------
// 8-bit state helpers.

inline __m256 dequant8(const uint8_t* q, const float* code, __m256 absmax) {
  const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
  return _mm256_mul_ps(_mm256_i32gather_ps(code, idx, 4), absmax);
}

// Running |x| max and NaN flag of a block.
struct AbsMax {
  __m256 max = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  void add(__m256 x) {
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    max = _mm256_max_ps(max, _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))));
  }
  // The block's absmax so far, in the form absmax_step continues from (NaN sticks).
  float value() const { return _mm256_movemask_ps(nan) != 0 ? bits_f32(0x7fc00000u) : hmax8(max); }
};

// Codes of 8 values (optim.h: state_encode) stored at dst[0..8).
inline void encode8(const float* x, float inv, const StateCodec& c, uint8_t* dst) {
  __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x), _mm256_set1_ps(inv));
  // clamp_unit with NaN passing through: maxps/minps return the second operand
  // when either is NaN.
  v = _mm256_min_ps(_mm256_set1_ps(1.0f), _mm256_max_ps(_mm256_set1_ps(-1.0f), v));
  const __m256i key = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  const __m256i entry = _mm256_i32gather_epi32(reinterpret_cast<const int*>(c.table), key, 4);
  const __m256i base = _mm256_and_si256(entry, _mm256_set1_epi32(0xff));
  const __m256i m =
      _mm256_or_si256(_mm256_slli_epi32(key, 16),
                      _mm256_and_si256(_mm256_srli_epi32(entry, 8), _mm256_set1_epi32(0xffff)));
  const __m256 below = _mm256_cmp_ps(_mm256_castsi256_ps(m), v, _CMP_LT_OQ);  // false for NaN
  const __m256i q =
      _mm256_sub_epi32(base, _mm256_castps_si256(below));  // the mask is -1 where true
  const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packus_epi16(w, w));
}

// Requantizes len (<= 256) values of one block into dst.
inline void encode_block(const float* x, int64_t len, float inv, const StateCodec& c,
                         uint8_t* dst) {
  int64_t j = 0;
  if (c.table != nullptr) {
    for (; j + 8 <= len; j += 8) encode8(x + j, inv, c, dst + j);
    for (; j < len; ++j) {
      const float v = clamp_unit(x[j] * inv);
      const uint32_t key = state_key(v);
      dst[j] = state_code_from_entry(key, c.table[key], v);
    }
  } else {
    for (; j < len; ++j) dst[j] = state_encode(x[j], inv, c.mid);
  }
}

inline int64_t block_end(int64_t b, int64_t n) {
  const int64_t end = (b + 1) * kStateBlock;
  return end < n ? end : n;
}

// ---------------------------------------------------------------------------
// Kernels.

template <int D, bool FG>
void adam32_impl(const Adam32Args& a, int64_t e0, int64_t e1) {
  const AdamVec k(a.s);
  int64_t i = e0;
  for (; i + 8 <= e1; i += 8) {
    if (((i - e0) & 15) == 0) {
      prefetch_ahead(a.param, i, elem_bytes<D>());
      prefetch_ahead(a.grad, i, elem_bytes<D>());
      prefetch_ahead(a.exp_avg, i, 4);
      prefetch_ahead(a.exp_avg_sq, i, 4);
    }
    __m256 p = load8<D>(a.param, i);
    __m256 m = _mm256_loadu_ps(a.exp_avg + i), v = _mm256_loadu_ps(a.exp_avg_sq + i);
    adam_vec<FG>(p, load8<D>(a.grad, i), m, v, k);
    store8<D>(a.param, i, p);
    _mm256_storeu_ps(a.exp_avg + i, m);
    _mm256_storeu_ps(a.exp_avg_sq + i, v);
  }
  for (; i < e1; ++i) {
    float p = load_as_f32(a.param, i, D);
    adam_update(p, load_as_f32(a.grad, i, D), a.exp_avg[i], a.exp_avg_sq[i], a.s);
    store_from_f32(a.param, i, D, p);
  }
}

template <int D, bool FG>
void adam8_impl(const Adam8Args& a, int64_t b0, int64_t b1) {
  const AdamVec k(a.s);
  alignas(32) float mb[kStateBlock], vb[kStateBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kStateBlock, len = block_end(b, a.n) - begin;
    const float am1 = a.absmax1[b], am2 = a.absmax2[b];
    const __m256 vam1 = _mm256_set1_ps(am1), vam2 = _mm256_set1_ps(am2);
    AbsMax mx1, mx2;
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
      const int64_t i = begin + j;
      if ((j & 15) == 0) {
        prefetch_ahead(a.param, i, elem_bytes<D>());
        prefetch_ahead(a.grad, i, elem_bytes<D>());
        if ((j & 63) == 0) {
          prefetch_ahead(a.q1, i, 1);
          prefetch_ahead(a.q2, i, 1);
        }
      }
      __m256 m = dequant8(a.q1 + i, a.c1->code, vam1);
      __m256 v = dequant8(a.q2 + i, a.c2->code, vam2);
      __m256 p = load8<D>(a.param, i);
      adam_vec<FG>(p, load8<D>(a.grad, i), m, v, k);
      store8<D>(a.param, i, p);
      _mm256_store_ps(mb + j, m);
      _mm256_store_ps(vb + j, v);
      mx1.add(m);
      mx2.add(v);
    }
    float new1 = mx1.value(), new2 = mx2.value();
    for (; j < len; ++j) {
      const int64_t i = begin + j;
      mb[j] = state_dequant(a.c1->code, a.q1[i], am1);
      vb[j] = state_dequant(a.c2->code, a.q2[i], am2);
      float p = load_as_f32(a.param, i, D);
      adam_update(p, load_as_f32(a.grad, i, D), mb[j], vb[j], a.s);
      store_from_f32(a.param, i, D, p);
      new1 = absmax_step(new1, mb[j]);
      new2 = absmax_step(new2, vb[j]);
    }
    new1 = state_absmax_canonical(new1);
    new2 = state_absmax_canonical(new2);
    a.absmax1[b] = new1;
    a.absmax2[b] = new2;
    encode_block(mb, len, state_inv_absmax(new1), *a.c1, a.q1 + begin);
    encode_block(vb, len, state_inv_absmax(new2), *a.c2, a.q2 + begin);
  }
}

template <int D>
void lion32_impl(const Lion32Args& a, int64_t e0, int64_t e1) {
  const LionVec k(a.s);
  int64_t i = e0;
  for (; i + 8 <= e1; i += 8) {
    if (((i - e0) & 15) == 0) {
      prefetch_ahead(a.param, i, elem_bytes<D>());
      prefetch_ahead(a.grad, i, elem_bytes<D>());
      prefetch_ahead(a.exp_avg, i, 4);
    }
    __m256 p = load8<D>(a.param, i);
    __m256 m = _mm256_loadu_ps(a.exp_avg + i);
    lion_vec(p, load8<D>(a.grad, i), m, k);
    store8<D>(a.param, i, p);
    _mm256_storeu_ps(a.exp_avg + i, m);
  }
  for (; i < e1; ++i) {
    float p = load_as_f32(a.param, i, D);
    lion_update(p, load_as_f32(a.grad, i, D), a.exp_avg[i], a.s);
    store_from_f32(a.param, i, D, p);
  }
}

template <int D>
void lion8_impl(const Lion8Args& a, int64_t b0, int64_t b1) {
  const LionVec k(a.s);
  alignas(32) float mb[kStateBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kStateBlock, len = block_end(b, a.n) - begin;
    const float am1 = a.absmax1[b];
    const __m256 vam1 = _mm256_set1_ps(am1);
    AbsMax mx1;
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
      const int64_t i = begin + j;
      if ((j & 15) == 0) {
        prefetch_ahead(a.param, i, elem_bytes<D>());
        prefetch_ahead(a.grad, i, elem_bytes<D>());
        if ((j & 63) == 0) prefetch_ahead(a.q1, i, 1);
      }
      __m256 m = dequant8(a.q1 + i, a.c1->code, vam1);
      __m256 p = load8<D>(a.param, i);
      lion_vec(p, load8<D>(a.grad, i), m, k);
      store8<D>(a.param, i, p);
      _mm256_store_ps(mb + j, m);
      mx1.add(m);
    }
    float new1 = mx1.value();
    for (; j < len; ++j) {
      const int64_t i = begin + j;
      mb[j] = state_dequant(a.c1->code, a.q1[i], am1);
      float p = load_as_f32(a.param, i, D);
      lion_update(p, load_as_f32(a.grad, i, D), mb[j], a.s);
      store_from_f32(a.param, i, D, p);
      new1 = absmax_step(new1, mb[j]);
    }
    new1 = state_absmax_canonical(new1);
    a.absmax1[b] = new1;
    encode_block(mb, len, state_inv_absmax(new1), *a.c1, a.q1 + begin);
  }
}

// Dispatch on the parameter dtype (and on the lerp form for AdamW).
template <template <int, bool> class F, class Args>
void by_dtype_fg(const Args& a, int64_t r0, int64_t r1) {
  const bool fg = a.s.lerp_from_grad != 0;
  if (a.dtype == kF32)
    fg ? F<kF32, true>::run(a, r0, r1) : F<kF32, false>::run(a, r0, r1);
  else if (a.dtype == kF16)
    fg ? F<kF16, true>::run(a, r0, r1) : F<kF16, false>::run(a, r0, r1);
  else
    fg ? F<kBF16, true>::run(a, r0, r1) : F<kBF16, false>::run(a, r0, r1);
}

template <int D, bool FG>
struct Adam32F {
  static void run(const Adam32Args& a, int64_t r0, int64_t r1) { adam32_impl<D, FG>(a, r0, r1); }
};
template <int D, bool FG>
struct Adam8F {
  static void run(const Adam8Args& a, int64_t r0, int64_t r1) { adam8_impl<D, FG>(a, r0, r1); }
};

void adam32(const Adam32Args& a, int64_t e0, int64_t e1) {
  by_dtype_fg<Adam32F>(a, e0, e1);
}
void adam8(const Adam8Args& a, int64_t b0, int64_t b1) {
  by_dtype_fg<Adam8F>(a, b0, b1);
}

void lion32(const Lion32Args& a, int64_t e0, int64_t e1) {
  if (a.dtype == kF32)
    lion32_impl<kF32>(a, e0, e1);
  else if (a.dtype == kF16)
    lion32_impl<kF16>(a, e0, e1);
  else
    lion32_impl<kBF16>(a, e0, e1);
}

void lion8(const Lion8Args& a, int64_t b0, int64_t b1) {
  if (a.dtype == kF32)
    lion8_impl<kF32>(a, b0, b1);
  else if (a.dtype == kF16)
    lion8_impl<kF16>(a, b0, b1);
  else
    lion8_impl<kBF16>(a, b0, b1);
}

}  // namespace

const OptimKernelTable kOptimAvx2Kernels = {"avx2", adam32, adam8, lion32, lion8};

}  // namespace cpu
}  // namespace qpeft
