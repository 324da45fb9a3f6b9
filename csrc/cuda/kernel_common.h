// Pieces shared by the CUDA kernel files (csrc/cuda/*.cu): element types, their
// loads, stores and conversions (device side), and the launch helpers of the
// host launchers (whose argument checks are qpeft/host_checks.h's). Compiled by
// nvcc for qpeft._C_cuda and by the host compiler for the emulation module
// qpeft._C_cuda_emu (csrc/emu).
//
// Two conversion families, which differ only for NaN:
//  * to_f32 / pack2_16 / store1 / store8 / ldg8 (quantization, GEMV): the
//    cuda_fp16.h / cuda_bf16.h intrinsics, one instruction each. The toolkit
//    implements them for the host too, rounding as the device does (RNE; a NaN
//    becomes the canonical 0x7fff), so the emulation runs the device code path
//    itself, not a stand-in. Outputs are compared with torch's as values.
//  * exact_to_f32 / exact_from_f32 / load_vec / store_vec (optimizer steps):
//    format.h's software conversions, bit-exact with torch's .to() including a
//    NaN's sign and payload, so a step equals the CPU kernels and the pure-torch
//    reference bit for bit (a few integer ops per element; those kernels are
//    memory-bound).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "launch.h"  // first of our headers: in the emulation build it defines the CUDA builtins
#include "qpeft/format.h"
#include "qpeft/host_checks.h"

namespace qpeft {
namespace cuda {

constexpr int64_t kMaxGrid = int64_t{1} << 20;  // launchers grid-stride beyond this many blocks

// ----------------------------------------------------------------------------
// Element types: fp32 as float, fp16 / bf16 as their raw 16 bits.

template <int DT>
struct Elem {
  using T = uint16_t;
};
template <>
struct Elem<kF32> {
  using T = float;
};
template <int DT>
using ET = typename Elem<DT>::T;

template <int DT>
__device__ __forceinline__ float to_f32(ET<DT> v) {
  if constexpr (DT == kF32) {
    return v;
  } else if constexpr (DT == kBF16) {
    return __bfloat162float(__ushort_as_bfloat16(v));  // exact
  } else {
    return __half2float(__ushort_as_half(v));  // exact
  }
}

// Two fp32 values to two 16-bit values (a at the lower address), RNE. Equal to
// format.h's f32_to_f16 / f32_to_bf16 (and torch's .to()) for every non-NaN
// input; a NaN becomes the device's canonical 0x7fff.
template <int DT>
__device__ __forceinline__ uint32_t pack2_16(float a, float b) {
  if constexpr (DT == kBF16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return static_cast<uint32_t>(__bfloat16_as_ushort(h.x)) |
           (static_cast<uint32_t>(__bfloat16_as_ushort(h.y)) << 16);
  } else {
    const __half2 h = __floats2half2_rn(a, b);
    return static_cast<uint32_t>(__half_as_ushort(__low2half(h))) |
           (static_cast<uint32_t>(__half_as_ushort(__high2half(h))) << 16);
  }
}

template <int DT>
__device__ __forceinline__ void store1(ET<DT>* out, int64_t i, float v) {
  if constexpr (DT == kF32) {
    out[i] = v;
  } else {
    out[i] = static_cast<uint16_t>(pack2_16<DT>(v, 0.0f));
  }
}

// Stores v[0..7] at out[i..i+8): 16-byte aligned, in bounds (the callers check).
template <int DT>
__device__ __forceinline__ void store8(ET<DT>* out, int64_t i, const float (&v)[8]) {
  if constexpr (DT == kF32) {
    float4* p = reinterpret_cast<float4*>(out + i);
    p[0] = make_float4(v[0], v[1], v[2], v[3]);
    p[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
    *reinterpret_cast<uint4*>(out + i) =
        make_uint4(pack2_16<DT>(v[0], v[1]), pack2_16<DT>(v[2], v[3]), pack2_16<DT>(v[4], v[5]),
                   pack2_16<DT>(v[6], v[7]));
  }
}

// format.h's conversions (NaN kept as torch keeps it; see the top of the file).
template <int DT>
__device__ __forceinline__ float exact_to_f32(ET<DT> x) {
  if constexpr (DT == kF32)
    return x;
  else if constexpr (DT == kBF16)
    return bf16_to_f32(x);
  else
    return f16_to_f32(x);
}

template <int DT>
__device__ __forceinline__ ET<DT> exact_from_f32(float x) {
  if constexpr (DT == kF32)
    return x;
  else if constexpr (DT == kBF16)
    return f32_to_bf16(x);
  else
    return f32_to_f16(x);
}

// Loads N = 4 or 8 consecutive elements as fp32 with exact_to_f32 (one or two
// 16-byte loads for fp32, one 8- or 16-byte load for 16-bit types); the caller
// checked alignment and bounds.
template <int DT, int N>
__device__ __forceinline__ void load_vec(const ET<DT>* __restrict__ x, float (&v)[N]) {
  static_assert(N == 4 || N == 8, "4 or 8 elements");
  if constexpr (DT == kF32) {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const float4 w = reinterpret_cast<const float4*>(x)[k];
      v[4 * k] = w.x;
      v[4 * k + 1] = w.y;
      v[4 * k + 2] = w.z;
      v[4 * k + 3] = w.w;
    }
  } else if constexpr (N == 4) {
    const uint2 w = *reinterpret_cast<const uint2*>(x);
    v[0] = exact_to_f32<DT>(static_cast<uint16_t>(w.x));
    v[1] = exact_to_f32<DT>(static_cast<uint16_t>(w.x >> 16));
    v[2] = exact_to_f32<DT>(static_cast<uint16_t>(w.y));
    v[3] = exact_to_f32<DT>(static_cast<uint16_t>(w.y >> 16));
  } else {
    const uint4 w = *reinterpret_cast<const uint4*>(x);
    v[0] = exact_to_f32<DT>(static_cast<uint16_t>(w.x));
    v[1] = exact_to_f32<DT>(static_cast<uint16_t>(w.x >> 16));
    v[2] = exact_to_f32<DT>(static_cast<uint16_t>(w.y));
    v[3] = exact_to_f32<DT>(static_cast<uint16_t>(w.y >> 16));
    v[4] = exact_to_f32<DT>(static_cast<uint16_t>(w.z));
    v[5] = exact_to_f32<DT>(static_cast<uint16_t>(w.z >> 16));
    v[6] = exact_to_f32<DT>(static_cast<uint16_t>(w.w));
    v[7] = exact_to_f32<DT>(static_cast<uint16_t>(w.w >> 16));
  }
}

__device__ __forceinline__ uint32_t pack16(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// Stores N = 4 or 8 fp32 values as consecutive elements with exact_from_f32;
// the caller checked alignment and bounds.
template <int DT, int N>
__device__ __forceinline__ void store_vec(ET<DT>* __restrict__ x, const float (&v)[N]) {
  static_assert(N == 4 || N == 8, "4 or 8 elements");
  if constexpr (DT == kF32) {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      reinterpret_cast<float4*>(x)[k] =
          make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
    }
  } else if constexpr (N == 4) {
    *reinterpret_cast<uint2*>(x) =
        make_uint2(pack16(exact_from_f32<DT>(v[0]), exact_from_f32<DT>(v[1])),
                   pack16(exact_from_f32<DT>(v[2]), exact_from_f32<DT>(v[3])));
  } else {
    *reinterpret_cast<uint4*>(x) =
        make_uint4(pack16(exact_from_f32<DT>(v[0]), exact_from_f32<DT>(v[1])),
                   pack16(exact_from_f32<DT>(v[2]), exact_from_f32<DT>(v[3])),
                   pack16(exact_from_f32<DT>(v[4]), exact_from_f32<DT>(v[5])),
                   pack16(exact_from_f32<DT>(v[6]), exact_from_f32<DT>(v[7])));
  }
}

// Four fp32 values at a 16-byte aligned address.
__device__ __forceinline__ void load4f(const float* __restrict__ x, float (&v)[4]) {
  const float4 w = *reinterpret_cast<const float4*>(x);
  v[0] = w.x;
  v[1] = w.y;
  v[2] = w.z;
  v[3] = w.w;
}

__device__ __forceinline__ void store4f(float* __restrict__ x, const float (&v)[4]) {
  *reinterpret_cast<float4*>(x) = make_float4(v[0], v[1], v[2], v[3]);
}

// Loads p[0..8) as fp32 with 16-byte loads through the read-only cache: p must
// be 16-byte aligned (one uint4 for fp16/bf16, two float4 for fp32).
template <int DT>
__device__ __forceinline__ void ldg8(const ET<DT>* __restrict__ p, float (&v)[8]) {
  if constexpr (DT == kF32) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
    v[4] = b.x;
    v[5] = b.y;
    v[6] = b.z;
    v[7] = b.w;
  } else {
    const uint4 w = __ldg(reinterpret_cast<const uint4*>(p));
    v[0] = to_f32<DT>(static_cast<uint16_t>(w.x));
    v[1] = to_f32<DT>(static_cast<uint16_t>(w.x >> 16));
    v[2] = to_f32<DT>(static_cast<uint16_t>(w.y));
    v[3] = to_f32<DT>(static_cast<uint16_t>(w.y >> 16));
    v[4] = to_f32<DT>(static_cast<uint16_t>(w.z));
    v[5] = to_f32<DT>(static_cast<uint16_t>(w.z >> 16));
    v[6] = to_f32<DT>(static_cast<uint16_t>(w.w));
    v[7] = to_f32<DT>(static_cast<uint16_t>(w.w >> 16));
  }
}

// n / d for 0 <= n < 2^31 and 1 <= d < 2^31 without a division instruction: the
// round-up magic number of Granlund & Montgomery ("Division by invariant integers
// using multiplication", 1994), q = (umulhi(n, magic) + n) >> shift with
// shift = ceil(log2 d) and magic = floor(2^32 * (2^shift - d) / d) + 1. The sum
// umulhi + n stays below 2^32 because n < 2^31. Used for block / nested_blocksize
// in the inner loops of the decode GEMV and the QLoRA GEMM (quant block / nested_blocksize):
// a 64-bit division there compiles to a call of a ~70-instruction software routine per
// chunk; their hosts refuse >= 2^31 quant blocks.
struct FastDivU32 {
  uint32_t magic;
  uint32_t shift;
  uint32_t divisor;
};

inline FastDivU32 make_fastdiv(uint32_t d) {  // host; 1 <= d < 2^31
  uint32_t shift = 0;
  while ((uint64_t{1} << shift) < d) ++shift;
  const uint64_t magic = ((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1;
  return FastDivU32{static_cast<uint32_t>(magic), shift, d};
}

__device__ __forceinline__ uint32_t fastdiv(uint32_t n, const FastDivU32& f) {
  return (__umulhi(n, f.magic) + n) >> f.shift;
}

// ----------------------------------------------------------------------------
// Host side: launch helpers. The launchers check their arguments first, with
// qpeft/host_checks.h (std::invalid_argument -> ValueError, before any CUDA call).

using host::ceil_div;

inline bool aligned(std::uintptr_t p, std::uintptr_t a) {
  return p % a == 0;
}

inline unsigned grid_for(int64_t units, int64_t per_block) {
  const int64_t blocks = ceil_div(units, per_block);
  return static_cast<unsigned>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

inline cudaStream_t as_stream(std::uintptr_t s) {
  return reinterpret_cast<cudaStream_t>(s);
}

// Calls f(std::integral_constant<int, dtype>{}) for a checked dtype code.
template <typename F>
void with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kF32:
      f(std::integral_constant<int, kF32>{});
      break;
    case kF16:
      f(std::integral_constant<int, kF16>{});
      break;
    default:
      f(std::integral_constant<int, kBF16>{});
      break;
  }
}

}  // namespace cuda
}  // namespace qpeft
