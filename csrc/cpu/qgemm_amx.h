// Interface between the AMX 4-bit GEMM entry points (qgemm.cpp, baseline flags) and
// the kernel translation unit qgemm_amx.cpp (compiled with the amx level's flags,
// CMakeLists.txt: QPEFT_ISA_FLAGS_amx). Declarations only, like kernels.h: this
// header is included by the AMX TU, and any COMDAT it instantiated there could be the
// copy the linker keeps for baseline code.
//
//   forward: out[m, n] = a[m, k] @ W[n, k]^T   (cols = n, reduction over k)
//   dx:      out[m, k] = a[m, n] @ W[n, k]     (cols = k, reduction over n)
//
// a is bf16 (row-major, the reduction dimension contiguous), W the packed 4-bit codes
// with plain or double-quantized absmax (as Dequant4Args), out fp32 or bf16. Every
// product is a bf16 x bf16 product of AMX's TDPBF16PS, accumulated in fp32 tiles;
// W's bf16 values equal dequantize_4bit to bf16 bit for bit (docs/design.md).
#pragma once

#include <cstdint>

namespace qpeft {
namespace cpu {

struct AmxGemmArgs {
  const uint16_t* a;  // [m, red] bf16
  int64_t m;
  bool dx;  // false: forward (cols = n, red = k); true: dx (cols = k, red = n)
  int64_t n, k;
  const uint8_t* packed;
  int64_t blocksize;
  int quant_type;
  const float* absmax;      // plain absmax, or nullptr when absmax_q is set
  const uint8_t* absmax_q;  // double-quantized absmax codes
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int64_t nested_blocksize;
  void* out;  // [m, cols], fp32 or bf16
  int out_dtype;
  bool accumulate;  // fp32 out only: out += result
  // The optional rank-r epilogue (rank 0: none): result = a @ W(^T) + lora_l @ lora_r, the
  // rank-r sum in fp32 (q ascending) added to the fp32 accumulators before the store, so
  // the LoRA term of the QLoRA layer costs no [m, cols] pass of its own (docs/design.md,
  // "AMX GEMM").
  const float* lora_l;  // [m, rank] fp32, row-major
  const float* lora_r;  // [rank, cols] fp32, row-major
  int64_t rank;
  // Blocking (multiples of 32): columns and reduction elements per decoded W panel.
  int64_t col_block, red_block;
  uint16_t* ap;  // the repacked a: [mt][rt] tiles (dx: rows; forward: x^T in VNNI pairs)
};

// Elements of the repacked a (mt = ceil(m / 16) tiles of 16 rows, rt = ceil(red / 32)).
int64_t amx_ap_elems(const AmxGemmArgs& g);
// Bytes of one task's workspace (W panel, decode rows, fp32 accumulators), 64-aligned.
int64_t amx_workspace_bytes(const AmxGemmArgs& g);
// Repacks a's row tiles [mt0, mt1) into g.ap (no tile instructions).
void amx_repack_a(const AmxGemmArgs& g, int64_t mt0, int64_t mt1);
// Computes the column blocks [cb0, cb1) of out (blocks of g.col_block columns) with
// one tile configuration loaded on entry and released on return. `ws`: 64-byte
// aligned, amx_workspace_bytes(g) bytes, this task's own.
void amx_gemm_cols(const AmxGemmArgs& g, int64_t cb0, int64_t cb1, void* ws);

// The LoRA weight gradients' products, reduced over the m rows (dA = gs^T x, dB^T =
// xs^T dy): out[q, c] = sum_m l[m, q] x[m, c] for q in [0, rank), columns [c0, c1) (a
// multiple of 16 apart, or to cols), fp32 FMAs in m order from the exact fp32 values of
// bf16 x. l: [m, lda] fp32, lda a multiple of 16 (zero padded past rank). out: fp32
// [rank, cols], or [cols, rank] with transpose. acc: this task's 64-byte aligned
// workspace of lda x ceil((c1 - c0) / 16) * 16 floats. AVX-512 only (no tiles): in this
// TU for its flags, entered at the amx level (qgemm.cpp: lora_grad_amx).
void amx_lora_grad_cols(const float* l, int64_t lda, int64_t rank, const uint16_t* x, int64_t m,
                        int64_t cols, int64_t c0, int64_t c1, float* out, bool transpose,
                        float* acc);

// Its entry (qgemm.cpp; bound as qpeft._C.lora_grad_amx): checks sizes, pads l, splits
// the columns over num_threads threads.
void lora_grad_amx(uintptr_t l, int64_t l_len, int64_t rank, uintptr_t x, int64_t x_len, int64_t m,
                   int64_t cols, uintptr_t out, int64_t out_len, bool transpose, int num_threads);

// The entry point (qgemm.cpp, baseline flags; bound as qpeft._C.qgemm_4bit_amx and
// qgemm_4bit_amx_dx): checks every size before touching memory (ValueError), refuses a
// CPU without the amx level, then runs on up to num_threads threads (split over the
// output columns). a: m x (dx ? n : k) bf16; out: m x (dx ? k : n) of out_dtype (0
// fp32, 2 bf16); accumulate (fp32 only): out += result. rank > 0: result also adds
// lora_l [m, rank] @ lora_r [rank, cols] (fp32; AmxGemmArgs). col_block / red_block: 0
// for the defaults, else multiples of 32 (benchmarks). Pointers as integers.
void qgemm_4bit_amx(bool dx, uintptr_t a, int64_t a_len, int64_t m, int64_t n, int64_t k,
                    uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                    int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                    int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                    int64_t nested_blocksize, uintptr_t out, int64_t out_len, int out_dtype,
                    bool accumulate, uintptr_t lora_l, int64_t lora_l_len, uintptr_t lora_r,
                    int64_t lora_r_len, int64_t rank, int64_t col_block, int64_t red_block,
                    int num_threads);

}  // namespace cpu
}  // namespace qpeft
