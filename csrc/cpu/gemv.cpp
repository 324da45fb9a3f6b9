// qpeft._C.gemv_4bit: y = x @ W^T for a few rows of x (decode, M <= 8) straight from the
// packed 4-bit codes: W (0.53 bytes per parameter with double quantization) is read
// once, and no decoded copy of it is ever written. The panel path of the QLoRA layer
// (qpeft/backends/cpu/qlora.py) writes and re-reads 4 bytes per parameter instead.
//
// Threads split the rows of W. Summation (scalar and AVX2 kernels): within a quantization
// block the products x_k * table[code_k] accumulate, and each block's sum is scaled by its
// absmax (sum_b absmax_b * sum_k x_k t_k, the decode's multiplication factored out of the
// block): a different rounding than dequantize-then-dot. The AVX-512 kernel decodes the
// dequantized weights themselves (gemv_avx512.cpp). Both are bounded in qpeft/testing.py
// (cpu_gemv_roundings), tested in tests/test_gemv_cpu.py.
#include <qpeft/format.h>
#include <qpeft/host_checks.h>

#include "api.h"
#include "gemv_kernels.h"
#include "isa_tables.h"
#include "thread_pool.h"

namespace qpeft {
namespace cpu {

namespace {

float block_scale(const Gemv4Args& a, int64_t b) {
  if (a.absmax_q == nullptr) return a.absmax[b];
  return nested_absmax_value(a.absmax_q[b], a.nested_code, a.nested_absmax[b / a.nested_blocksize],
                             a.offset);
}

}  // namespace

void gemv4_scalar(const Gemv4Args& a, int64_t n0, int64_t n1) {
  const float* table = a.quant_type == kNF4 ? kNF4Values : kFP4Values;
  for (int64_t row = n0; row < n1; ++row) {
    for (int64_t i = 0; i < a.m; ++i) {
      const float* x = a.x + i * a.k;
      float total = 0.0f, acc = 0.0f;
      int64_t e = row * a.k;  // flat element index of W
      int64_t block = e / a.blocksize;
      for (int64_t j = 0; j < a.k; ++j, ++e) {
        if (e / a.blocksize != block) {  // a block ends: scale its sum
          total += acc * block_scale(a, block);
          acc = 0.0f;
          block = e / a.blocksize;
        }
        const uint8_t byte = a.packed[e >> 1];
        acc += x[j] * table[(e & 1) ? (byte & 0x0f) : (byte >> 4)];
      }
      total += acc * block_scale(a, block);
      a.out[i * a.n + row] = total;
    }
  }
}

void gemv_4bit(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k, uintptr_t packed,
               int64_t packed_len, uintptr_t absmax, int64_t absmax_len, int64_t blocksize,
               int quant_type, uintptr_t nested_absmax, int64_t nested_absmax_len,
               uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize, uintptr_t out,
               int64_t out_len, int num_threads) {
  // The same contract as the CUDA entry point (csrc/cuda/gemv_4bit.cu), but any
  // power-of-two blocksize: the CPU kernels do not depend on it.
  using namespace host;
  const char* fn = "gemv_4bit";
  check_gemv_rows(fn, m);
  check_positive(fn, "n", n);
  check_positive(fn, "k", k);
  if (blocksize < 2 || (blocksize & (blocksize - 1)) != 0)
    fail(fn, "blocksize must be a power of two >= 2, got " + std::to_string(blocksize));
  check_quant_type(fn, quant_type);
  const int64_t numel = checked_mul(fn, "n", n, "k", k);
  const int64_t blocks = ceil_div(numel, blocksize);
  check_len(fn, "x", x_len, checked_mul(fn, "m", m, "k", k));
  check_len(fn, "packed", packed_len, packed4_len(numel));
  check_len(fn, "absmax", absmax_len, blocks);
  check_len(fn, "out", out_len, checked_mul(fn, "m", m, "n", n));
  const bool nested = nested_absmax != 0;
  if (nested) {
    check_positive(fn, "nested_blocksize", nested_blocksize);
    check_len(fn, "nested_absmax", nested_absmax_len, ceil_div(blocks, nested_blocksize));
    check_ptr(fn, "nested_code", nested_code);
    check_ptr(fn, "offset", offset);
  }
  check_ptr(fn, "x", x);
  check_ptr(fn, "packed", packed);
  check_ptr(fn, "absmax", absmax);
  check_ptr(fn, "out", out);
  const Gemv4Args args{reinterpret_cast<const float*>(x),
                       m,
                       n,
                       k,
                       reinterpret_cast<const uint8_t*>(packed),
                       blocksize,
                       quant_type,
                       nested ? nullptr : reinterpret_cast<const float*>(absmax),
                       nested ? reinterpret_cast<const uint8_t*>(absmax) : nullptr,
                       nested ? reinterpret_cast<const float*>(nested_absmax) : nullptr,
                       nested ? reinterpret_cast<const float*>(nested_code) : nullptr,
                       nested ? *reinterpret_cast<const float*>(offset) : 0.0f,
                       nested ? nested_blocksize : 1,
                       reinterpret_cast<float*>(out)};
  // The SIMD kernels walk whole blocks (of 32 or more) per row of W.
  const Gemv4Fn kernel =
      (k % blocksize == 0 && blocksize >= 32) ? isa_kernels().gemv : gemv4_scalar;
  // ~64K weights per thread at least: below that a worker's wake-up costs more than its share.
  int64_t threads = num_threads < 1 ? 1 : num_threads;
  const int64_t by_work = numel / (int64_t{1} << 16) + 1;
  if (threads > by_work) threads = by_work;
  if (threads > n) threads = n;
  parallel_ranges(n, threads, [&](int64_t n0, int64_t n1) { kernel(args, n0, n1); });
}

}  // namespace cpu
}  // namespace qpeft
