// Entry points of qpeft._C (see csrc/README.md for the ABI). Pointers arrive as
// uintptr_t from Python; every function validates sizes with qpeft/host_checks.h
// and throws std::invalid_argument (a Python ValueError) before touching memory.
#pragma once

#include <cstdint>
#include <string>

#include "cpu_info.h"

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
                          uintptr_t code, int64_t n, int64_t blocksize, uintptr_t out,
                          int out_dtype, int num_threads);

// y[m, n] = x[m, k] @ W[n, k]^T (all fp32) with W as packed 4-bit codes (plain or
// double-quantized absmax, as dequantize_4bit takes them), for 1 <= m <=
// kGemvMaxRows rows of x (format.h). x holds x_len floats, out out_len.
void gemv_4bit(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k, uintptr_t packed,
               int64_t packed_len, uintptr_t absmax, int64_t absmax_len, int64_t blocksize,
               int quant_type, uintptr_t nested_absmax, int64_t nested_absmax_len,
               uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize, uintptr_t out,
               int64_t out_len, int num_threads);

// The fp32 QLoRA forward of a small layer in one call (qlora_small.cpp): xa[m, r] =
// x @ A^T, out[m, n] = (x @ W^T + ((xa * scaling) * rank_scale) @ B^T + bias) * out_scale,
// W [n, k] as gemv_4bit takes it, any m (x @ W^T runs the GEMV kernel over chunks of
// kGemvMaxRows rows). lora_a == 0: no LoRA terms; rank_scale, bias, out_scale, xa may be 0.
void qlora_small_forward(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                         uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                         int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                         int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                         int64_t nested_blocksize, uintptr_t lora_a, int64_t lora_a_len,
                         uintptr_t lora_b, int64_t lora_b_len, int64_t r, float scaling,
                         uintptr_t rank_scale, int64_t rank_scale_len, uintptr_t bias,
                         int64_t bias_len, uintptr_t out_scale, int64_t out_scale_len,
                         uintptr_t out, int64_t out_len, uintptr_t xa, int64_t xa_len,
                         int num_threads);

// Its fp32 backward in one call (qlora_small.cpp): with dy' = grad_y * out_scale and
// gs = ((dy' @ B) * scaling) * rank_scale: dx = gs @ A + dy' @ W, da = gs^T @ x,
// db = dy'^T @ ((xa * scaling) * rank_scale) (dbias is torch's dy'.sum(0) in Python: the
// reference's bits). An output pointer 0 is not computed; x is read only for da, xa only
// for db.
void qlora_small_backward(uintptr_t grad_y, int64_t grad_y_len, uintptr_t x, int64_t x_len,
                          int64_t m, int64_t n, int64_t k, uintptr_t packed, int64_t packed_len,
                          uintptr_t absmax, int64_t absmax_len, int64_t blocksize, int quant_type,
                          uintptr_t nested_absmax, int64_t nested_absmax_len, uintptr_t nested_code,
                          uintptr_t offset, int64_t nested_blocksize, uintptr_t lora_a,
                          int64_t lora_a_len, uintptr_t lora_b, int64_t lora_b_len, uintptr_t xa,
                          int64_t xa_len, int64_t r, float scaling, uintptr_t rank_scale,
                          int64_t rank_scale_len, uintptr_t out_scale, int64_t out_scale_len,
                          uintptr_t dx, int64_t dx_len, uintptr_t da, int64_t da_len, uintptr_t db,
                          int64_t db_len);

// "auto" or a level of cpu_info.h ("scalar" ... "amx"): the level the kernels run at,
// overriding QPEFT_CPU_ISA (tests, A/B runs); returns the previous setting. Throws if
// the CPU lacks a feature the level needs.
std::string set_isa(const std::string& name);
// The level the kernels run at now.
std::string active_isa();
// set_isa's current setting ("auto" when none).
std::string isa_override();

// The 65536-entry 8-bit encoder table for a sorted fp32[256] code (the cached
// one quantize_blockwise uses), for tests against qpeft/_formats.py.
std::string lut8(uintptr_t code);

}  // namespace cpu
}  // namespace qpeft

// ---------------------------------------------------------------------------
// Optimizer steps (csrc/cpu/optim.cpp; math in qpeft/optim.h, ABI in csrc/README.md).
// param/grad: n elements of dtype (0 f32, 1 f16, 2 bf16); fp32 states of exactly
// n elements; 8-bit states: uint8[n] codes and fp32[ceil(n/256)] absmax, with
// code1/code2 pointing at sorted fp32[256] maps. Updated in place.
#include <qpeft/optim.h>

#include <vector>

namespace qpeft {
namespace cpu {

void adamw32_step(uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t exp_avg,
                  int64_t exp_avg_len, uintptr_t exp_avg_sq, int64_t exp_avg_sq_len,
                  const AdamScalars& s, int num_threads);

void adamw8bit_step(uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t q1,
                    int64_t q1_len, uintptr_t absmax1, int64_t absmax1_len, uintptr_t q2,
                    int64_t q2_len, uintptr_t absmax2, int64_t absmax2_len, uintptr_t code1,
                    uintptr_t code2, const AdamScalars& s, int num_threads);

void lion32_step(uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t exp_avg,
                 int64_t exp_avg_len, const LionScalars& s, int num_threads);

void lion8bit_step(uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t q1,
                   int64_t q1_len, uintptr_t absmax1, int64_t absmax1_len, uintptr_t code1,
                   const LionScalars& s, int num_threads);

// Multi-tensor variants. `rows` is a flat int64 array of `count` rows, one per
// tensor, each holding the single call's arguments from `param` to the last
// length in order (pointers as integers) and then the index of its scalar set in
// `s` (row width: adamw32 9, adamw8bit 13, lion32 7, lion8bit 9). The maps are
// shared. One parallel region covers the whole list.
struct Rows {
  const int64_t* data;
  int64_t count;
};
void adamw32_multi_step(Rows rows, const std::vector<AdamScalars>& s, int num_threads);
void adamw8bit_multi_step(Rows rows, uintptr_t code1, uintptr_t code2,
                          const std::vector<AdamScalars>& s, int num_threads);
void lion32_multi_step(Rows rows, const std::vector<LionScalars>& s, int num_threads);
void lion8bit_multi_step(Rows rows, uintptr_t code1, const std::vector<LionScalars>& s,
                         int num_threads);

// Whether the 8-bit encoder for this sorted fp32[256] map uses the one-compare
// key table (true for both dynamic maps) or falls back to a binary search.
bool state_table_exact(uintptr_t code);

}  // namespace cpu
}  // namespace qpeft

// ---------------------------------------------------------------------------
// Host memory behind a DLPack tensor (csrc/cpu/host_buffer.cpp): zeroed, 64-byte
// aligned, freed by the ManagedTensor's deleter; host_buffers_live() counts the
// allocations not yet freed. The CPU twin of the paged optimizer's managed memory.
#include <qpeft/dlpack.h>

namespace qpeft {
namespace cpu {

dlpack::ManagedTensor* host_buffer(int64_t numel, int dl_code, int bits);
int64_t host_buffers_live();

}  // namespace cpu
}  // namespace qpeft
