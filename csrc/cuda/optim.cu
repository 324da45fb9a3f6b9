// CUDA kernels of the optimizer steps (AdamW and Lion, fp32 or blockwise 8-bit
// state) and their host launchers (ABI: csrc/README.md, csrc/cuda/ops.h).
//
// The per-element math is qpeft/optim.h's (adam_update, lion_update,
// state_dequant, absmax_step, state_encode, ...), shared with the CPU kernels
// that the tests hold to the pure-torch reference bit for bit; these kernels
// only load, call it and store. --fmad=false keeps every product and sum rounded
// on its own; sqrtf and '/' are IEEE round-to-nearest without fast-math, so the
// results equal the CPU's. Elements are loaded, stored and converted with
// kernel_common.h's exact_* family (format.h's software conversions, NaN kept as
// torch keeps it); the argument checks are qpeft/host_checks.h's.
//
// Written for the CPU emulation harness too: launches only through
// qpeft::launch, only threadIdx/blockIdx/blockDim/gridDim, __shared__,
// __syncthreads and __shfl_xor_sync; local arrays are indexed by constants after
// unrolling.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernel_common.h"
#include "launch.h"
#include "ops.h"
#include "qpeft/format.h"
#include "qpeft/host_checks.h"
#include "qpeft/optim.h"

namespace qpeft {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kElems32 = 4;                   // consecutive elements per thread, 32-bit state
constexpr int kLaneElems = kStateBlock / 32;  // 8-bit state: a warp owns one 256-element block
constexpr int kWarpsPerCta = kThreads / 32;
static_assert(kLaneElems == 8, "one 8-byte code word and 8 consecutive values per lane");
// An explicit minimum of one CTA per SM for the 8-bit kernels: with the default,
// ptxas 13.0 squeezed lion8_kernel<fp32> on sm_120 to 48 registers and spilled 4
// bytes; with it, 69 registers and no spill (still 3 CTAs of 256 threads per SM).
constexpr int kMinCtas8 = 1;

// Measured with nvcc 13.0 -Xptxas -v (12 instantiations x sm_75..sm_120): 0 bytes
// spilled everywhere. Registers: adam32 37-40, lion32 30-40, adam8 53-62 (sm_75..
// sm_90) / 72-74 (sm_100, sm_120), lion8 43-56 / 61-69. smem: 4 KB (adam8: two
// maps and their midpoints), 2 KB (lion8).

// ----------------------------------------------------------------------------
// 32-bit state. Each thread updates kElems32 consecutive elements per
// grid-stride iteration (16-byte loads of the fp32 states when vec: every
// pointer 16-byte aligned, or 8-byte for 16-bit params).

template <int DT>
__global__ void __launch_bounds__(kThreads)
    adam32_kernel(ET<DT>* __restrict__ param, const ET<DT>* __restrict__ grad,
                  float* __restrict__ m_state, float* __restrict__ v_state, int64_t n,
                  AdamScalars s, bool vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kElems32;
  for (int64_t e0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kElems32;
       e0 < n; e0 += stride) {
    if (vec && e0 + kElems32 <= n) {
      float p[kElems32], g[kElems32], m[kElems32], v[kElems32];
      load_vec<DT, kElems32>(param + e0, p);
      load_vec<DT, kElems32>(grad + e0, g);
      load4f(m_state + e0, m);
      load4f(v_state + e0, v);
#pragma unroll
      for (int j = 0; j < kElems32; ++j) adam_update(p[j], g[j], m[j], v[j], s);
      store_vec<DT, kElems32>(param + e0, p);
      store4f(m_state + e0, m);
      store4f(v_state + e0, v);
    } else {
#pragma unroll
      for (int j = 0; j < kElems32; ++j) {
        const int64_t i = e0 + j;
        if (i < n) {
          float p = exact_to_f32<DT>(param[i]), m = m_state[i], v = v_state[i];
          adam_update(p, exact_to_f32<DT>(grad[i]), m, v, s);
          param[i] = exact_from_f32<DT>(p);
          m_state[i] = m;
          v_state[i] = v;
        }
      }
    }
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads)
    lion32_kernel(ET<DT>* __restrict__ param, const ET<DT>* __restrict__ grad,
                  float* __restrict__ m_state, int64_t n, LionScalars s, bool vec) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * kElems32;
  for (int64_t e0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kElems32;
       e0 < n; e0 += stride) {
    if (vec && e0 + kElems32 <= n) {
      float p[kElems32], g[kElems32], m[kElems32];
      load_vec<DT, kElems32>(param + e0, p);
      load_vec<DT, kElems32>(grad + e0, g);
      load4f(m_state + e0, m);
#pragma unroll
      for (int j = 0; j < kElems32; ++j) lion_update(p[j], g[j], m[j], s);
      store_vec<DT, kElems32>(param + e0, p);
      store4f(m_state + e0, m);
    } else {
#pragma unroll
      for (int j = 0; j < kElems32; ++j) {
        const int64_t i = e0 + j;
        if (i < n) {
          float p = exact_to_f32<DT>(param[i]), m = m_state[i];
          lion_update(p, exact_to_f32<DT>(grad[i]), m, s);
          param[i] = exact_from_f32<DT>(p);
          m_state[i] = m;
        }
      }
    }
  }
}

// ----------------------------------------------------------------------------
// 8-bit state. A warp owns one 256-element state block per iteration: lane l
// holds elements [8l, 8l+8) (one 8-byte code word per state, one or two 16-byte
// parameter loads), the block's new absmax is a butterfly of xor shuffles (no
// shared memory, no __syncthreads in the loop), and lane 0 writes it. Maps and
// their midpoints live in shared memory (per-element lookups diverge). vec:
// param/grad 16-byte and codes 8-byte aligned; elements past n (last block)
// take the per-element path and count as 0 in the absmax.

// Loads the map into s_code and its midpoints (format.h's midpoint(),
// constexpr host-only, spelled out; optim.h's state_zero_mid) into s_mid,
// s_mid[255] = +inf.
__device__ __forceinline__ void stage_map(const float* __restrict__ code, float* s_code,
                                          float* s_mid) {
  for (int k = static_cast<int>(threadIdx.x); k < kNumCodes8; k += static_cast<int>(blockDim.x)) {
    const float c = code[k];
    s_code[k] = c;
    s_mid[k] = k < kNumCodes8 - 1 ? (state_zero_mid(code, k) ? 0.0f : (c + code[k + 1]) / 2.0f)
                                  : bits_f32(0x7f800000u);
  }
}

// Dequantizes a lane's 8 codes (vector path: one 8-byte load).
__device__ __forceinline__ void dequant_lane(const uint8_t* __restrict__ q, int64_t e0, int64_t n,
                                             bool full, const float* s_code, float absmax,
                                             float (&x)[kLaneElems]) {
  if (full) {
    const uint2 w = *reinterpret_cast<const uint2*>(q + e0);
#pragma unroll
    for (int j = 0; j < kLaneElems; ++j) {
      const uint32_t word = j < 4 ? w.x : w.y;
      x[j] = state_dequant(s_code, static_cast<uint8_t>(word >> (8 * (j & 3))), absmax);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kLaneElems; ++j)
      x[j] = e0 + j < n ? state_dequant(s_code, q[e0 + j], absmax) : 0.0f;
  }
}

// The warp's block absmax of x (lanes' elements past n hold 0), NaN-propagating,
// canonical NaN; every lane gets it.
__device__ __forceinline__ float warp_absmax(const float (&x)[kLaneElems]) {
  float a = 0.0f;
#pragma unroll
  for (int j = 0; j < kLaneElems; ++j) a = absmax_step(a, x[j]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, a, off);
    a = (o > a || o != o) ? o : a;  // absmax_step on non-negative values
  }
  return state_absmax_canonical(a);
}

__device__ __forceinline__ void encode_lane(uint8_t* __restrict__ q, int64_t e0, int64_t n,
                                            bool full, const float* s_mid, float inv,
                                            const float (&x)[kLaneElems]) {
  uint32_t w0 = 0, w1 = 0;
#pragma unroll
  for (int j = 0; j < kLaneElems; ++j) {
    const uint32_t c = state_encode(x[j], inv, s_mid);
    if (j < 4)
      w0 |= c << (8 * j);
    else
      w1 |= c << (8 * (j - 4));
  }
  if (full) {
    *reinterpret_cast<uint2*>(q + e0) = make_uint2(w0, w1);
  } else {
#pragma unroll
    for (int j = 0; j < kLaneElems; ++j) {
      if (e0 + j < n) q[e0 + j] = static_cast<uint8_t>((j < 4 ? w0 : w1) >> (8 * (j & 3)));
    }
  }
}

template <int DT>
__device__ __forceinline__ void load_params(const ET<DT>* __restrict__ x, int64_t e0, int64_t n,
                                            bool full, float (&v)[kLaneElems]) {
  if (full) {
    load_vec<DT, kLaneElems>(x + e0, v);
  } else {
#pragma unroll
    for (int j = 0; j < kLaneElems; ++j) v[j] = e0 + j < n ? exact_to_f32<DT>(x[e0 + j]) : 0.0f;
  }
}

template <int DT>
__device__ __forceinline__ void store_params(ET<DT>* __restrict__ x, int64_t e0, int64_t n,
                                             bool full, const float (&v)[kLaneElems]) {
  if (full) {
    store_vec<DT, kLaneElems>(x + e0, v);
  } else {
#pragma unroll
    for (int j = 0; j < kLaneElems; ++j) {
      if (e0 + j < n) x[e0 + j] = exact_from_f32<DT>(v[j]);
    }
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads, kMinCtas8)
    adam8_kernel(ET<DT>* __restrict__ param, const ET<DT>* __restrict__ grad,
                 uint8_t* __restrict__ q1, float* __restrict__ absmax1, uint8_t* __restrict__ q2,
                 float* __restrict__ absmax2, const float* __restrict__ code1,
                 const float* __restrict__ code2, int64_t n, AdamScalars s, bool vec) {
  __shared__ float s_code1[kNumCodes8], s_mid1[kNumCodes8], s_code2[kNumCodes8], s_mid2[kNumCodes8];
  stage_map(code1, s_code1, s_mid1);
  stage_map(code2, s_code2, s_mid2);
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t nblocks = n / kStateBlock + (n % kStateBlock != 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerCta;
  // b is uniform over the warp, so every lane reaches the shuffles together.
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
       b < nblocks; b += stride) {
    const int64_t e0 = b * kStateBlock + lane * kLaneElems;
    const bool full = vec && e0 + kLaneElems <= n;
    float p[kLaneElems], g[kLaneElems], m[kLaneElems], v[kLaneElems];
    dequant_lane(q1, e0, n, full, s_code1, absmax1[b], m);
    dequant_lane(q2, e0, n, full, s_code2, absmax2[b], v);
    load_params<DT>(param, e0, n, full, p);
    load_params<DT>(grad, e0, n, full, g);
#pragma unroll
    for (int j = 0; j < kLaneElems; ++j) {
      adam_update(p[j], g[j], m[j], v[j], s);
      if (e0 + j >= n) m[j] = v[j] = 0.0f;  // past the end: no say in the absmax
    }
    store_params<DT>(param, e0, n, full, p);
    const float new1 = warp_absmax(m), new2 = warp_absmax(v);
    if (lane == 0) {  // every lane has read absmax1[b]/absmax2[b] before the shuffles above
      absmax1[b] = new1;
      absmax2[b] = new2;
    }
    encode_lane(q1, e0, n, full, s_mid1, state_inv_absmax(new1), m);
    encode_lane(q2, e0, n, full, s_mid2, state_inv_absmax(new2), v);
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads, kMinCtas8)
    lion8_kernel(ET<DT>* __restrict__ param, const ET<DT>* __restrict__ grad,
                 uint8_t* __restrict__ q1, float* __restrict__ absmax1,
                 const float* __restrict__ code1, int64_t n, LionScalars s, bool vec) {
  __shared__ float s_code1[kNumCodes8], s_mid1[kNumCodes8];
  stage_map(code1, s_code1, s_mid1);
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t nblocks = n / kStateBlock + (n % kStateBlock != 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarpsPerCta;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + (threadIdx.x >> 5);
       b < nblocks; b += stride) {
    const int64_t e0 = b * kStateBlock + lane * kLaneElems;
    const bool full = vec && e0 + kLaneElems <= n;
    float p[kLaneElems], g[kLaneElems], m[kLaneElems];
    dequant_lane(q1, e0, n, full, s_code1, absmax1[b], m);
    load_params<DT>(param, e0, n, full, p);
    load_params<DT>(grad, e0, n, full, g);
#pragma unroll
    for (int j = 0; j < kLaneElems; ++j) {
      lion_update(p[j], g[j], m[j], s);
      if (e0 + j >= n) m[j] = 0.0f;
    }
    store_params<DT>(param, e0, n, full, p);
    const float new1 = warp_absmax(m);
    if (lane == 0) absmax1[b] = new1;
    encode_lane(q1, e0, n, full, s_mid1, state_inv_absmax(new1), m);
  }
}

// ----------------------------------------------------------------------------
// Host side: the same checks as the CPU entry points (qpeft/host_checks.h,
// std::invalid_argument before any CUDA call), then one launch on `stream`.

// 32-bit kernels: 16-byte state/param accesses (8-byte for 16-bit params).
bool vec32(int dtype, std::uintptr_t param, std::uintptr_t grad, std::uintptr_t m,
           std::uintptr_t v) {
  const std::uintptr_t pa = dtype == kF32 ? 16 : 8;
  return aligned(param, pa) && aligned(grad, pa) && aligned(m, 16) && aligned(v, 16);
}

// 8-bit kernels: 16-byte param/grad accesses, 8-byte code words.
bool vec8(std::uintptr_t param, std::uintptr_t grad, std::uintptr_t q1, std::uintptr_t q2) {
  return aligned(param, 16) && aligned(grad, 16) && aligned(q1, 8) && aligned(q2, 8);
}

}  // namespace

// ----------------------------------------------------------------------------

void adamw32_step(std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
                  std::uintptr_t exp_avg, std::int64_t exp_avg_len, std::uintptr_t exp_avg_sq,
                  std::int64_t exp_avg_sq_len, const AdamScalars& s, std::uintptr_t stream) {
  const char* fn = "adamw32_step";
  host::check_n_dtype(fn, dtype, n);
  host::check_adam_scalars(fn, s);
  host::check_len_exact(fn, "exp_avg", exp_avg_len, n);
  host::check_len_exact(fn, "exp_avg_sq", exp_avg_sq_len, n);
  if (n == 0) return;
  host::check_ptr(fn, "param", param);
  host::check_ptr(fn, "grad", grad);
  host::check_ptr(fn, "exp_avg", exp_avg);
  host::check_ptr(fn, "exp_avg_sq", exp_avg_sq);
  const unsigned grid = grid_for(n, int64_t{kThreads} * kElems32);
  const bool vec = vec32(dtype, param, grad, exp_avg, exp_avg_sq);
  with_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    launch("adamw32_step", adam32_kernel<DT>, grid, kThreads, 0, as_stream(stream),
           reinterpret_cast<ET<DT>*>(param), reinterpret_cast<const ET<DT>*>(grad),
           reinterpret_cast<float*>(exp_avg), reinterpret_cast<float*>(exp_avg_sq), n, s, vec);
  });
}

void adamw8bit_step(std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
                    std::uintptr_t q1, std::int64_t q1_len, std::uintptr_t absmax1,
                    std::int64_t absmax1_len, std::uintptr_t q2, std::int64_t q2_len,
                    std::uintptr_t absmax2, std::int64_t absmax2_len, std::uintptr_t code1,
                    std::uintptr_t code2, const AdamScalars& s, std::uintptr_t stream) {
  const char* fn = "adamw8bit_step";
  host::check_n_dtype(fn, dtype, n);
  host::check_adam_scalars(fn, s);
  const int64_t nblocks = ceil_div(n, kStateBlock);
  host::check_len_exact(fn, "exp_avg_q", q1_len, n);
  host::check_len_exact(fn, "exp_avg_absmax", absmax1_len, nblocks);
  host::check_len_exact(fn, "exp_avg_sq_q", q2_len, n);
  host::check_len_exact(fn, "exp_avg_sq_absmax", absmax2_len, nblocks);
  host::check_ptr(fn, "qmap_signed", code1);
  host::check_ptr(fn, "qmap_unsigned", code2);
  if (n == 0) return;
  host::check_ptr(fn, "param", param);
  host::check_ptr(fn, "grad", grad);
  host::check_ptr(fn, "exp_avg_q", q1);
  host::check_ptr(fn, "exp_avg_absmax", absmax1);
  host::check_ptr(fn, "exp_avg_sq_q", q2);
  host::check_ptr(fn, "exp_avg_sq_absmax", absmax2);
  const unsigned grid = grid_for(nblocks, kWarpsPerCta);
  const bool vec = vec8(param, grad, q1, q2);
  with_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    launch("adamw8bit_step", adam8_kernel<DT>, grid, kThreads, 0, as_stream(stream),
           reinterpret_cast<ET<DT>*>(param), reinterpret_cast<const ET<DT>*>(grad),
           reinterpret_cast<uint8_t*>(q1), reinterpret_cast<float*>(absmax1),
           reinterpret_cast<uint8_t*>(q2), reinterpret_cast<float*>(absmax2),
           reinterpret_cast<const float*>(code1), reinterpret_cast<const float*>(code2), n, s, vec);
  });
}

void lion32_step(std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
                 std::uintptr_t exp_avg, std::int64_t exp_avg_len, const LionScalars& s,
                 std::uintptr_t stream) {
  const char* fn = "lion32_step";
  host::check_n_dtype(fn, dtype, n);
  host::check_lion_scalars(fn, s);
  host::check_len_exact(fn, "exp_avg", exp_avg_len, n);
  if (n == 0) return;
  host::check_ptr(fn, "param", param);
  host::check_ptr(fn, "grad", grad);
  host::check_ptr(fn, "exp_avg", exp_avg);
  const unsigned grid = grid_for(n, int64_t{kThreads} * kElems32);
  const bool vec = vec32(dtype, param, grad, exp_avg, exp_avg);
  with_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    launch("lion32_step", lion32_kernel<DT>, grid, kThreads, 0, as_stream(stream),
           reinterpret_cast<ET<DT>*>(param), reinterpret_cast<const ET<DT>*>(grad),
           reinterpret_cast<float*>(exp_avg), n, s, vec);
  });
}

void lion8bit_step(std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
                   std::uintptr_t q1, std::int64_t q1_len, std::uintptr_t absmax1,
                   std::int64_t absmax1_len, std::uintptr_t code1, const LionScalars& s,
                   std::uintptr_t stream) {
  const char* fn = "lion8bit_step";
  host::check_n_dtype(fn, dtype, n);
  host::check_lion_scalars(fn, s);
  const int64_t nblocks = ceil_div(n, kStateBlock);
  host::check_len_exact(fn, "exp_avg_q", q1_len, n);
  host::check_len_exact(fn, "exp_avg_absmax", absmax1_len, nblocks);
  host::check_ptr(fn, "qmap_signed", code1);
  if (n == 0) return;
  host::check_ptr(fn, "param", param);
  host::check_ptr(fn, "grad", grad);
  host::check_ptr(fn, "exp_avg_q", q1);
  host::check_ptr(fn, "exp_avg_absmax", absmax1);
  const unsigned grid = grid_for(nblocks, kWarpsPerCta);
  const bool vec = vec8(param, grad, q1, q1);
  with_dtype(dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    launch("lion8bit_step", lion8_kernel<DT>, grid, kThreads, 0, as_stream(stream),
           reinterpret_cast<ET<DT>*>(param), reinterpret_cast<const ET<DT>*>(grad),
           reinterpret_cast<uint8_t*>(q1), reinterpret_cast<float*>(absmax1),
           reinterpret_cast<const float*>(code1), n, s, vec);
  });
}

}  // namespace cuda
}  // namespace qpeft
