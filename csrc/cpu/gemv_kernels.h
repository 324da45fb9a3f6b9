// Internal interface of the 4-bit GEMV (gemv.cpp: entry point, checks, threading and
// the scalar kernel; gemv_avx2.cpp: the AVX2/FMA kernel; gemv_avx512.cpp: the AVX-512 one).
//
// Like kernels.h this header holds no inline functions or templates: the AVX2 TU
// includes it, and a COMDAT instantiated there could be what the scalar TU links.
#pragma once

#include <cstdint>

namespace qpeft {
namespace cpu {

struct Gemv4Args {
  const float* x;  // [m, k] fp32, row-major (Python widens bf16/fp16 activations)
  int64_t m, n, k;
  const uint8_t* packed;  // W [n, k] as 4-bit codes, first element in the high nibble
  int64_t blocksize;
  int quant_type;
  // Plain absmax (absmax_q == nullptr) or double-quantized absmax:
  // absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset.
  const float* absmax;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int64_t nested_blocksize;
  float* out;  // [m, n] fp32
};

// Rows [n0, n1) of W: out[:, n0:n1] = x @ W[n0:n1]^T. Any shape.
void gemv4_scalar(const Gemv4Args& a, int64_t n0, int64_t n1);
// Same, for k % blocksize == 0 (whole quantization blocks per row of W).
void gemv4_avx2(const Gemv4Args& a, int64_t n0, int64_t n1);
// The AVX-512 kernel (gemv_avx512.cpp), same contract as gemv4_avx2.
void gemv4_avx512(const Gemv4Args& a, int64_t n0, int64_t n1);

}  // namespace cpu
}  // namespace qpeft
