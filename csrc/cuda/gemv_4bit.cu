// 4-bit GEMV for decoding (qpeft::gemv_4bit): y[m, r] = sum_k x[m, k] * W[r, k]
// for M <= 8 rows of activations against a weight W [N, K] stored as NF4/FP4
// codes with blockwise absmax (plain fp32, or double-quantized and decoded here),
// accumulated in fp32 and rounded once to x's dtype.
//
// Launch: 128 threads = 4 warps per block, one row of W per warp (grid-strides
// over rows past 2^20 blocks). Each lane takes 16-byte chunks of the row's
// packed codes (32 weights: one coalesced 512-byte load per warp), decodes them
// as dequantize_4bit does (table[code] * absmax in fp32, so the weights are
// exactly the reference's), multiplies with the matching 32 values of each x
// row (16-byte loads through the read-only cache) and accumulates with fmaf; a
// 5-step xor-shuffle butterfly then sums the 32 lanes and lanes 0..M-1 store
// one output each. Why a warp per row: at M <= 8 the kernel is a stream over W
// (N*K/2 bytes) with too little work per row to share a row between warps
// without a second reduction through shared memory; 4 warps per block keep
// the table staging (16 floats, plus the nested code and offset, 1028 bytes of
// dynamic shared memory) cheap and give N/4 blocks, enough to fill every SM for
// N >= 2048. Within a chunk a lane works one 32-bit word (8 weights) at a time.
// Estimate, not a measurement: at M = 1 the W stream dominates (x, K*2 bytes,
// is re-read per row from L1/L2); at M = 8 the x re-reads are 8x larger than at
// M = 1 and may make it L2-bound.
//
// The 16-byte path needs K % 32 == 0 (rows then start 16-byte aligned in both
// W and x, and a chunk never spans two quant blocks since blocksize >= 32 is a
// power of two) and aligned base pointers; anything else takes a per-element
// path. One instantiation per M (1..8) and dtype: the accumulators are a
// register array indexed by constants after unrolling, with no per-row guards.
//
// Inner loop: the 16-byte load of packed codes is issued before the absmax decode
// (whose loads depend on each other: code byte, nested absmax, shared code value),
// the 4 words of a chunk are unrolled (kWordsPerChunk), and block / nested_blocksize
// is a 32-bit magic-number division (FastDivU32): a 64-bit `/` compiled to a call of
// the software division routine per chunk (cuobjdump -sass: 48 CALLs and 72 MUFU.RCP
// on sm_90 before, none now; the host refuses >= 2^31 quant blocks).
//
// Registers (nvcc 13.0 -Xptxas -v, sm_80 / sm_90; no spills, no stack in any
// instantiation): __launch_bounds__(128, 1) and the `#pragma unroll 1` chunk loop
// keep every instantiation spill-free. Unrolling a chunk's words lets ptxas hoist
// their x loads (up to M x 4 x 16 bytes), so registers grow with M: fp16/bf16 x
// 46-128 (31-72 with the word loop rolled). fp32 x carries 4 values per 16-byte load
// (twice the loads): fully unrolled it took 211-250 registers at M = 5..8, 2 blocks
// of 128 threads per SM, so there the words are unrolled by 2 (kUnroll): 120-168
// (M = 1..4, fully unrolled: 63-188; rolled: 40-110). More loads in flight per lane
// against fewer resident warps: not measured on a GPU yet. With
// __launch_bounds__(128) alone ptxas spilled 4-16 bytes of cold values in a few
// instantiations per arch; a register cap (min 4-8 blocks/SM) spilled 8-56 bytes.
// The per-block table staging keeps the nested offset in shared memory, next to the
// nested code, for the same reason.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernel_common.h"
#include "launch.h"
#include "ops.h"
#include "qpeft/format.h"

namespace qpeft {
namespace cuda {
namespace {

__constant__ float c_nf4[kNumCodes4] = {QPEFT_NF4_VALUES};
__constant__ float c_fp4[kNumCodes4] = {QPEFT_FP4_VALUES};

constexpr int kGemvThreads = 128;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kGemvChunk = 32;          // weights per 16-byte load of packed codes
constexpr int kMaxRows = kGemvMaxRows;  // M limit (format.h; launch_gemv instantiates 1..8)
static_assert(kMaxRows == 8, "launch_gemv has one case per row count 1..8");

static_assert(kGemvChunk * 4 / 8 == 16, "a chunk is one 16-byte load");
constexpr int kWordsPerChunk = kGemvChunk / 8;  // 32-bit words (8 weights each) per chunk
static_assert(kWordsPerChunk == 4, "a chunk is one uint4");

// absmax of quant block `blk` (< 2^31): fp32, or the double-quantized code decoded
// as dequantize_4bit does (format.h: nested_absmax_value).
__device__ __forceinline__ float block_absmax(const void* __restrict__ absmax, uint32_t blk,
                                              bool nested, const float* __restrict__ nested_absmax,
                                              const float* s_ncode, const FastDivU32& nested_bs) {
  if (nested) {
    return nested_absmax_value(static_cast<const uint8_t*>(absmax)[blk], s_ncode,
                               __ldg(nested_absmax + fastdiv(blk, nested_bs)), s_ncode[kNumCodes8]);
  }
  return __ldg(static_cast<const float*>(absmax) + blk);
}

template <int DT, int M>
__global__ void __launch_bounds__(kGemvThreads, 1)
    gemv4_kernel(const ET<DT>* __restrict__ x, int64_t k, const uint8_t* __restrict__ packed,
                 const void* __restrict__ absmax, int64_t n, int log2_bs, int quant_type, bool vec,
                 const float* __restrict__ nested_absmax, const float* __restrict__ nested_code,
                 const float* __restrict__ offset, FastDivU32 nested_bs, ET<DT>* __restrict__ out) {
  __shared__ float s_tab[kNumCodes4];
  float* s_ncode = dynamic_smem<float>();  // nested: 256 code values, then the offset
  const bool nested = nested_absmax != nullptr;
  if (threadIdx.x < kNumCodes4) {
    s_tab[threadIdx.x] = quant_type == kNF4 ? c_nf4[threadIdx.x] : c_fp4[threadIdx.x];
  }
  if (nested) {
    for (int i = static_cast<int>(threadIdx.x); i < kNumCodes8; i += kGemvThreads)
      s_ncode[i] = nested_code[i];
    if (threadIdx.x == 0) s_ncode[kNumCodes8] = *offset;
  }
  __syncthreads();

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * kGemvWarps;
  // Warp-uniform loop: every lane of a warp runs the same rows (full-mask shuffles).
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (threadIdx.x >> 5); row < n;
       row += row_stride) {
    float acc[M];
#pragma unroll
    for (int i = 0; i < M; ++i) acc[i] = 0.0f;
    const int64_t w0 = row * k;  // flat index of W[row, 0]

    if (vec) {
      const int64_t nchunks = k / kGemvChunk;
#pragma unroll 1
      for (int64_t c = lane; c < nchunks; c += 32) {  // runtime count: not unrolled
        const int64_t e0 = w0 + c * kGemvChunk;
        // The packed codes first: the absmax decode is a chain of dependent loads (code
        // byte, nested absmax, shared code value), and issued after the 16-byte weight
        // load it overlaps that load's latency instead of delaying it.
        const uint4 w = __ldg(reinterpret_cast<const uint4*>(packed + (e0 >> 1)));
        const float am = block_absmax(absmax, static_cast<uint32_t>(e0 >> log2_bs), nested,
                                      nested_absmax, s_ncode, nested_bs);
        const ET<DT>* xc = x + c * kGemvChunk;
        [[maybe_unused]] constexpr int kUnroll = (DT == kF32 && M > 4) ? 2 : kWordsPerChunk;
#pragma unroll kUnroll
        for (int q = 0; q < kWordsPerChunk; ++q) {
          const uint32_t word = q == 0   ? w.x
                                : q == 1 ? w.y
                                : q == 2 ? w.z
                                         : w.w;  // a select, not an index
          float wv[8];
#pragma unroll
          for (int b = 0; b < 4; ++b) {  // byte b of the word: its high nibble comes first
            wv[2 * b] = s_tab[(word >> (8 * b + 4)) & 15u] * am;
            wv[2 * b + 1] = s_tab[(word >> (8 * b)) & 15u] * am;
          }
#pragma unroll
          for (int i = 0; i < M; ++i) {
            float xv[8];
            ldg8<DT>(xc + i * k + 8 * q, xv);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i] = fmaf(wv[j], xv[j], acc[i]);
          }
        }
      }
    } else {
#pragma unroll 1
      for (int64_t kk = lane; kk < k; kk += 32) {
        const int64_t e = w0 + kk;
        const uint8_t byte = packed[e >> 1];
        const float am = block_absmax(absmax, static_cast<uint32_t>(e >> log2_bs), nested,
                                      nested_absmax, s_ncode, nested_bs);
        const float wv = s_tab[(e & 1) ? (byte & 15u) : (byte >> 4)] * am;
#pragma unroll
        for (int i = 0; i < M; ++i) acc[i] = fmaf(wv, to_f32<DT>(x[i * k + kk]), acc[i]);
      }
    }

    // Butterfly: lane l adds lane l^o's partial sum; a + b == b + a exactly, so all
    // 32 lanes end with the same total.
#pragma unroll
    for (int i = 0; i < M; ++i) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
    }
#pragma unroll
    for (int i = 0; i < M; ++i) {
      if (lane == i) store1<DT>(out, i * n + row, acc[i]);  // lanes 0..M-1 store one row each
    }
  }
}

template <int DT, int M>
void launch_m(dim3 grid, std::size_t smem, cudaStream_t s, const ET<DT>* x, int64_t k,
              const uint8_t* packed, const void* absmax, int64_t n, int log2_bs, int quant_type,
              bool vec, const float* na, const float* nc, const float* of, FastDivU32 nested_bs,
              ET<DT>* out) {
  launch("gemv_4bit", gemv4_kernel<DT, M>, grid, kGemvThreads, smem, s, x, k, packed, absmax, n,
         log2_bs, quant_type, vec, na, nc, of, nested_bs, out);
}

template <int DT, typename... A>
void launch_gemv(int64_t m, A... a) {
  switch (m) {
    case 1:
      launch_m<DT, 1>(a...);
      break;
    case 2:
      launch_m<DT, 2>(a...);
      break;
    case 3:
      launch_m<DT, 3>(a...);
      break;
    case 4:
      launch_m<DT, 4>(a...);
      break;
    case 5:
      launch_m<DT, 5>(a...);
      break;
    case 6:
      launch_m<DT, 6>(a...);
      break;
    case 7:
      launch_m<DT, 7>(a...);
      break;
    default:
      launch_m<DT, 8>(a...);
      break;
  }
}

}  // namespace

void gemv_4bit(std::uintptr_t x, int x_dtype, std::int64_t x_len, std::int64_t m, std::int64_t k,
               std::uintptr_t packed, std::int64_t packed_len, std::uintptr_t absmax,
               std::int64_t absmax_len, std::int64_t n, std::int64_t blocksize, int quant_type,
               std::uintptr_t nested_absmax, std::int64_t nested_absmax_len,
               std::uintptr_t nested_code, std::uintptr_t offset, std::int64_t nested_blocksize,
               std::uintptr_t out, std::int64_t out_len, std::uintptr_t stream) {
  const char* fn = "gemv_4bit";
  host::check_gemv_rows(fn, m);
  host::check_positive(fn, "n", n);
  host::check_positive(fn, "k", k);
  const int64_t numel = host::checked_mul(fn, "n", n, "k", k);
  const int log2_bs = host::log2_blocksize(fn, blocksize);
  host::check_dtype(fn, "x_dtype", x_dtype);
  host::check_quant_type(fn, quant_type);
  // m * k and m * n are checked products too: an unchecked one can wrap to a small
  // value that a small buffer passes (m <= 8 does not bound k or n).
  host::check_len(fn, "x", x_len, host::checked_mul(fn, "m", m, "k", k));
  host::check_len(fn, "packed", packed_len, host::packed4_len(numel));
  const int64_t nblocks = ceil_div(numel, blocksize);
  host::check_len(fn, "absmax", absmax_len, nblocks);
  host::check_len(fn, "out", out_len, host::checked_mul(fn, "m", m, "n", n));
  // Block indices are 32-bit in the kernel (FastDivU32, kernel_common.h): W may have up to
  // 2^31 - 1 quant blocks (2^36 elements at blocksize 32).
  host::check_index32(fn, "quant blocks of W", nblocks);
  const bool nested = nested_absmax != 0;
  FastDivU32 nested_div = make_fastdiv(1);
  if (nested) {
    host::check_positive(fn, "nested_blocksize", nested_blocksize);
    host::check_index32(fn, "nested_blocksize", nested_blocksize);
    host::check_len(fn, "nested_absmax", nested_absmax_len, ceil_div(nblocks, nested_blocksize));
    host::check_ptr(fn, "nested_code", nested_code);
    host::check_ptr(fn, "offset", offset);
    nested_div = make_fastdiv(static_cast<uint32_t>(nested_blocksize));
  }
  host::check_ptr(fn, "x", x);
  host::check_ptr(fn, "packed", packed);
  host::check_ptr(fn, "absmax", absmax);
  host::check_ptr(fn, "out", out);

  const dim3 grid(grid_for(n, kGemvWarps));
  const std::size_t smem = nested ? (kNumCodes8 + 1) * sizeof(float) : 0;
  const bool vec = k % kGemvChunk == 0 && aligned(packed, 16) && aligned(x, 16);
  with_dtype(x_dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    launch_gemv<DT>(m, grid, smem, as_stream(stream), reinterpret_cast<const ET<DT>*>(x), k,
                    reinterpret_cast<const uint8_t*>(packed), reinterpret_cast<const void*>(absmax),
                    n, log2_bs, quant_type, vec, reinterpret_cast<const float*>(nested_absmax),
                    reinterpret_cast<const float*>(nested_code),
                    reinterpret_cast<const float*>(offset), nested_div,
                    reinterpret_cast<ET<DT>*>(out));
  });
}

}  // namespace cuda
}  // namespace qpeft
