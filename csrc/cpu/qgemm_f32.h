// Interface between the entry point of the fused fp32 4-bit GEMM (qgemm_f32.cpp, baseline
// flags) and its kernel translation unit qgemm_f32_avx2.cpp (compiled with
// QPEFT_ISA_FLAGS_avx2, CMakeLists.txt). Declarations only, like kernels.h: a COMDAT
// instantiated in the kernel TU could be the copy the linker keeps for baseline code.
//
//   forward: out[m, n] (+)= x[m, k] @ W'[n, k]^T      dx: out[m, k] (+)= x[m, n] @ W'[n, k]
//
// with W' = W + L R, the LoRA term merged into the weight when rank > 0 (L = s rs B [n, r],
// R = A [r, k]; rank 0: W' = W). W: the packed 4-bit codes with plain or double-quantized
// absmax, decoded exactly as dequantize_4bit to fp32 (table[c] * absmax, one rounding),
// then each weight gets its r LoRA products by fused multiply-adds, q ascending. The
// decoded W' goes straight into the micro-kernel's packed panels (kc x 16 strips, in L2),
// never into an [n, k] tensor. docs/design.md, "fp32 GEMM".
#pragma once

#include <cstdint>

namespace qpeft {
namespace cpu {

struct F32GemmArgs {
  bool dx;
  const float* x;  // [m, red] fp32, row-major (red = k forward, n for dx)
  int64_t m, n, k;
  const uint8_t* packed;
  int64_t blocksize;
  int quant_type;
  const float* absmax;      // plain absmax, or nullptr when absmax_q is set
  const uint8_t* absmax_q;  // double-quantized absmax codes
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int64_t nested_blocksize;
  // log2 of blocksize / nested_blocksize when a power of two (the block index a shift,
  // not a 64-bit division per row segment and block), else -1
  int blocksize_shift, nested_shift;
  int64_t rank;         // 0: no LoRA term
  const float* lora_l;  // [n, rank]
  const float* lora_r;  // [rank, k]
  float* out;           // [m, cols] fp32 (cols = n forward, k for dx)
  bool accumulate;      // add to out instead of overwriting it
  // Extra output columns from a dense operand, computed in the same pass over x:
  // forward out2[m, e] = x @ extra^T with extra [e, k] (LoRA: xa = x A^T); dx out2[m, e] =
  // x @ extra with extra [n, e] (LoRA: g = dy B). e = 0: none. out2 is always overwritten.
  int64_t extra_cols;
  const float* extra;
  float* out2;
  int64_t col_block;  // output columns per task block, a multiple of 16
  int64_t red_block;  // reduction elements per packed panel
};

// Rows of x per micro-kernel call and output columns per packed strip.
constexpr int64_t kF32Mr = 6;
constexpr int64_t kF32Nr = 16;

// Bytes of one task's workspace (a packed panel and one decoded row), a multiple of 64.
int64_t f32gemm_workspace_bytes(const F32GemmArgs& g);
// Computes the output column blocks [b0, b1) (blocks of g.col_block columns of out, then
// one block of the extra_cols columns of out2 when there are any) for all m rows. `ws`: 64-byte
// aligned, f32gemm_workspace_bytes(g) bytes, this task's own.
void f32gemm_cols(const F32GemmArgs& g, int64_t b0, int64_t b1, void* ws);

// The entry point (qgemm_f32.cpp; bound as qpeft._C.qgemm_4bit_f32): checks every size
// before touching memory (ValueError), refuses a CPU without AVX2/FMA, then runs on up to
// num_threads threads over column blocks. Pointers as integers.
void qgemm_4bit_f32(bool dx, uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                    uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                    int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                    int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                    int64_t nested_blocksize, uintptr_t lora_l, int64_t lora_l_len,
                    uintptr_t lora_r, int64_t lora_r_len, int64_t rank, uintptr_t out,
                    int64_t out_len, bool accumulate, uintptr_t extra, int64_t extra_len,
                    int64_t extra_cols, uintptr_t out2, int64_t out2_len, int64_t col_block,
                    int64_t red_block, int num_threads);

// The LoRA layer's rank-r weight gradients on the same level: out[j, c] = sum_i gs[j][i] *
// q[i][c] for j < r, c in [c0, c1): gs [r, m] row-major (the scaled g or xa, transposed by
// the entry), q [m, cols] row-major; out [r, cols] row-major, or with transpose_out
// [cols, r]. Each output one FMA chain over i ascending.
struct LoraGradArgs {
  const float* gs;
  const float* q;
  float* out;
  int64_t m, r, cols;
  bool transpose_out;
};
void lora_grad_cols(const LoraGradArgs& a, int64_t c0, int64_t c1);

// The entry (bound as qpeft._C.lora_grad_f32): out = (s G)^T Q for G [m, r] with strides
// (g_stride_m, g_stride_r) and Q [m, cols] contiguous, each G element scaled in fp32 first
// (fl(G s), as torch's `g * s` rounds it); out [r, cols], or [cols, r] with transpose_out.
// dA = (s g)^T x and dB = ((s xa)^T dy)^T of the LoRA layer. Checks every size (ValueError),
// needs the avx2 level.
void lora_grad_f32(uintptr_t g, int64_t g_len, int64_t g_stride_m, int64_t g_stride_r, int64_t m,
                   int64_t r, double scaling, uintptr_t q, int64_t q_len, int64_t cols,
                   uintptr_t out, int64_t out_len, bool transpose_out, int num_threads);

// Whether the layer's fp32 products take this GEMM now: built (the compiler accepted the
// avx2 level's flags) and the CPU kernels at exactly the avx2 level (QPEFT_CPU_ISA and
// set_isa move it; at the AVX-512 levels the layer keeps oneDNN on decoded panels).
bool qgemm_4bit_f32_active();

}  // namespace cpu
}  // namespace qpeft
