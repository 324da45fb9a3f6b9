// Entry points of qpeft._C (see csrc/README.md for the ABI). Pointers arrive as
// uintptr_t from Python; every function validates sizes and throws
// std::invalid_argument (a Python ValueError) before touching memory.
#pragma once

#include <cstdint>
#include <string>

namespace qpeft {
namespace cpu {

void quantize_4bit(uintptr_t x, int x_dtype, int64_t n, int64_t blocksize, int quant_type,
                   uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                   int num_threads);

void dequantize_4bit(uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                     int64_t n, int64_t blocksize, int quant_type, uintptr_t out, int out_dtype,
                     uintptr_t nested_absmax, int64_t nested_absmax_len, uintptr_t nested_code,
                     uintptr_t offset, int64_t nested_blocksize, int num_threads);

void quantize_blockwise(uintptr_t x, int x_dtype, int64_t n, int64_t blocksize, uintptr_t code,
                        uintptr_t q, int64_t q_len, uintptr_t absmax, int64_t absmax_len,
                        int num_threads);

void dequantize_blockwise(uintptr_t q, int64_t q_len, uintptr_t absmax, int64_t absmax_len,
                          uintptr_t code, int64_t n, int64_t blocksize, uintptr_t out, int out_dtype,
                          int num_threads);

// y[m, n] = x[m, k] @ W[n, k]^T (all fp32) with W as packed 4-bit codes (plain or
// double-quantized absmax, as dequantize_4bit takes them), for a few rows of x.
void gemv_4bit(uintptr_t x, int64_t m, int64_t n, int64_t k, uintptr_t packed, int64_t packed_len,
               uintptr_t absmax, int64_t absmax_len, int64_t blocksize, int quant_type,
               uintptr_t nested_absmax, int64_t nested_absmax_len, uintptr_t nested_code,
               uintptr_t offset, int64_t nested_blocksize, uintptr_t out, int num_threads);

// "auto" | "scalar" | "avx2"; returns the previous setting. Throws if the CPU
// cannot run the requested ISA.
std::string set_isa(const std::string& name);
// The ISA "auto" resolves to on this CPU / the ISA in use now.
std::string active_isa();

// The 65536-entry 8-bit encoder table for a sorted fp32[256] code (the cached
// one quantize_blockwise uses), for tests against qpeft/_formats.py.
std::string lut8(uintptr_t code);

struct CpuFeatures {
  bool avx2, fma, f16c;
};
CpuFeatures cpu_features();

}  // namespace cpu
}  // namespace qpeft
