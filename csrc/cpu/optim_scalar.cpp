// Scalar optimizer kernels: optim.h's per-element functions in plain loops. The
// reference the AVX2 kernels are held to (tests/test_optim.py, via set_isa).

#include <qpeft/format.h>
#include <qpeft/optim.h>

#include "optim_kernels.h"

namespace qpeft {
namespace cpu {
namespace {

inline int64_t block_end(int64_t b, int64_t n) {
  const int64_t end = (b + 1) * kStateBlock;
  return end < n ? end : n;
}

inline uint8_t encode(float x, float inv, const StateCodec& c) {
  if (c.table == nullptr) return state_encode(x, inv, c.mid);
  const float v = clamp_unit(x * inv);
  const uint32_t key = state_key(v);
  return state_code_from_entry(key, c.table[key], v);
}

template <int D>
void adam32_impl(const Adam32Args& a, int64_t e0, int64_t e1) {
  for (int64_t i = e0; i < e1; ++i) {
    float p = load_as_f32(a.param, i, D);
    adam_update(p, load_as_f32(a.grad, i, D), a.exp_avg[i], a.exp_avg_sq[i], a.s);
    store_from_f32(a.param, i, D, p);
  }
}

template <int D>
void adam8_impl(const Adam8Args& a, int64_t b0, int64_t b1) {
  float m[kStateBlock], v[kStateBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kStateBlock, end = block_end(b, a.n);
    const float am1 = a.absmax1[b], am2 = a.absmax2[b];
    float new1 = 0.0f, new2 = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j = i - begin;
      m[j] = state_dequant(a.c1->code, a.q1[i], am1);
      v[j] = state_dequant(a.c2->code, a.q2[i], am2);
      float p = load_as_f32(a.param, i, D);
      adam_update(p, load_as_f32(a.grad, i, D), m[j], v[j], a.s);
      store_from_f32(a.param, i, D, p);
      new1 = absmax_step(new1, m[j]);
      new2 = absmax_step(new2, v[j]);
    }
    new1 = state_absmax_canonical(new1);
    new2 = state_absmax_canonical(new2);
    a.absmax1[b] = new1;
    a.absmax2[b] = new2;
    const float inv1 = state_inv_absmax(new1), inv2 = state_inv_absmax(new2);
    for (int64_t i = begin; i < end; ++i) {
      a.q1[i] = encode(m[i - begin], inv1, *a.c1);
      a.q2[i] = encode(v[i - begin], inv2, *a.c2);
    }
  }
}

template <int D>
void lion32_impl(const Lion32Args& a, int64_t e0, int64_t e1) {
  for (int64_t i = e0; i < e1; ++i) {
    float p = load_as_f32(a.param, i, D);
    lion_update(p, load_as_f32(a.grad, i, D), a.exp_avg[i], a.s);
    store_from_f32(a.param, i, D, p);
  }
}

template <int D>
void lion8_impl(const Lion8Args& a, int64_t b0, int64_t b1) {
  float m[kStateBlock];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * kStateBlock, end = block_end(b, a.n);
    const float am1 = a.absmax1[b];
    float new1 = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t j = i - begin;
      m[j] = state_dequant(a.c1->code, a.q1[i], am1);
      float p = load_as_f32(a.param, i, D);
      lion_update(p, load_as_f32(a.grad, i, D), m[j], a.s);
      store_from_f32(a.param, i, D, p);
      new1 = absmax_step(new1, m[j]);
    }
    new1 = state_absmax_canonical(new1);
    a.absmax1[b] = new1;
    const float inv1 = state_inv_absmax(new1);
    for (int64_t i = begin; i < end; ++i) a.q1[i] = encode(m[i - begin], inv1, *a.c1);
  }
}

// Dtype dispatch: one instantiation per parameter dtype.
#define QPEFT_BY_DTYPE(NAME, ARGS)                   \
  void NAME(const ARGS& a, int64_t r0, int64_t r1) { \
    if (a.dtype == kF32)                             \
      NAME##_impl<kF32>(a, r0, r1);                  \
    else if (a.dtype == kF16)                        \
      NAME##_impl<kF16>(a, r0, r1);                  \
    else                                             \
      NAME##_impl<kBF16>(a, r0, r1);                 \
  }
QPEFT_BY_DTYPE(adam32, Adam32Args)
QPEFT_BY_DTYPE(adam8, Adam8Args)
QPEFT_BY_DTYPE(lion32, Lion32Args)
QPEFT_BY_DTYPE(lion8, Lion8Args)
#undef QPEFT_BY_DTYPE

}  // namespace

const OptimKernelTable kOptimScalarKernels = {"scalar", adam32, adam8, lion32, lion8};

}  // namespace cpu
}  // namespace qpeft
