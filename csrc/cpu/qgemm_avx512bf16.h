// Interface between the entry point of the fused 4-bit GEMM for the avx512_bf16 level
// (qgemm_dpbf16.cpp, baseline flags) and its kernel translation unit
// qgemm_avx512bf16.cpp (compiled with QPEFT_ISA_FLAGS_avx512_bf16, CMakeLists.txt).
// Declarations only, like kernels.h: a COMDAT instantiated in the kernel TU could be
// the copy the linker keeps for baseline code.
//
//   out[m, n] (fp32) = x[m, k] (bf16) @ W[n, k]^T
//
// W: the packed 4-bit codes with plain or double-quantized absmax (as Dequant4Args),
// decoded per quantization block exactly as dequantize_4bit to bf16 (fp32
// table[c] * absmax, rounded once to nearest even, subnormals kept), a tile of rows at a
// time into a small L1-resident scratch, and multiplied there by vdpbf16ps (bf16 pairs,
// fp32 accumulation) against x's rows. docs/design.md, "AVX512-BF16 GEMM".
#pragma once

#include <cstdint>

namespace qpeft {
namespace cpu {

struct DpGemmArgs {
  const uint16_t* x;  // [m, k] bf16, row-major
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
  float* out;  // [m, n] fp32, every element written
};

// Rows of W per tile (the micro-kernel's columns) and reduction elements per decoded
// chunk of a tile (a multiple of 32).
constexpr int64_t kDpRowsPerTile = 4;
constexpr int64_t kDpRedChunk = 2048;
// Rows of x per pass (the entry point's loop; W is decoded once per pass).
constexpr int64_t kDpRowsPerPass = 128;

// Bytes of one task's scratch (a tile of decoded rows), a multiple of 64.
int64_t dpbf16_workspace_bytes(const DpGemmArgs& g);
// Computes the output columns of the W row tiles [t0, t1) (tiles of kDpRowsPerTile
// rows). `ws`: 64-byte aligned, dpbf16_workspace_bytes(g) bytes, this task's own.
void dpbf16_gemm_tiles(const DpGemmArgs& g, int64_t t0, int64_t t1, void* ws);

// dx = dy @ W (x holds dy [m, n], out is [m, k]): W decoded in strips of kDpDxCols
// columns and chunks of kDpDxRedRows rows, interleaved in pairs of rows (vdpbf16ps's
// pairs run along the reduction, n), each chunk's sums added to out.
constexpr int64_t kDpDxCols = 128;
constexpr int64_t kDpDxRedRows = 128;
int64_t dpbf16_dx_workspace_bytes(const DpGemmArgs& g);
// Computes out's column strips [s0, s1) (strips of kDpDxCols columns).
void dpbf16_dx_strips(const DpGemmArgs& g, int64_t s0, int64_t s1, void* ws);

// The entry point (qgemm_dpbf16.cpp; bound as qpeft._C.qgemm_4bit_dpbf16): checks every
// size before touching memory (ValueError), refuses a CPU without AVX512-BF16, then
// runs on up to num_threads threads split over W's rows. Pointers as integers.
void qgemm_4bit_dpbf16(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                       uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                       int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                       int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                       int64_t nested_blocksize, uintptr_t out, int64_t out_len, int num_threads);
// The same for dx: out[m, k] (fp32) = x[m, n] @ W (bound as qpeft._C.qgemm_4bit_dpbf16_dx);
// x_len = m n, out_len = m k.
void qgemm_4bit_dpbf16_dx(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                          uintptr_t packed, int64_t packed_len, uintptr_t absmax,
                          int64_t absmax_len, int64_t blocksize, int quant_type,
                          uintptr_t nested_absmax, int64_t nested_absmax_len, uintptr_t nested_code,
                          uintptr_t offset, int64_t nested_blocksize, uintptr_t out,
                          int64_t out_len, int num_threads);

}  // namespace cpu
}  // namespace qpeft
