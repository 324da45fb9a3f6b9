// Pieces shared by the two fused dequant + LoRA GEMMs (docs/design.md, "CUDA C++ QLoRA
// GEMM"): the tensor-core kernel (csrc/cuda/qlora_gemm.cu, fp16/bf16 on sm_80+) and the
// SIMT kernel (csrc/cuda/qlora_simt.cu, fp32/fp64 and fp16/bf16 on any arch). Both take
// the same arguments in the same order (csrc/cuda/ops.h) and check them here, once, with
// the same messages: the 4-bit W [n, k] in the bitsandbytes layout (format.h), the LoRA
// factors A [r, k] and B [n, r], and the optional rank_scale [r], bias [n], out_scale [n].
#pragma once

#include <cstdint>
#include <string>

#include "kernel_common.h"
#include "qpeft/format.h"
#include "qpeft/host_checks.h"

namespace qpeft {
namespace cuda {

// The quantized W as the entry points receive it (pointers as integers, lengths in
// elements; nested_absmax == 0: absmax is fp32, else uint8 codes of double quantization).
struct QuantArgs {
  std::uintptr_t packed;
  int64_t packed_len;
  std::uintptr_t absmax;
  int64_t absmax_len;
  int64_t blocksize;
  int quant_type;
  std::uintptr_t nested_absmax;
  int64_t nested_absmax_len;
  std::uintptr_t nested_code;
  std::uintptr_t offset;
  int64_t nested_blocksize;
};

// What the checks derive: the reduction extent (forward K, dx N), the output's columns
// (forward N, dx K), log2 of the blocksize and the nested-block divider.
struct QloraDims {
  int64_t red;
  int64_t ocols;
  int log2_bs;
  FastDivU32 nested_div;
};

// The size checks both kernels make before touching memory. act [m, red] -> out
// [m, ocols]; side: xa [m, r] (forward) or g [m, r] (dx), 0 when not asked for.
inline QloraDims check_qlora_args(const char* fn, bool dx, int64_t act_len, int64_t m, int64_t n,
                                  int64_t k, const QuantArgs& q, std::uintptr_t lora_a,
                                  int64_t lora_a_len, std::uintptr_t lora_b, int64_t lora_b_len,
                                  int64_t r, std::uintptr_t rank_scale, int64_t rank_scale_len,
                                  std::uintptr_t bias, int64_t bias_len, std::uintptr_t out_scale,
                                  int64_t out_scale_len, int64_t out_len, std::uintptr_t side,
                                  int64_t side_len) {
  host::check_nonneg(fn, "m", m);
  host::check_positive(fn, "n", n);
  host::check_positive(fn, "k", k);
  host::check_nonneg(fn, "r", r);
  QloraDims d{};
  d.red = dx ? n : k;
  d.ocols = dx ? k : n;
  const int64_t numel = host::checked_mul(fn, "n", n, "k", k);
  d.log2_bs = host::log2_blocksize(fn, q.blocksize);
  host::check_quant_type(fn, q.quant_type);
  host::check_len(fn, dx ? "dy" : "x", act_len,
                  host::checked_mul(fn, "m", m, dx ? "n" : "k", d.red));
  host::check_len(fn, "packed", q.packed_len, host::packed4_len(numel));
  const int64_t nblocks = ceil_div(numel, q.blocksize);
  host::check_len(fn, "absmax", q.absmax_len, nblocks);
  host::check_index32(fn, "quant blocks of W", nblocks);
  host::check_len(fn, dx ? "dx" : "y", out_len,
                  host::checked_mul(fn, "m", m, dx ? "k" : "n", d.ocols));
  d.nested_div = make_fastdiv(1);
  if (q.nested_absmax != 0) {
    host::check_positive(fn, "nested_blocksize", q.nested_blocksize);
    host::check_index32(fn, "nested_blocksize", q.nested_blocksize);
    host::check_len(fn, "nested_absmax", q.nested_absmax_len,
                    ceil_div(nblocks, q.nested_blocksize));
    host::check_ptr(fn, "nested_code", q.nested_code);
    host::check_ptr(fn, "offset", q.offset);
    d.nested_div = make_fastdiv(static_cast<uint32_t>(q.nested_blocksize));
  }
  if (r > 0) {
    host::check_len(fn, "lora_A", lora_a_len, host::checked_mul(fn, "r", r, "k", k));
    host::check_len(fn, "lora_B", lora_b_len, host::checked_mul(fn, "n", n, "r", r));
    host::check_ptr(fn, "lora_A", lora_a);
    host::check_ptr(fn, "lora_B", lora_b);
    if (rank_scale != 0) host::check_len(fn, "rank_scale", rank_scale_len, r);
    if (side != 0)
      host::check_len(fn, dx ? "g" : "xa", side_len, host::checked_mul(fn, "m", m, "r", r));
  }
  if (bias != 0) host::check_len(fn, "bias", bias_len, n);
  if (out_scale != 0) host::check_len(fn, "out_scale", out_scale_len, n);
  return d;
}

// The pointers every call with m > 0 dereferences.
inline void check_qlora_ptrs(const char* fn, bool dx, std::uintptr_t act, const QuantArgs& q,
                             std::uintptr_t out) {
  host::check_ptr(fn, dx ? "dy" : "x", act);
  host::check_ptr(fn, "packed", q.packed);
  host::check_ptr(fn, "absmax", q.absmax);
  host::check_ptr(fn, dx ? "dx" : "y", out);
}

// The absmax of quant block blk: fp32, or double-quantized (uint8 code, nested absmax
// per nested block, the offset; s_ncode holds the 256 nested code values then the offset,
// staged in shared memory by the kernel).
__device__ __forceinline__ float qlora_absmax(const void* absmax, const float* nested_absmax,
                                              const FastDivU32& nested_bs, uint32_t blk,
                                              const float* s_ncode) {
  if (nested_absmax != nullptr) {
    return nested_absmax_value(static_cast<const uint8_t*>(absmax)[blk], s_ncode,
                               __ldg(nested_absmax + fastdiv(blk, nested_bs)), s_ncode[kNumCodes8]);
  }
  return __ldg(static_cast<const float*>(absmax) + blk);
}

}  // namespace cuda
}  // namespace qpeft
