// The C ABI through which qpeft._C_layer (the one module that links libtorch; see
// csrc/torch/small_layer.cpp) calls the small-layer kernels of qpeft._C: a table of
// function pointers that qpeft._C exports as the PyCapsule `_small_layer_abi`, named
// kSmallLayerAbiName. Only raw pointers, integers and floats cross it (no std:: or
// torch types), so the two modules may be built with different C++ ABIs. A change to
// either signature bumps kSmallLayerAbiVersion; qpeft._C_layer refuses another version.
#pragma once

#include <cstdint>

namespace qpeft {

constexpr int kSmallLayerAbiVersion = 3;
constexpr const char* kSmallLayerAbiName = "qpeft._C.small_layer_abi";

// csrc/cpu/api.h: qpeft::cpu::qlora_small_forward
using SmallForwardFn = void (*)(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                                uintptr_t packed, int64_t packed_len, uintptr_t absmax,
                                int64_t absmax_len, int64_t blocksize, int quant_type,
                                uintptr_t nested_absmax, int64_t nested_absmax_len,
                                uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize,
                                uintptr_t lora_a, int64_t lora_a_len, uintptr_t lora_b,
                                int64_t lora_b_len, int64_t r, float scaling, uintptr_t rank_scale,
                                int64_t rank_scale_len, uintptr_t bias, int64_t bias_len,
                                uintptr_t out_scale, int64_t out_scale_len, uintptr_t out,
                                int64_t out_len, uintptr_t xa, int64_t xa_len, int num_threads);

// csrc/cpu/api.h: qpeft::cpu::qlora_small_backward
using SmallBackwardFn = void (*)(uintptr_t grad_y, int64_t grad_y_len, uintptr_t x, int64_t x_len,
                                 int64_t m, int64_t n, int64_t k, uintptr_t packed,
                                 int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                                 int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                                 int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                                 int64_t nested_blocksize, uintptr_t lora_a, int64_t lora_a_len,
                                 uintptr_t lora_b, int64_t lora_b_len, uintptr_t xa, int64_t xa_len,
                                 int64_t r, float scaling, uintptr_t rank_scale,
                                 int64_t rank_scale_len, uintptr_t out_scale, int64_t out_scale_len,
                                 uintptr_t dx, int64_t dx_len, uintptr_t da, int64_t da_len,
                                 uintptr_t db, int64_t db_len);

// csrc/cpu/api.h: qpeft::cpu::gemv_4bit
using GemvFn = void (*)(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                        uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                        int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                        int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                        int64_t nested_blocksize, uintptr_t out, int64_t out_len, int num_threads);

// csrc/cpu/qgemm_f32.h: qpeft::cpu::qgemm_4bit_f32 (the fused fp32 GEMM of the avx2 level)
using GemmF32Fn = void (*)(bool dx, uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                           uintptr_t packed, int64_t packed_len, uintptr_t absmax,
                           int64_t absmax_len, int64_t blocksize, int quant_type,
                           uintptr_t nested_absmax, int64_t nested_absmax_len,
                           uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize,
                           uintptr_t lora_l, int64_t lora_l_len, uintptr_t lora_r,
                           int64_t lora_r_len, int64_t rank, uintptr_t out, int64_t out_len,
                           bool accumulate, uintptr_t extra, int64_t extra_len, int64_t extra_cols,
                           uintptr_t out2, int64_t out2_len, int64_t col_block, int64_t red_block,
                           int num_threads);

// csrc/cpu/qgemm_f32.h: qpeft::cpu::qgemm_4bit_f32_active (the GEMM is built and the CPU
// kernels run at exactly the avx2 level now: where the fp32 layer takes it)
using ActiveFn = bool (*)();

// csrc/cpu/api.h: qpeft::cpu::dequantize_4bit (out_dtype: qpeft/_formats.py DTYPE_IDS)
using Dequantize4Fn = void (*)(uintptr_t packed, int64_t packed_len, uintptr_t absmax,
                               int64_t absmax_len, int64_t n, int64_t blocksize, int quant_type,
                               uintptr_t out, int out_dtype, uintptr_t nested_absmax,
                               int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                               int64_t nested_blocksize, int num_threads);

// csrc/cpu/qgemm_f32.h: qpeft::cpu::lora_grad_f32 (dA and dB on the avx2 level)
using LoraGradFn = void (*)(uintptr_t g, int64_t g_len, int64_t g_stride_m, int64_t g_stride_r,
                            int64_t m, int64_t r, double scaling, uintptr_t q, int64_t q_len,
                            int64_t cols, uintptr_t out, int64_t out_len, bool transpose_out,
                            int num_threads);

struct SmallLayerAbi {
  int version;
  SmallForwardFn forward;
  SmallBackwardFn backward;
  GemmF32Fn gemm_f32;
  ActiveFn gemm_f32_active;
  GemvFn gemv;
  LoraGradFn lora_grad;
  Dequantize4Fn dequantize_4bit;
};

}  // namespace qpeft
