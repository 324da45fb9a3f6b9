// Host entry points of qpeft._C_cuda (defined in csrc/cuda/*.cu).
//
// Plain C++ with no CUDA headers, so csrc/bindings/cuda_module.cpp compiles with
// the host compiler. The ABI is csrc/README.md's: raw device pointers as
// uintptr_t, 64-bit element counts, a `*_len` per buffer (checked before any
// launch; std::invalid_argument on mismatch), and a trailing cudaStream_t passed
// as uintptr_t. Kernels are enqueued on `stream` and not waited for; a failed
// launch throws std::runtime_error. n == 0 validates and returns without
// touching CUDA.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qpeft {
namespace cuda {

// x: n elements of x_dtype (0 f32, 1 f16, 2 bf16); packed: uint8[(n+1)/2];
// absmax: fp32[ceil(n/blocksize)]; quant_type 1 = fp4, 2 = nf4.
void quantize_4bit(std::uintptr_t x, int x_dtype, std::int64_t n, std::int64_t blocksize,
                   int quant_type, std::uintptr_t packed, std::int64_t packed_len,
                   std::uintptr_t absmax, std::int64_t absmax_len, std::uintptr_t stream);

// nested_absmax == 0: absmax is fp32[ceil(n/blocksize)]. Otherwise absmax holds
// uint8 codes, decoded as nested_code[q] * nested_absmax[i / nested_blocksize] + *offset
// (nested_code: fp32[256] and offset: fp32[1], both device pointers).
void dequantize_4bit(std::uintptr_t packed, std::int64_t packed_len, std::uintptr_t absmax,
                     std::int64_t absmax_len, std::int64_t n, std::int64_t blocksize,
                     int quant_type, std::uintptr_t out, int out_dtype,
                     std::uintptr_t nested_absmax, std::int64_t nested_absmax_len,
                     std::uintptr_t nested_code, std::uintptr_t offset,
                     std::int64_t nested_blocksize, std::uintptr_t stream);

// code: fp32[256] sorted ascending; q: uint8[n]; absmax: fp32[ceil(n/blocksize)].
void quantize_blockwise(std::uintptr_t x, int x_dtype, std::int64_t n, std::int64_t blocksize,
                        std::uintptr_t code, std::uintptr_t q, std::int64_t q_len,
                        std::uintptr_t absmax, std::int64_t absmax_len, std::uintptr_t stream);

void dequantize_blockwise(std::uintptr_t q, std::int64_t q_len, std::uintptr_t absmax,
                          std::int64_t absmax_len, std::uintptr_t code, std::int64_t n,
                          std::int64_t blocksize, std::uintptr_t out, int out_dtype,
                          std::uintptr_t stream);

// 4-bit GEMV for decoding (csrc/cuda/gemv_4bit.cu): out[i, r] = sum_j x[i, j] * W[r, j]
// for 1 <= m <= 8. x: m*k elements of x_dtype (x_len of them); W: n x k as packed
// 4-bit codes with absmax (and the nested_* double-quantization arguments) exactly
// as dequantize_4bit takes them for n*k elements; out: m*n elements of x_dtype.
// fp32 accumulation (fmaf), one rounding to x_dtype at the end.
void gemv_4bit(std::uintptr_t x, int x_dtype, std::int64_t x_len, std::int64_t m, std::int64_t k,
               std::uintptr_t packed, std::int64_t packed_len, std::uintptr_t absmax,
               std::int64_t absmax_len, std::int64_t n, std::int64_t blocksize, int quant_type,
               std::uintptr_t nested_absmax, std::int64_t nested_absmax_len,
               std::uintptr_t nested_code, std::uintptr_t offset, std::int64_t nested_blocksize,
               std::uintptr_t out, std::int64_t out_len, std::uintptr_t stream);

// Fused 4-bit dequant + LoRA GEMM on tensor cores (csrc/cuda/qlora_gemm.cu), fp16 or
// bf16 activations (dtype 1 or 2) with fp32 accumulation. W [n, k] as gemv_4bit takes it.
// qlora_forward: y [m, n] = out_scale * (x [m, k] @ W^T + bias + (s * (x @ A^T) * rank_scale)
//   @ B^T); lora_a: A [r, k], lora_b: B [n, r] in x's dtype (r = 0: no LoRA terms, the
//   lora pointers unused); rank_scale [r], bias [n], out_scale [n]: fp32 or 0; xa: 0 or
//   [m, r] in x's dtype, receives x @ A^T.
// qlora_dx: dx [m, k] = dy [m, n] @ W + (s * (dy @ B) * rank_scale) @ A (dy already
//   multiplied by out_scale); g: 0 or fp32 [m, r], receives dy @ B.
// r <= kQloraMaxRank (ranks above 64 run in chunks of 64, one extra pass over the
// activations per chunk: 4096 bounds that at 63 extra passes). split >= 1 splits the reduction (k,
// dx: n) into that many parts (at most ceil(reduction / 32) and kQloraMaxSplit) reduced in a fixed
// order through an fp32 workspace of qlora_workspace_len(m, columns of the output, r, split)
// elements.
constexpr std::int64_t kQloraMaxRank = 4096;
constexpr std::int64_t kQloraMaxSplit = 256;

std::int64_t qlora_workspace_len(std::int64_t m, std::int64_t ocols, std::int64_t r,
                                 std::int64_t split);

void qlora_forward(std::uintptr_t x, int x_dtype, std::int64_t x_len, std::int64_t m,
                   std::int64_t k, std::uintptr_t packed, std::int64_t packed_len,
                   std::uintptr_t absmax, std::int64_t absmax_len, std::int64_t n,
                   std::int64_t blocksize, int quant_type, std::uintptr_t nested_absmax,
                   std::int64_t nested_absmax_len, std::uintptr_t nested_code,
                   std::uintptr_t offset, std::int64_t nested_blocksize, std::uintptr_t lora_a,
                   std::int64_t lora_a_len, std::uintptr_t lora_b, std::int64_t lora_b_len,
                   std::int64_t r, double scaling, std::uintptr_t rank_scale,
                   std::int64_t rank_scale_len, std::uintptr_t bias, std::int64_t bias_len,
                   std::uintptr_t out_scale, std::int64_t out_scale_len, std::uintptr_t y,
                   std::int64_t y_len, std::uintptr_t xa, std::int64_t xa_len, std::int64_t split,
                   std::uintptr_t workspace, std::int64_t workspace_len, std::uintptr_t stream);

void qlora_dx(std::uintptr_t dy, int dy_dtype, std::int64_t dy_len, std::int64_t m, std::int64_t k,
              std::uintptr_t packed, std::int64_t packed_len, std::uintptr_t absmax,
              std::int64_t absmax_len, std::int64_t n, std::int64_t blocksize, int quant_type,
              std::uintptr_t nested_absmax, std::int64_t nested_absmax_len,
              std::uintptr_t nested_code, std::uintptr_t offset, std::int64_t nested_blocksize,
              std::uintptr_t lora_a, std::int64_t lora_a_len, std::uintptr_t lora_b,
              std::int64_t lora_b_len, std::int64_t r, double scaling, std::uintptr_t rank_scale,
              std::int64_t rank_scale_len, std::uintptr_t dx, std::int64_t dx_len, std::uintptr_t g,
              std::int64_t g_len, std::int64_t split, std::uintptr_t workspace,
              std::int64_t workspace_len, std::uintptr_t stream);

// The SIMT (CUDA-core) peer of the two above (csrc/cuda/qlora_simt.cu), for the dtypes and
// GPUs mma.sync does not serve: x_dtype 0 (fp32: fp32 FMAs), 3 (kQloraF64: fp64 FMAs, W
// decoded in fp32 and widened), 1 / 2 (fp16 / bf16 widened to fp32: GPUs below sm_80). Same
// arguments and math as qlora_forward / qlora_dx, except: any rank r >= 0; rank_scale,
// bias and out_scale in the compute dtype C (fp64 for dtype 3, else fp32); no split. L =
// x @ A^T (forward) or dy @ B (dx) is computed by a first launch into a buffer of C
// [m, r] that the main launch reads: `lbuf` (forward; the caller may pass xa's buffer when
// x's dtype is C, and xa = 0) or `g` (dx, the returned g); required when r > 0. xa: 0 or
// [m, r] in x's dtype.
constexpr int kQloraF64 = 3;

void qlora_simt_forward(std::uintptr_t x, int x_dtype, std::int64_t x_len, std::int64_t m,
                        std::int64_t k, std::uintptr_t packed, std::int64_t packed_len,
                        std::uintptr_t absmax, std::int64_t absmax_len, std::int64_t n,
                        std::int64_t blocksize, int quant_type, std::uintptr_t nested_absmax,
                        std::int64_t nested_absmax_len, std::uintptr_t nested_code,
                        std::uintptr_t offset, std::int64_t nested_blocksize, std::uintptr_t lora_a,
                        std::int64_t lora_a_len, std::uintptr_t lora_b, std::int64_t lora_b_len,
                        std::int64_t r, double scaling, std::uintptr_t rank_scale,
                        std::int64_t rank_scale_len, std::uintptr_t bias, std::int64_t bias_len,
                        std::uintptr_t out_scale, std::int64_t out_scale_len, std::uintptr_t y,
                        std::int64_t y_len, std::uintptr_t xa, std::int64_t xa_len,
                        std::uintptr_t lbuf, std::int64_t lbuf_len, std::uintptr_t stream);

void qlora_simt_dx(std::uintptr_t dy, int dy_dtype, std::int64_t dy_len, std::int64_t m,
                   std::int64_t k, std::uintptr_t packed, std::int64_t packed_len,
                   std::uintptr_t absmax, std::int64_t absmax_len, std::int64_t n,
                   std::int64_t blocksize, int quant_type, std::uintptr_t nested_absmax,
                   std::int64_t nested_absmax_len, std::uintptr_t nested_code,
                   std::uintptr_t offset, std::int64_t nested_blocksize, std::uintptr_t lora_a,
                   std::int64_t lora_a_len, std::uintptr_t lora_b, std::int64_t lora_b_len,
                   std::int64_t r, double scaling, std::uintptr_t rank_scale,
                   std::int64_t rank_scale_len, std::uintptr_t dx, std::int64_t dx_len,
                   std::uintptr_t g, std::int64_t g_len, std::uintptr_t stream);

// Architectures compiled into this module, e.g. {75, 80, 86, 89, 90, 100, 120}
// (nvcc's __CUDA_ARCH_LIST__ / 10: the virtual archs of the -gencode list).
std::vector<int> compiled_archs();

// cudaGetDeviceCount, called only when this is; 0 when there is no driver or GPU.
int device_count();

// Whether this module's kernels can run here: cudaGetDeviceCount, then on each device a
// one-thread kernel of this module launched, synchronized and its result read back (the
// caller's current device restored). "" when all of that worked, else what failed, with
// the CUDA error's name (cudaErrorInsufficientDriver: the driver is older than the toolkit
// this module was built with; see docs/gpu.md). Called once per process by qpeft/_native.py.
std::string probe();

}  // namespace cuda
}  // namespace qpeft

// ---------------------------------------------------------------------------
// Optimizer steps (csrc/cuda/optim.cu) and paged state (csrc/cuda/paged.cu).
// Same checks and buffer meanings as the CPU entry points of csrc/cpu/api.h;
// kernels are enqueued on `stream`, never waited for.
#include "qpeft/dlpack.h"
#include "qpeft/optim.h"

namespace qpeft {
namespace cuda {

void adamw32_step(std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
                  std::uintptr_t exp_avg, std::int64_t exp_avg_len, std::uintptr_t exp_avg_sq,
                  std::int64_t exp_avg_sq_len, const AdamScalars& s, std::uintptr_t stream);

void adamw8bit_step(std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
                    std::uintptr_t q1, std::int64_t q1_len, std::uintptr_t absmax1,
                    std::int64_t absmax1_len, std::uintptr_t q2, std::int64_t q2_len,
                    std::uintptr_t absmax2, std::int64_t absmax2_len, std::uintptr_t code1,
                    std::uintptr_t code2, const AdamScalars& s, std::uintptr_t stream);

void lion32_step(std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
                 std::uintptr_t exp_avg, std::int64_t exp_avg_len, const LionScalars& s,
                 std::uintptr_t stream);

void lion8bit_step(std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
                   std::uintptr_t q1, std::int64_t q1_len, std::uintptr_t absmax1,
                   std::int64_t absmax1_len, std::uintptr_t code1, const LionScalars& s,
                   std::uintptr_t stream);

// numel elements of DLPack dtype (dl_code, bits) in cudaMallocManaged memory,
// advised as accessed by `device`; the ManagedTensor's deleter cudaFree's it.
dlpack::ManagedTensor* managed_dlpack(std::int64_t numel, int dl_code, int bits, int device);

// cudaMemPrefetchAsync of [ptr, ptr + nbytes) to `device`, or to the host when
// device < 0, on `stream`.
void prefetch(std::uintptr_t ptr, std::int64_t nbytes, int device, std::uintptr_t stream);

// Where the range was last prefetched: a device ordinal, -1 (host) or -2 (never,
// or not the same for every page).
int prefetch_location(std::uintptr_t ptr, std::int64_t nbytes);

// cudaDevAttrConcurrentManagedAccess: prefetching and advice only work where true
// (Linux, sm_60+); elsewhere managed memory migrates on kernel launch.
bool concurrent_managed_access(int device);

}  // namespace cuda
}  // namespace qpeft
