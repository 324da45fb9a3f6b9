// Pieces shared by the CUDA kernel files (csrc/cuda/*.cu): element types and
// their conversions (device side) and the argument checks of the host
// launchers. Compiled by nvcc for qpeft._C_cuda and by the host compiler for
// the emulation module qpeft._C_cuda_emu (csrc/emu): the conversions use the
// cuda_fp16.h / cuda_bf16.h intrinsics unconditionally, because the toolkit
// implements them for the host too, rounding as the device does (RNE; a NaN
// becomes the canonical 0x7fff). The emulation then runs the device code path
// itself, not a stand-in.
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

// ----------------------------------------------------------------------------
// Host side: argument checks (std::invalid_argument -> ValueError, before any
// CUDA call) and small launch helpers.

[[noreturn]] inline void fail(const std::string& msg) {
  throw std::invalid_argument("qpeft: " + msg);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return a / b + (a % b != 0);
}

inline void check_n(int64_t n) {
  if (n < 0) fail("n must be >= 0, got " + std::to_string(n));
}

inline int log2_blocksize(int64_t blocksize) {
  for (int l = 5; l <= 12; ++l) {
    if (blocksize == (int64_t{1} << l)) return l;
  }
  fail("blocksize must be a power of two in [32, 4096], got " + std::to_string(blocksize));
}

inline void check_dtype(const char* what, int dtype) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) {
    fail(std::string(what) + " must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
         std::to_string(dtype));
  }
}

inline void check_quant_type(int quant_type) {
  if (quant_type != kFP4 && quant_type != kNF4) {
    fail("quant_type must be 1 (fp4) or 2 (nf4), got " + std::to_string(quant_type));
  }
}

inline void check_len(const char* what, int64_t have, int64_t need) {
  if (have < need) {
    fail(std::string(what) + " holds " + std::to_string(have) + " elements, needs " +
         std::to_string(need));
  }
}

inline void check_ptr(const char* what, std::uintptr_t p) {
  if (p == 0) fail(std::string(what) + " is a null pointer");
}

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
