// AVX-512 (F/BW/VL/DQ) optimizer kernels: optim_avx2.cpp on 16 lanes. Compiled with
// the avx512 level's flags (CMakeLists.txt) and entered only at that level or above
// (isa_tables.h).
//
// Bit-identical to optim_scalar.cpp, as the AVX2 kernels are: optim.h's fp32
// operations in the same order (no fmadd; -ffp-contract=off), the element tails call
// optim.h itself, and the 8-bit encoder computes the same integer (the key table of
// optim_kernels.h, gathered 16 at a time). The block absmax is a max over |x| plus an
// unordered-compare NaN mask, then state_absmax_canonical. Prefetching as in the AVX2
// kernels (every 16 elements). The fp32-state steps stay on the AVX2 kernels (see the
// table at the end).

#define QPEFT_HD static inline
#include <qpeft/format.h>
#include <qpeft/optim.h>

#include <immintrin.h>

#include "avx512_common.h"
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
// The updates on 16 lanes (optim.h: adam_update, lion_update).

struct AdamVec {
  __m512 decay, lerp_c, beta2, omb2, bc2_sqrt, eps, neg_step;
  explicit AdamVec(const AdamScalars& s)
      : decay(_mm512_set1_ps(s.decay)),
        lerp_c(_mm512_set1_ps(s.lerp_c)),
        beta2(_mm512_set1_ps(s.beta2)),
        omb2(_mm512_set1_ps(s.omb2)),
        bc2_sqrt(_mm512_set1_ps(s.bc2_sqrt)),
        eps(_mm512_set1_ps(s.eps)),
        neg_step(_mm512_set1_ps(s.neg_step)) {}
};

template <bool FROM_GRAD>
inline void adam_vec(__m512& p, __m512 g, __m512& m, __m512& v, const AdamVec& k) {
  p = _mm512_mul_ps(p, k.decay);
  const __m512 d = _mm512_sub_ps(g, m);
  m = FROM_GRAD ? _mm512_sub_ps(g, _mm512_mul_ps(d, k.lerp_c))
                : _mm512_add_ps(m, _mm512_mul_ps(k.lerp_c, d));
  v = _mm512_add_ps(_mm512_mul_ps(v, k.beta2), _mm512_mul_ps(_mm512_mul_ps(k.omb2, g), g));
  const __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(v), k.bc2_sqrt), k.eps);
  p = _mm512_add_ps(p, _mm512_div_ps(_mm512_mul_ps(k.neg_step, m), denom));
}

struct LionVec {
  __m512 decay, beta1, omb1, beta2, omb2, neg_lr;
  explicit LionVec(const LionScalars& s)
      : decay(_mm512_set1_ps(s.decay)),
        beta1(_mm512_set1_ps(s.beta1)),
        omb1(_mm512_set1_ps(s.omb1)),
        beta2(_mm512_set1_ps(s.beta2)),
        omb2(_mm512_set1_ps(s.omb2)),
        neg_lr(_mm512_set1_ps(s.neg_lr)) {}
};

inline void lion_vec(__m512& p, __m512 g, __m512& m, const LionVec& k) {
  p = _mm512_mul_ps(p, k.decay);
  const __m512 c = _mm512_add_ps(_mm512_mul_ps(m, k.beta1), _mm512_mul_ps(g, k.omb1));
  const __m512 zero = _mm512_setzero_ps();
  // sign_keep_nan: 1 where c > 0, -1 where c < 0, c itself otherwise (±0, NaN)
  __m512 s = _mm512_mask_mov_ps(c, _mm512_cmp_ps_mask(c, zero, _CMP_GT_OQ), _mm512_set1_ps(1.0f));
  s = _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(c, zero, _CMP_LT_OQ), _mm512_set1_ps(-1.0f));
  p = _mm512_add_ps(p, _mm512_mul_ps(k.neg_lr, s));
  m = _mm512_add_ps(_mm512_mul_ps(m, k.beta2), _mm512_mul_ps(g, k.omb2));
}

// ---------------------------------------------------------------------------
// 8-bit state helpers.

inline __m512 dequant8(const uint8_t* q, const float* code, __m512 absmax) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  return _mm512_mul_ps(_mm512_i32gather_ps(idx, code, 4), absmax);
}

// Running |x| max and NaN flag of a block.
struct AbsMax {
  __m512 max = _mm512_setzero_ps();
  __mmask16 nan = 0;
  void add(__m512 x) {
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    max = _mm512_max_ps(max, _mm512_abs_ps(x));
  }
  // The block's absmax so far, in the form absmax_step continues from (NaN sticks).
  float value() const { return nan != 0 ? bits_f32(0x7fc00000u) : hmax16(max); }
};

// Codes of 16 values (optim.h: state_encode) stored at dst[0..16).
inline void encode16(const float* x, float inv, const StateCodec& c, uint8_t* dst) {
  __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(inv));
  // clamp_unit with NaN passing through: maxps/minps return the second operand
  // when either is NaN.
  v = _mm512_min_ps(_mm512_set1_ps(1.0f), _mm512_max_ps(_mm512_set1_ps(-1.0f), v));
  const __m512i key = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
  const __m512i entry = _mm512_i32gather_epi32(key, reinterpret_cast<const int*>(c.table), 4);
  const __m512i base = _mm512_and_si512(entry, _mm512_set1_epi32(0xff));
  const __m512i m =
      _mm512_or_si512(_mm512_slli_epi32(key, 16),
                      _mm512_and_si512(_mm512_srli_epi32(entry, 8), _mm512_set1_epi32(0xffff)));
  const __mmask16 below =
      _mm512_cmp_ps_mask(_mm512_castsi512_ps(m), v, _CMP_LT_OQ);  // false for NaN
  const __m512i q = _mm512_mask_add_epi32(base, below, base, _mm512_set1_epi32(1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(q));
}

// Requantizes len (<= 256) values of one block into dst.
inline void encode_block(const float* x, int64_t len, float inv, const StateCodec& c,
                         uint8_t* dst) {
  int64_t j = 0;
  if (c.table != nullptr) {
    for (; j + 16 <= len; j += 16) encode16(x + j, inv, c, dst + j);
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
void adam8_impl(const Adam8Args& a, int64_t b0, int64_t b1) {
  const AdamVec k(a.s);
  alignas(64) float mb[kStateBlock], vb[kStateBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kStateBlock, len = block_end(b, a.n) - begin;
    const float am1 = a.absmax1[b], am2 = a.absmax2[b];
    const __m512 vam1 = _mm512_set1_ps(am1), vam2 = _mm512_set1_ps(am2);
    AbsMax mx1, mx2;
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
      const int64_t i = begin + j;
      if ((j & 15) == 0) {
        prefetch_ahead(a.param, i, elem_bytes<D>());
        prefetch_ahead(a.grad, i, elem_bytes<D>());
        if ((j & 63) == 0) {
          prefetch_ahead(a.q1, i, 1);
          prefetch_ahead(a.q2, i, 1);
        }
      }
      __m512 m = dequant8(a.q1 + i, a.c1->code, vam1);
      __m512 v = dequant8(a.q2 + i, a.c2->code, vam2);
      __m512 p = load16<D>(a.param, i);
      adam_vec<FG>(p, load16<D>(a.grad, i), m, v, k);
      store16<D>(a.param, i, p);
      _mm512_store_ps(mb + j, m);
      _mm512_store_ps(vb + j, v);
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
void lion8_impl(const Lion8Args& a, int64_t b0, int64_t b1) {
  const LionVec k(a.s);
  alignas(64) float mb[kStateBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kStateBlock, len = block_end(b, a.n) - begin;
    const float am1 = a.absmax1[b];
    const __m512 vam1 = _mm512_set1_ps(am1);
    AbsMax mx1;
    int64_t j = 0;
    for (; j + 16 <= len; j += 16) {
      const int64_t i = begin + j;
      if ((j & 15) == 0) {
        prefetch_ahead(a.param, i, elem_bytes<D>());
        prefetch_ahead(a.grad, i, elem_bytes<D>());
        if ((j & 63) == 0) prefetch_ahead(a.q1, i, 1);
      }
      __m512 m = dequant8(a.q1 + i, a.c1->code, vam1);
      __m512 p = load16<D>(a.param, i);
      lion_vec(p, load16<D>(a.grad, i), m, k);
      store16<D>(a.param, i, p);
      _mm512_store_ps(mb + j, m);
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
struct Adam8F {
  static void run(const Adam8Args& a, int64_t r0, int64_t r1) { adam8_impl<D, FG>(a, r0, r1); }
};

void adam8(const Adam8Args& a, int64_t b0, int64_t b1) {
  by_dtype_fg<Adam8F>(a, b0, b1);
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

// No AdamW or Lion with fp32 state here: 16-lane versions (AdamW: commit 2ce2065, Lion: a87c17f)
// measured no faster than the AVX2 kernels in benchmarks/isa_ab.py (16M parameters, one thread,
// 2-core Sapphire Rapids-class Xeon VM; avx2/avx512 median ratios AdamW 0.93-1.00 over
// three runs, Lion 0.99-1.16 over six with a median of 1.02, inside the noise: the same
// kernel measured 0.85-1.04 against itself): a step moves 20-28 bytes per element and is
// bound by memory, not by the lanes. nullptr: this level runs the AVX2 kernels there.
const OptimKernelTable kOptimAvx512Kernels = {"avx512", nullptr, adam8, nullptr, lion8};

}  // namespace cpu
}  // namespace qpeft
