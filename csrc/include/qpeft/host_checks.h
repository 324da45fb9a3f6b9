// Host-side argument checks of every native entry point (qpeft._C, qpeft._C_cuda,
// qpeft._C_cuda_emu), one definition each. Python validates dtype, device and
// shapes before it calls in (qpeft/backends/*), but the entry points take raw
// pointers and element counts, so each one re-checks the sizes here before it
// touches memory or enqueues a kernel: a wrong count must become a Python
// exception, never an out-of-bounds access.
//
// Contract shared by all of them:
//  * a failed check throws std::invalid_argument, which pybind11 turns into a
//    Python ValueError; the message is "<module>.<fn>: <what>", naming the entry
//    point and the argument (`fn` is the entry point's Python name);
//  * every size is int64_t and all arithmetic on sizes is overflow-checked or
//    provably cannot overflow (see each function);
//  * the message is built only on failure: a multi-tensor optimizer step runs
//    about fifteen checks per tensor, and formatting eagerly costs more than
//    updating a LoRA-sized tensor.
//
// Host code only (plain C++17, no CUDA): the CUDA sources include it for their
// launchers, compiled by nvcc's host compiler or, for the emulation, by the host
// compiler directly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

#include "format.h"
#include "optim.h"

// The Python name of the module a translation unit is compiled into
// ("qpeft._C", "qpeft._C_cuda" or "qpeft._C_cuda_emu"), set per target by
// CMakeLists.txt. The CUDA sources are compiled into two modules, so the name
// cannot be spelled in the source.
#ifndef QPEFT_MODULE_NAME
#error "QPEFT_MODULE_NAME must name the Python module (CMakeLists.txt defines it per target)"
#endif

namespace qpeft {
namespace host {

// Throws std::invalid_argument("<module>.<fn>: <msg>").
[[noreturn]] inline void fail(const char* fn, const std::string& msg) {
  throw std::invalid_argument(std::string(QPEFT_MODULE_NAME) + "." + fn + ": " + msg);
}

// ceil(a / b) for a >= 0 and b > 0 (the callers check both first). Written as
// a / b + (a % b != 0), not (a + b - 1) / b, so it cannot overflow for any a
// up to INT64_MAX.
constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return a / b + (a % b != 0);
}

// Bytes of n packed 4-bit codes (two per byte, the last one padded): n >= 0.
constexpr int64_t packed4_len(int64_t n) {
  return n / 2 + n % 2;
}

// `name` (an element count or a size) must be >= 0.
inline void check_nonneg(const char* fn, const char* name, int64_t v) {
  if (v < 0) fail(fn, std::string(name) + " must be >= 0, got " + std::to_string(v));
}

// `name` must be >= 1 (a blocksize, a divisor).
inline void check_positive(const char* fn, const char* name, int64_t v) {
  if (v < 1) fail(fn, std::string(name) + " must be > 0, got " + std::to_string(v));
}

// a * b for a, b >= 0 (checked), or a failure naming the product when it does
// not fit in int64_t.
inline int64_t checked_mul(const char* fn, const char* a_name, int64_t a, const char* b_name,
                           int64_t b) {
  check_nonneg(fn, a_name, a);
  check_nonneg(fn, b_name, b);
  if (b != 0 && a > std::numeric_limits<int64_t>::max() / b) {
    fail(fn, std::string(a_name) + " * " + b_name + " = " + std::to_string(a) + " * " +
                 std::to_string(b) + " overflows 64 bits");
  }
  return a * b;
}

// Bytes of `numel` elements of `elem_bytes` each, for an allocation: numel >= 0
// and the product at most PTRDIFF_MAX (no object can be larger; a wrapped
// product would allocate a small buffer for a large tensor).
inline std::size_t checked_bytes(const char* fn, const char* name, int64_t numel,
                                 int64_t elem_bytes) {
  check_nonneg(fn, name, numel);
  constexpr int64_t kMax = std::numeric_limits<std::ptrdiff_t>::max();
  if (elem_bytes != 0 && numel > kMax / elem_bytes) {
    fail(fn, std::string(name) + " = " + std::to_string(numel) + " elements of " +
                 std::to_string(elem_bytes) + " bytes exceed the largest possible allocation");
  }
  return static_cast<std::size_t>(numel * elem_bytes);
}

// A dtype code of the ABI (format.h: DType).
inline void check_dtype(const char* fn, const char* name, int dtype) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16) {
    fail(fn, std::string(name) + " must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                 std::to_string(dtype));
  }
}

// A quant type code of the ABI (format.h: QuantType).
inline void check_quant_type(const char* fn, int quant_type) {
  if (quant_type != kFP4 && quant_type != kNF4) {
    fail(fn, "quant_type must be 1 (fp4) or 2 (nf4), got " + std::to_string(quant_type));
  }
}

// log2 of a blocksize of the 4-bit/8-bit formats: a power of two in
// [2^kBlocksizeLog2Min, 2^kBlocksizeLog2Max] (format.h). The CUDA kernels are
// built for exactly these; the CPU kernels take any blocksize > 0.
inline int log2_blocksize(const char* fn, int64_t blocksize) {
  for (int l = kBlocksizeLog2Min; l <= kBlocksizeLog2Max; ++l) {
    if (blocksize == (int64_t{1} << l)) return l;
  }
  fail(fn, "blocksize must be a power of two in [" + std::to_string(1 << kBlocksizeLog2Min) + ", " +
               std::to_string(1 << kBlocksizeLog2Max) + "], got " + std::to_string(blocksize));
}

// 8-bit blockwise blocksize: any value > 0 (bitsandbytes' CPU quantize_blockwise takes
// any). Returns log2 for the powers of two the fast kernels serve, -1 for the others
// (served by the one-block-per-program kernels).
inline int log2_blocksize8(const char* fn, int64_t blocksize) {
  check_positive(fn, "blocksize", blocksize);
  for (int l = kBlocksizeLog2Min; l <= kBlocksizeLog2Max; ++l) {
    if (blocksize == (int64_t{1} << l)) return l;
  }
  return -1;
}

// The buffer behind `name` holds `have` elements and the call reads or writes
// `need` of them: it must hold at least that many (a larger buffer is fine).
// For the quantization and GEMV entry points, whose outputs Python allocates.
inline void check_len(const char* fn, const char* name, int64_t have, int64_t need) {
  if (have < need) {
    fail(fn, std::string(name) + " holds " + std::to_string(have) + " elements, needs at least " +
                 std::to_string(need));
  }
}

// The buffer behind `name` must hold exactly `want` elements. For optimizer
// state, whose size is a function of the parameter's: any other length means
// the state belongs to a different parameter.
inline void check_len_exact(const char* fn, const char* name, int64_t have, int64_t want) {
  if (have != want) {
    fail(fn, std::string(name) + " holds " + std::to_string(have) + " elements, expected " +
                 std::to_string(want));
  }
}

// A pointer the call dereferences must not be null (checked only when it will
// be dereferenced, i.e. after the n == 0 early returns, unless documented).
inline void check_ptr(const char* fn, const char* name, std::uintptr_t p) {
  if (p == 0) fail(fn, std::string(name) + " is a null pointer");
}

// A host scalar must be finite (exponent not all ones; no <cmath> needed).
inline void check_finite(const char* fn, const char* name, float x) {
  if ((f32_bits(x) & 0x7f800000u) == 0x7f800000u) {
    fail(fn, std::string(name) + " must be finite, got " + std::to_string(x));
  }
}

// A count the kernels index with 32-bit arithmetic (e.g. the decode GEMV's quant
// blocks, divided by a 32-bit magic-number divider): must be below 2^31.
inline void check_index32(const char* fn, const char* name, int64_t value) {
  if (value >= (int64_t{1} << 31)) {
    fail(fn, std::string(name) + " is " + std::to_string(value) +
                 ", the kernel's 32-bit indexing takes fewer than 2^31");
  }
}

// Rows of x of the decode GEMV: 1 to kGemvMaxRows (format.h).
inline void check_gemv_rows(const char* fn, int64_t m) {
  if (m < 1 || m > kGemvMaxRows) {
    fail(fn,
         "takes 1 to " + std::to_string(kGemvMaxRows) + " rows of x, got m=" + std::to_string(m));
  }
}

// The leading (dtype, n) pair of an optimizer step.
inline void check_n_dtype(const char* fn, int dtype, int64_t n) {
  check_nonneg(fn, "n", n);
  check_dtype(fn, "dtype", dtype);
}

// The per-step scalars of the optimizers (optim.h), computed on the host by
// qpeft/_optim_math.py: a non-finite one would turn the whole state into NaN.
inline void check_adam_scalars(const char* fn, const AdamScalars& s) {
  check_finite(fn, "decay", s.decay);
  check_finite(fn, "lerp_c", s.lerp_c);
  check_finite(fn, "beta2", s.beta2);
  check_finite(fn, "omb2", s.omb2);
  check_finite(fn, "bc2_sqrt", s.bc2_sqrt);
  check_finite(fn, "eps", s.eps);
  check_finite(fn, "neg_step", s.neg_step);
  if (s.lerp_from_grad != 0 && s.lerp_from_grad != 1) fail(fn, "lerp_from_grad must be 0 or 1");
}

inline void check_lion_scalars(const char* fn, const LionScalars& s) {
  check_finite(fn, "decay", s.decay);
  check_finite(fn, "beta1", s.beta1);
  check_finite(fn, "omb1", s.omb1);
  check_finite(fn, "beta2", s.beta2);
  check_finite(fn, "omb2", s.omb2);
  check_finite(fn, "neg_lr", s.neg_lr);
}

}  // namespace host
}  // namespace qpeft
