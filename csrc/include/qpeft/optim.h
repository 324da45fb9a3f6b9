// qpeft optimizer steps: the per-element math shared by the CPU kernels
// (csrc/cpu/optim_*.cpp) and the CUDA kernels (csrc/cuda/optim.cu).
//
// The pure-torch reference (qpeft/backends/default/optim.py) performs the same
// fp32 operations in the same order, one torch op per rounding step, so every
// native kernel equals it bit for bit (tests/test_optim.py). Build with
// -ffp-contract=off (host) and --fmad=false (device): a fused multiply-add
// rounds once where the reference rounds twice. sqrt and division are IEEE
// correctly rounded on both sides (no fast-math); pow() never runs here: the
// bias corrections are computed once per step on the host in double
// (qpeft/_optim_math.py) and arrive as fp32 scalars.
//
// AdamW follows torch.optim.AdamW's single-tensor path operation for operation:
//   p = p * (1 - lr*wd)
//   m = lerp(m, g, 1 - beta1)            (torch's lerp rule, see ema_lerp)
//   v = v * beta2 + ((1 - beta2) * g) * g
//   p = p + (-lr / (1 - beta1^t) * m) / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Lion (Chen et al. 2023, as lion-pytorch / bitsandbytes):
//   p = p * (1 - lr*wd)
//   p = p + (-lr) * sign(m * beta1 + g * (1 - beta1))
//   m = m * beta2 + g * (1 - beta2)
//
// 8-bit state (docs/design.md, "8-bit optimizer state"): blocks of 256 consecutive
// elements of the flattened state, one fp32 absmax per block (the last block may
// be partial), a uint8 code per element into a sorted 256-entry map (signed
// dynamic map for the first moment, unsigned for the second). A step dequantizes
// (code[q] * absmax), updates in fp32, writes the parameter from the fp32 states,
// then takes the new absmax of each block (NaN propagates) and requantizes:
//   x = clamp(state * inv, -1, 1),  inv = absmax > 0 ? 1 / absmax : 0
//   q = #{k : mid[k] < x}  (mid[k] = (code[k] + code[k+1]) / 2; NaN -> 0)
// i.e. the nearest code, a value exactly on a midpoint taking the lower one; except
// that in a map with no negative code (the second moment's) the midpoint between its
// zero and its smallest positive code is 0 (state_zero_mid): a positive v never
// encodes to 0. Nearest rounding would send a block's v below half the smallest code
// (~1.5e-7 of the block's absmax: one large gradient in the block is enough) to an
// exact 0 while m keeps its code, and the next step's sqrt(v) + eps then divides m
// by ~eps: updates of 100-1000x lr where fp32 AdamW stays at lr. Rounded up instead,
// v is at most one smallest code (~3e-7 absmax) above its value.
// This is exact nearest-code rounding, not the 65536-bin grid of format.h's
// quantize_blockwise: that grid has a resolution of 1/32767.5 of the block
// absmax, and the second moment of a block spans many decades (v ~ g^2): every
// v below 1.5e-5 * absmax would land on the grid point nearest 0 and lose its
// magnitude, while the dynamic maps resolve down to ~3e-7 * absmax.
#pragma once

#include <cmath>
#include <cstdint>

#include "format.h"

namespace qpeft {

constexpr int kStateBlock = 256;         // elements per absmax block of 8-bit state
constexpr int64_t kMin8BitNumel = 4096;  // smaller tensors keep fp32 state (Python decides)

// fp32 scalars of one AdamW step (qpeft/_optim_math.py: adam_scalars).
struct AdamScalars {
  float decay;         // 1 - lr * weight_decay
  float lerp_c;        // lerp coefficient: 1 - beta1, or 1 - (1 - beta1) when lerp_from_grad
  int lerp_from_grad;  // fp32(1 - beta1) >= 0.5: torch's lerp then works from the end point
  float beta2;
  float omb2;      // 1 - beta2
  float bc2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
  float neg_step;  // -lr / (1 - beta1^step)
};

// fp32 scalars of one Lion step (qpeft/_optim_math.py: lion_scalars).
struct LionScalars {
  float decay;  // 1 - lr * weight_decay
  float beta1;
  float omb1;  // 1 - beta1
  float beta2;
  float omb2;    // 1 - beta2
  float neg_lr;  // -lr
};

// torch.lerp(m, g, w) with a scalar weight, as ATen's scalar kernel computes it:
// |w| < 0.5 ? m + w * (g - m) : g - (g - m) * (1 - w), where 1 - w is rounded
// to fp32 first (lerp_c holds either w or fp32(1 - w)).
QPEFT_HD float ema_lerp(float m, float g, float lerp_c, int from_grad) {
  const float d = g - m;
  return from_grad ? g - d * lerp_c : m + lerp_c * d;
}

// One AdamW element: updates p, m, v in place (all fp32).
QPEFT_HD void adam_update(float& p, float g, float& m, float& v, const AdamScalars& s) {
  p = p * s.decay;
  m = ema_lerp(m, g, s.lerp_c, s.lerp_from_grad);
  v = v * s.beta2 + (s.omb2 * g) * g;
  const float denom = sqrtf(v) / s.bc2_sqrt + s.eps;
  p = p + (s.neg_step * m) / denom;
}

// sign() that keeps NaN (and the sign of zero), as torch.sign does.
QPEFT_HD float sign_keep_nan(float c) {
  return c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : c);
}

// One Lion element: updates p and m in place.
QPEFT_HD void lion_update(float& p, float g, float& m, const LionScalars& s) {
  p = p * s.decay;
  const float c = m * s.beta1 + g * s.omb1;
  p = p + s.neg_lr * sign_keep_nan(c);
  m = m * s.beta2 + g * s.omb2;
}

// ----------------------------------------------------------------------------
// 8-bit state.

// Running absmax with NaN propagation (fmaxf would drop a NaN): a block holding
// a NaN gets absmax NaN, as torch.amax gives.
QPEFT_HD float absmax_step(float a, float x) {
  const float ax = x < 0.0f ? -x : x;
  return (ax > a || ax != ax) ? ax : a;
}

// The absmax written for a block: a NaN is stored as the canonical quiet NaN
// 0x7fc00000 (which NaN a max picks differs between scalar, SIMD and GPU code),
// so the stored state is bit-identical across backends whatever the input.
QPEFT_HD float state_absmax_canonical(float a) {
  return a != a ? bits_f32(0x7fc00000u) : a;
}

QPEFT_HD float state_dequant(const float* code, uint8_t q, float absmax) {
  return code[q] * absmax;
}

// Scale of a block for requantization; 0 for an all-zero block (every element
// then encodes 0.0's code) and for a NaN absmax (whose dequantized values are
// NaN whatever the codes).
QPEFT_HD float state_inv_absmax(float absmax) {
  return absmax > 0.0f ? 1.0f / absmax : 0.0f;
}

// #{k : mid[k] < x} over the 255 sorted midpoints (8-step binary search; NaN
// compares false everywhere and gives 0). mid may hold a 256th entry: unused.
QPEFT_HD int state_count_below(float x, const float* mid) {
  int lo = 0, hi = kNumCodes8 - 1;  // answer in [0, 255]
  while (lo < hi) {
    const int m = (lo + hi) >> 1;
    if (mid[m] < x)
      lo = m + 1;
    else
      hi = m;
  }
  return lo;
}

// Code of one state element given its block's state_inv_absmax. clamp_unit
// (format.h) keeps NaN; ±inf (an absmax below 2^-126 makes inv overflow) clamp
// to the end codes.
// Whether mid[k] of a sorted map is 0 rather than (code[k] + code[k+1]) / 2: between
// the zero and the smallest positive code of a map with no negative code (above).
QPEFT_HD bool state_zero_mid(const float* code, int k) {
  return code[0] >= 0.0f && code[k] == 0.0f && code[k + 1] > 0.0f;
}

QPEFT_HD uint8_t state_encode(float x, float inv, const float* mid) {
  return static_cast<uint8_t>(state_count_below(clamp_unit(x * inv), mid));
}

// Key of the CPU encoder's 65536-entry table: the top 16 bits of the fp32
// pattern (sign, exponent, 7 mantissa bits). For a sorted map whose midpoints
// are never closer than a key's value range, each key's range holds at most one
// midpoint, so q = base[key] + (mid < x) with base[key] the count at the low end
// of the range and mid the midpoint inside it: the same integer as
// state_count_below with one table load and one compare. The CPU build checks
// that property for the map it is given and falls back to the binary search
// otherwise (csrc/cpu/optim_kernels.h: StateCodec).
QPEFT_HD uint32_t state_key(float x) {
  return f32_bits(x) >> 16;
}

// Code from a table entry (base | low 16 bits of the comparison point << 8).
QPEFT_HD uint8_t state_code_from_entry(uint32_t key, uint32_t entry, float v) {
  const float m = bits_f32((key << 16) | ((entry >> 8) & 0xffffu));
  return static_cast<uint8_t>((entry & 0xffu) + (m < v ? 1u : 0u));
}

}  // namespace qpeft
