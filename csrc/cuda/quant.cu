// CUDA kernels of the quantize/dequantize pairs: 4-bit (NF4/FP4) and 8-bit
// blockwise, plus their host launchers (ABI: csrc/README.md, csrc/cuda/ops.h).
//
// The per-element math is format.h's (encode4, normalize4, inv_absmax4, lut_bin,
// code8_for_grid, nested_absmax_value, ...), shared with the CPU kernels; these
// kernels only load, reduce, call it and store. Build with --fmad=false: a fused
// multiply-add would change bits relative to the CPU path.
//
// Also compiled as host C++ into the emulation module qpeft._C_cuda_emu
// (csrc/emu): launches only through qpeft::launch (launch.h), only
// threadIdx/blockIdx/blockDim/gridDim, __shared__, __syncthreads and
// __shfl_xor_sync; every local array is indexed by constants after unrolling.
// Element conversions are kernel_common.h's. Host-side CUDA runtime calls live
// in device.cu, which the emulation does not compile.
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

// ----------------------------------------------------------------------------
// Tables, defined from format.h's macros and constexpr arrays.
__constant__ float c_nf4[kNumCodes4] = {QPEFT_NF4_VALUES};
__constant__ float c_fp4[kNumCodes4] = {QPEFT_FP4_VALUES};
#define QPEFT_MID15(M) \
  {M[0], M[1], M[2], M[3], M[4], M[5], M[6], M[7], M[8], M[9], M[10], M[11], M[12], M[13], M[14]}
__constant__ float c_nf4_mid[kNumCodes4 - 1] = QPEFT_MID15(kNF4Mid);
__constant__ float c_fp4_mid[kNumCodes4 - 1] = QPEFT_MID15(kFP4Mid);
#undef QPEFT_MID15
__constant__ uint8_t c_nf4_order[kNumCodes4] = {QPEFT_NF4_ORDER};
__constant__ uint8_t c_fp4_order[kNumCodes4] = {QPEFT_FP4_ORDER};

constexpr int kQuantElems = 8;      // consecutive elements per thread in the quantize kernels
constexpr int kQuantThreads = 256;  // quantize block size, raised to blocksize/8 for 4096
constexpr int kMaxQuantThreads = 4096 / kQuantElems;  // 512
constexpr int kDequantThreads = 256;
constexpr int kDequant4Elems = 32;  // one 16-byte load of packed nibbles per thread
constexpr int kDequant8Elems = 16;  // one 16-byte load of uint8 codes per thread

// Measured with nvcc 13.0 -Xptxas -v (24 instantiations x sm_75..sm_120): 0 bytes
// stack/spill everywhere; 29-32 registers on sm_80/sm_90, 26-40 on sm_86..sm_120,
// up to 63 on sm_75 (bf16 conversion is software there); smem 80 B (quantize4),
// 1084 B (quantize8), 64 B / 1088 B (dequantize4 plain / nested), 1024 B (dequantize8).

// Every 32-value chunk (4-bit) or 16-value chunk (8-bit) lies in one quant block
// because blocksize >= 32 and both are powers of two: one absmax per thread.
static_assert(kDequant4Elems <= 32 && kDequant8Elems <= 32, "a chunk must not span quant blocks");
static_assert(kQuantElems % 2 == 0, "quantize threads pack whole bytes");

// Loads x[e0..e0+8) as fp32; elements at or past n read as 0 (no effect on the
// absmax). vec: x is 16-byte aligned, so a full chunk is one or two 16-byte loads.
template <int DT>
__device__ __forceinline__ void load8(const ET<DT>* __restrict__ x, int64_t e0, int64_t n, bool vec,
                                      float (&v)[8]) {
  if (vec && e0 + kQuantElems <= n) {
    ldg8<DT>(x + e0, v);
  } else {
#pragma unroll
    for (int j = 0; j < kQuantElems; ++j) v[j] = e0 + j < n ? to_f32<DT>(x[e0 + j]) : 0.0f;
  }
}

// ----------------------------------------------------------------------------
// Block absmax with NaN propagation: fmaxf would drop a NaN, here a NaN on either
// side wins, so a block holding a NaN gets absmax NaN.
__device__ __forceinline__ float absmax_combine(float a, float b) {
  return (b > a || b != b) ? b : a;
}

// Combines `a` over the tpq threads of one quant block (tpq = blocksize / 8, a
// power of two in [4, 512]; groups are aligned runs of threads). Within a warp by
// xor shuffles; over warps (tpq > 32, blocksize >= 512) through s_red. Every
// thread of the block must call it (full-mask shuffles, __syncthreads); the
// tpq > 32 branch is uniform over the block.
__device__ __forceinline__ float group_absmax(float a, int tpq, float* s_red) {
  const int lanes = tpq < 32 ? tpq : 32;
  for (int off = lanes >> 1; off > 0; off >>= 1) {
    a = absmax_combine(a, __shfl_xor_sync(0xffffffffu, a, off));
  }
  if (tpq > 32) {
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    if ((threadIdx.x & 31u) == 0) s_red[warp] = a;
    __syncthreads();
    const int wpq = tpq >> 5;
    const int w0 = warp & ~(wpq - 1);
    a = s_red[w0];
    for (int w = 1; w < wpq; ++w) a = absmax_combine(a, s_red[w0 + w]);
    __syncthreads();  // s_red is rewritten in the next tile
  }
  return a;
}

// Loads the thread's 8 elements and returns its quant block's absmax (the caller
// stores it: the 4-bit encoder stores a partial block's floored, format.h).
template <int DT>
__device__ __forceinline__ float load_and_absmax(const ET<DT>* __restrict__ x, int64_t e0,
                                                 int64_t n, int log2_bs, bool vec, float* s_red,
                                                 float (&v)[8]) {
  load8<DT>(x, e0, n, vec, v);
  float a = 0.0f;
#pragma unroll
  for (int j = 0; j < kQuantElems; ++j) a = absmax_combine(a, fabsf(v[j]));
  const int tpq = (1 << log2_bs) / kQuantElems;
  return group_absmax(a, tpq, s_red);
}

// Whether this thread stores its quant block's absmax: the block's first thread.
__device__ __forceinline__ bool stores_absmax(int64_t e0, int64_t n, int log2_bs) {
  const int tpq = (1 << log2_bs) / kQuantElems;
  return (static_cast<int>(threadIdx.x) & (tpq - 1)) == 0 && e0 < n;
}

// ----------------------------------------------------------------------------
// quantize_4bit. Launch: max(256, blocksize/8) threads (512 only for blocksize
// 4096), each owning 8 consecutive elements: one 16-byte load for fp16/bf16, two
// for fp32, 4 packed bytes stored as one 32-bit word, so pairs never straddle
// threads. A quant block is an aligned group of blocksize/8 threads; a CUDA block
// covers a tile of blockDim*8 elements (a whole number of quant blocks) and
// grid-strides over tiles. vec: x 16-byte and packed 4-byte aligned.
template <int DT, int QT>
__global__ void __launch_bounds__(kMaxQuantThreads)
    quantize4_kernel(const ET<DT>* __restrict__ x, int64_t n, int log2_bs, bool vec,
                     uint8_t* __restrict__ packed, float* __restrict__ absmax) {
  __shared__ float s_red[kMaxQuantThreads / 32];
  __shared__ uint8_t s_order[kNumCodes4];  // indexed per element: smem, not constant memory
  const uint8_t* c_order = QT == kNF4 ? c_nf4_order : c_fp4_order;
  const float* mid = QT == kNF4 ? c_nf4_mid : c_fp4_mid;  // uniform reads: constant memory
  if (threadIdx.x < kNumCodes4) s_order[threadIdx.x] = c_order[threadIdx.x];
  __syncthreads();

  const int64_t tile = static_cast<int64_t>(blockDim.x) * kQuantElems;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * tile; base < n;
       base += static_cast<int64_t>(gridDim.x) * tile) {
    const int64_t e0 = base + static_cast<int64_t>(threadIdx.x) * kQuantElems;
    float v[kQuantElems];
    const float a = load_and_absmax<DT>(x, e0, n, log2_bs, vec, s_red, v);
    const float inv = inv_absmax4(a);
    // A partial last quant block divides instead (format.h: normalize4, as the CPU
    // path of bitsandbytes does); x * (1/a) and x / a differ by an ulp at times,
    // which moves a value sitting on a midpoint. Found by the emulation harness
    // (tests/test_cuda_emulated.py: shape [11, 34, 46], blocksize 512, fp4).
    const bool partial = (((e0 >> log2_bs) + 1) << log2_bs) > n;
    const float floored = floor_absmax4(a);
    if (stores_absmax(e0, n, log2_bs)) absmax[e0 >> log2_bs] = stored_absmax4(a, partial);
    uint32_t word = 0;
#pragma unroll
    for (int p = 0; p < kQuantElems / 2; ++p) {
      const uint8_t hi = encode4(normalize4(v[2 * p], floored, inv, partial), mid, s_order);
      const uint8_t lo =
          e0 + 2 * p + 1 < n
              ? encode4(normalize4(v[2 * p + 1], floored, inv, partial), mid, s_order)
              : zero_code4(QT);
      word |= static_cast<uint32_t>(pack_pair(hi, lo)) << (8 * p);  // byte p at the lower address
    }
    uint8_t* dst = packed + (e0 >> 1);
    if (vec && e0 + kQuantElems <= n) {
      *reinterpret_cast<uint32_t*>(dst) = word;
    } else {
#pragma unroll
      for (int p = 0; p < kQuantElems / 2; ++p) {
        if (e0 + 2 * p < n) dst[p] = static_cast<uint8_t>(word >> (8 * p));
      }
    }
  }
}

// quantize_blockwise (8-bit). Launch as quantize4_kernel; each thread stores its
// 8 codes as one 8-byte word. The 255 midpoints of `code` are computed into smem
// first: (code[k] + code[k+1]) / 2 in fp32, format.h's midpoint() (constexpr
// host-only, so spelled out here). vec: x 16-byte and q 8-byte aligned.
template <int DT>
__global__ void __launch_bounds__(kMaxQuantThreads)
    quantize8_kernel(const ET<DT>* __restrict__ x, int64_t n, int log2_bs, bool vec,
                     const float* __restrict__ code, uint8_t* __restrict__ q,
                     float* __restrict__ absmax) {
  __shared__ float s_red[kMaxQuantThreads / 32];
  __shared__ float s_mid8[kNumCodes8 - 1];
  for (int k = static_cast<int>(threadIdx.x); k < kNumCodes8 - 1;
       k += static_cast<int>(blockDim.x)) {
    s_mid8[k] = (code[k] + code[k + 1]) / 2.0f;
  }
  __syncthreads();

  const int64_t tile = static_cast<int64_t>(blockDim.x) * kQuantElems;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * tile; base < n;
       base += static_cast<int64_t>(gridDim.x) * tile) {
    const int64_t e0 = base + static_cast<int64_t>(threadIdx.x) * kQuantElems;
    float v[kQuantElems];
    const float a = load_and_absmax<DT>(x, e0, n, log2_bs, vec, s_red, v);
    if (stores_absmax(e0, n, log2_bs)) absmax[e0 >> log2_bs] = a;
    const float inv = 1.0f / a;  // unused when a == 0 (all codes 0)
    uint32_t w0 = 0, w1 = 0;
#pragma unroll
    for (int j = 0; j < kQuantElems; ++j) {
      const uint32_t c =
          a == 0.0f
              ? 0u
              : static_cast<uint32_t>(code8_for_grid(lut_grid_value(lut_bin(v[j] * inv)), s_mid8));
      if (j < 4)
        w0 |= c << (8 * j);
      else
        w1 |= c << (8 * (j - 4));
    }
    uint8_t* dst = q + e0;
    if (vec && e0 + kQuantElems <= n) {
      *reinterpret_cast<uint2*>(dst) = make_uint2(w0, w1);
    } else {
#pragma unroll
      for (int j = 0; j < kQuantElems; ++j) {
        if (e0 + j < n) dst[j] = static_cast<uint8_t>((j < 4 ? w0 : w1) >> (8 * (j & 3)));
      }
    }
  }
}

// quantize_blockwise at any other blocksize > 0 (a power of two outside [32, 4096],
// or not a power of two at all): bitsandbytes' CPU quantize_blockwise takes every
// positive blocksize, and qpeft's 8-bit ops take what it takes. One CUDA block per
// quant block (grid-strided), its threads striding over the block twice: the
// absmax (a tree reduction in smem, NaN winning as in absmax_combine), then the
// codes. Same per-element math as quantize8_kernel, so the same bytes; slower, as
// no format uses these blocksizes on a hot path.
template <int DT>
__global__ void __launch_bounds__(kQuantThreads)
    quantize8_any_kernel(const ET<DT>* __restrict__ x, int64_t n, int64_t blocksize,
                         const float* __restrict__ code, uint8_t* __restrict__ q,
                         float* __restrict__ absmax) {
  __shared__ float s_red[kQuantThreads];
  __shared__ float s_mid8[kNumCodes8 - 1];
  const int tid = static_cast<int>(threadIdx.x);
  for (int k = tid; k < kNumCodes8 - 1; k += static_cast<int>(blockDim.x)) {
    s_mid8[k] = (code[k] + code[k + 1]) / 2.0f;
  }
  __syncthreads();

  const int64_t nblocks = n / blocksize + (n % blocksize != 0);
  for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
    const int64_t begin = b * blocksize;
    const int64_t end = begin + blocksize < n ? begin + blocksize : n;
    float a = 0.0f;
    for (int64_t i = begin + tid; i < end; i += blockDim.x) {
      a = absmax_combine(a, fabsf(to_f32<DT>(x[i])));
    }
    s_red[tid] = a;
    __syncthreads();
    for (int half = static_cast<int>(blockDim.x) >> 1; half > 0; half >>= 1) {
      if (tid < half) s_red[tid] = absmax_combine(s_red[tid], s_red[tid + half]);
      __syncthreads();
    }
    a = s_red[0];
    __syncthreads();  // every thread has read s_red[0] before the next block rewrites it
    if (tid == 0) absmax[b] = a;
    const float inv = 1.0f / a;  // unused when a == 0 (all codes 0)
    for (int64_t i = begin + tid; i < end; i += blockDim.x) {
      q[i] = a == 0.0f ? uint8_t{0}
                       : static_cast<uint8_t>(code8_for_grid(
                             lut_grid_value(lut_bin(to_f32<DT>(x[i]) * inv)), s_mid8));
    }
  }
}

// ----------------------------------------------------------------------------
// dequantize_4bit. Launch: 256 threads, each decoding one 16-byte chunk of packed
// bytes (32 values, one coalesced 16-byte load) with one absmax (a chunk never
// spans quant blocks) and storing 4 (16-bit out) or 8 (fp32 out) 16-byte words.
// The 16-entry table is in smem (per-element lookups diverge); with double
// quantization the 256-entry nested code is staged there too and the block's
// absmax is decoded in place. Grid-strides over chunks. vec: packed and out
// 16-byte aligned; partial chunks take the per-byte path.
template <int DT, int QT, bool NESTED>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize4_kernel(const uint8_t* __restrict__ packed, const void* __restrict__ absmax,
                       int64_t n, int log2_bs, bool vec, ET<DT>* __restrict__ out,
                       const float* __restrict__ nested_absmax,
                       const float* __restrict__ nested_code, const float* __restrict__ offset,
                       int64_t nested_bs) {
  __shared__ float s_tab[kNumCodes4];
  __shared__ float s_ncode[NESTED ? kNumCodes8 : 1];
  const float* c_tab = QT == kNF4 ? c_nf4 : c_fp4;
  if (threadIdx.x < kNumCodes4) s_tab[threadIdx.x] = c_tab[threadIdx.x];
  float off = 0.0f;
  if constexpr (NESTED) {
    for (int k = static_cast<int>(threadIdx.x); k < kNumCodes8; k += static_cast<int>(blockDim.x)) {
      s_ncode[k] = nested_code[k];
    }
    off = *offset;
  }
  __syncthreads();

  const int64_t nchunks = n / kDequant4Elems + (n % kDequant4Elems != 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < nchunks;
       c += stride) {
    const int64_t e0 = c * kDequant4Elems;
    const int64_t blk = e0 >> log2_bs;
    float am;
    if constexpr (NESTED) {
      am = nested_absmax_value(static_cast<const uint8_t*>(absmax)[blk], s_ncode,
                               nested_absmax[blk / nested_bs], off);
    } else {
      am = static_cast<const float*>(absmax)[blk];
    }
    if (vec && e0 + kDequant4Elems <= n) {
      const uint4 w = *reinterpret_cast<const uint4*>(packed + c * (kDequant4Elems / 2));
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        float v[8];
#pragma unroll
        for (int b = 0; b < 4; ++b) {  // byte b of the word: its high nibble comes first
          v[2 * b] = s_tab[(words[k] >> (8 * b + 4)) & 15u] * am;
          v[2 * b + 1] = s_tab[(words[k] >> (8 * b)) & 15u] * am;
        }
        store8<DT>(out, e0 + 8 * k, v);
      }
    } else {
      const uint8_t* src = packed + c * (kDequant4Elems / 2);
#pragma unroll
      for (int b = 0; b < kDequant4Elems / 2; ++b) {
        const int64_t i = e0 + 2 * b;
        if (i < n) {
          const uint8_t byte = src[b];
          store1<DT>(out, i, s_tab[byte >> 4] * am);
          if (i + 1 < n) store1<DT>(out, i + 1, s_tab[byte & 15] * am);
        }
      }
    }
  }
}

// dequantize_blockwise (8-bit). Launch: 256 threads, each decoding one 16-byte
// chunk of codes (16 values, one absmax) through the 256-entry code staged in
// smem, storing 2 (16-bit out) or 4 (fp32 out) 16-byte words. vec: q and out
// 16-byte aligned.
template <int DT>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize8_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                       const float* __restrict__ code, int64_t n, int log2_bs, bool vec,
                       ET<DT>* __restrict__ out) {
  __shared__ float s_code[kNumCodes8];
  for (int k = static_cast<int>(threadIdx.x); k < kNumCodes8; k += static_cast<int>(blockDim.x)) {
    s_code[k] = code[k];
  }
  __syncthreads();

  const int64_t nchunks = n / kDequant8Elems + (n % kDequant8Elems != 0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < nchunks;
       c += stride) {
    const int64_t e0 = c * kDequant8Elems;
    const float am = absmax[e0 >> log2_bs];
    if (vec && e0 + kDequant8Elems <= n) {
      const uint4 w = *reinterpret_cast<const uint4*>(q + e0);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        float v[8];
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          v[b] = s_code[(words[2 * k] >> (8 * b)) & 255u] * am;
          v[4 + b] = s_code[(words[2 * k + 1] >> (8 * b)) & 255u] * am;
        }
        store8<DT>(out, e0 + 8 * k, v);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kDequant8Elems; ++j) {
        if (e0 + j < n) store1<DT>(out, e0 + j, s_code[q[e0 + j]] * am);
      }
    }
  }
}

// dequantize_blockwise at the blocksizes quantize8_any_kernel serves: one element
// per thread, grid-strided, its absmax found by a division.
template <int DT>
__global__ void __launch_bounds__(kDequantThreads)
    dequantize8_any_kernel(const uint8_t* __restrict__ q, const float* __restrict__ absmax,
                           const float* __restrict__ code, int64_t n, int64_t blocksize,
                           ET<DT>* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    store1<DT>(out, i, code[q[i]] * absmax[i / blocksize]);
  }
}

}  // namespace

// ----------------------------------------------------------------------------

void quantize_4bit(std::uintptr_t x, int x_dtype, std::int64_t n, std::int64_t blocksize,
                   int quant_type, std::uintptr_t packed, std::int64_t packed_len,
                   std::uintptr_t absmax, std::int64_t absmax_len, std::uintptr_t stream) {
  const char* fn = "quantize_4bit";
  host::check_nonneg(fn, "n", n);
  const int log2_bs = host::log2_blocksize(fn, blocksize);
  host::check_dtype(fn, "x_dtype", x_dtype);
  host::check_quant_type(fn, quant_type);
  host::check_len(fn, "packed", packed_len, host::packed4_len(n));
  host::check_len(fn, "absmax", absmax_len, ceil_div(n, blocksize));
  if (n == 0) return;
  host::check_ptr(fn, "x", x);
  host::check_ptr(fn, "packed", packed);
  host::check_ptr(fn, "absmax", absmax);

  const int threads = static_cast<int>(blocksize / kQuantElems) > kQuantThreads
                          ? static_cast<int>(blocksize / kQuantElems)
                          : kQuantThreads;
  const unsigned grid = grid_for(n, int64_t{threads} * kQuantElems);
  const bool vec = aligned(x, 16) && aligned(packed, 4);
  with_dtype(x_dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    auto* xp = reinterpret_cast<const ET<DT>*>(x);
    auto* pp = reinterpret_cast<uint8_t*>(packed);
    auto* ap = reinterpret_cast<float*>(absmax);
    if (quant_type == kNF4) {
      launch("quantize_4bit", quantize4_kernel<DT, kNF4>, grid, threads, 0, as_stream(stream), xp,
             n, log2_bs, vec, pp, ap);
    } else {
      launch("quantize_4bit", quantize4_kernel<DT, kFP4>, grid, threads, 0, as_stream(stream), xp,
             n, log2_bs, vec, pp, ap);
    }
  });
}

void dequantize_4bit(std::uintptr_t packed, std::int64_t packed_len, std::uintptr_t absmax,
                     std::int64_t absmax_len, std::int64_t n, std::int64_t blocksize,
                     int quant_type, std::uintptr_t out, int out_dtype,
                     std::uintptr_t nested_absmax, std::int64_t nested_absmax_len,
                     std::uintptr_t nested_code, std::uintptr_t offset,
                     std::int64_t nested_blocksize, std::uintptr_t stream) {
  const char* fn = "dequantize_4bit";
  host::check_nonneg(fn, "n", n);
  const int log2_bs = host::log2_blocksize(fn, blocksize);
  host::check_quant_type(fn, quant_type);
  host::check_dtype(fn, "out_dtype", out_dtype);
  host::check_len(fn, "packed", packed_len, host::packed4_len(n));
  const int64_t nblocks = ceil_div(n, blocksize);
  host::check_len(fn, "absmax", absmax_len, nblocks);
  const bool nested = nested_absmax != 0;
  if (nested) {
    host::check_positive(fn, "nested_blocksize", nested_blocksize);
    host::check_len(fn, "nested_absmax", nested_absmax_len, ceil_div(nblocks, nested_blocksize));
    host::check_ptr(fn, "nested_code", nested_code);
    host::check_ptr(fn, "offset", offset);
  }
  if (n == 0) return;
  host::check_ptr(fn, "packed", packed);
  host::check_ptr(fn, "absmax", absmax);
  host::check_ptr(fn, "out", out);

  const unsigned grid = grid_for(ceil_div(n, kDequant4Elems), kDequantThreads);
  const bool vec = aligned(packed, 16) && aligned(out, 16);
  with_dtype(out_dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    auto* pp = reinterpret_cast<const uint8_t*>(packed);
    auto* ap = reinterpret_cast<const void*>(absmax);
    auto* op = reinterpret_cast<ET<DT>*>(out);
    auto* na = reinterpret_cast<const float*>(nested_absmax);
    auto* nc = reinterpret_cast<const float*>(nested_code);
    auto* of = reinterpret_cast<const float*>(offset);
    const cudaStream_t s = as_stream(stream);
    if (quant_type == kNF4) {
      if (nested) {
        launch("dequantize_4bit", dequantize4_kernel<DT, kNF4, true>, grid, kDequantThreads, 0, s,
               pp, ap, n, log2_bs, vec, op, na, nc, of, nested_blocksize);
      } else {
        launch("dequantize_4bit", dequantize4_kernel<DT, kNF4, false>, grid, kDequantThreads, 0, s,
               pp, ap, n, log2_bs, vec, op, na, nc, of, nested_blocksize);
      }
    } else {
      if (nested) {
        launch("dequantize_4bit", dequantize4_kernel<DT, kFP4, true>, grid, kDequantThreads, 0, s,
               pp, ap, n, log2_bs, vec, op, na, nc, of, nested_blocksize);
      } else {
        launch("dequantize_4bit", dequantize4_kernel<DT, kFP4, false>, grid, kDequantThreads, 0, s,
               pp, ap, n, log2_bs, vec, op, na, nc, of, nested_blocksize);
      }
    }
  });
}

void quantize_blockwise(std::uintptr_t x, int x_dtype, std::int64_t n, std::int64_t blocksize,
                        std::uintptr_t code, std::uintptr_t q, std::int64_t q_len,
                        std::uintptr_t absmax, std::int64_t absmax_len, std::uintptr_t stream) {
  const char* fn = "quantize_blockwise";
  host::check_nonneg(fn, "n", n);
  const int log2_bs = host::log2_blocksize8(fn, blocksize);
  host::check_dtype(fn, "x_dtype", x_dtype);
  host::check_len(fn, "q", q_len, n);
  host::check_len(fn, "absmax", absmax_len, ceil_div(n, blocksize));
  if (n == 0) return;
  host::check_ptr(fn, "x", x);
  host::check_ptr(fn, "code", code);
  host::check_ptr(fn, "q", q);
  host::check_ptr(fn, "absmax", absmax);

  if (log2_bs < 0) {
    with_dtype(x_dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      launch("quantize_blockwise", quantize8_any_kernel<DT>, grid_for(ceil_div(n, blocksize), 1),
             kQuantThreads, 0, as_stream(stream), reinterpret_cast<const ET<DT>*>(x), n, blocksize,
             reinterpret_cast<const float*>(code), reinterpret_cast<uint8_t*>(q),
             reinterpret_cast<float*>(absmax));
    });
    return;
  }
  const int threads = static_cast<int>(blocksize / kQuantElems) > kQuantThreads
                          ? static_cast<int>(blocksize / kQuantElems)
                          : kQuantThreads;
  const unsigned grid = grid_for(n, int64_t{threads} * kQuantElems);
  const bool vec = aligned(x, 16) && aligned(q, 8);
  with_dtype(x_dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    launch("quantize_blockwise", quantize8_kernel<DT>, grid, threads, 0, as_stream(stream),
           reinterpret_cast<const ET<DT>*>(x), n, log2_bs, vec,
           reinterpret_cast<const float*>(code), reinterpret_cast<uint8_t*>(q),
           reinterpret_cast<float*>(absmax));
  });
}

void dequantize_blockwise(std::uintptr_t q, std::int64_t q_len, std::uintptr_t absmax,
                          std::int64_t absmax_len, std::uintptr_t code, std::int64_t n,
                          std::int64_t blocksize, std::uintptr_t out, int out_dtype,
                          std::uintptr_t stream) {
  const char* fn = "dequantize_blockwise";
  host::check_nonneg(fn, "n", n);
  const int log2_bs = host::log2_blocksize8(fn, blocksize);
  host::check_dtype(fn, "out_dtype", out_dtype);
  host::check_len(fn, "q", q_len, n);
  host::check_len(fn, "absmax", absmax_len, ceil_div(n, blocksize));
  if (n == 0) return;
  host::check_ptr(fn, "q", q);
  host::check_ptr(fn, "absmax", absmax);
  host::check_ptr(fn, "code", code);
  host::check_ptr(fn, "out", out);

  if (log2_bs < 0) {
    with_dtype(out_dtype, [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      launch("dequantize_blockwise", dequantize8_any_kernel<DT>, grid_for(n, kDequantThreads),
             kDequantThreads, 0, as_stream(stream), reinterpret_cast<const uint8_t*>(q),
             reinterpret_cast<const float*>(absmax), reinterpret_cast<const float*>(code), n,
             blocksize, reinterpret_cast<ET<DT>*>(out));
    });
    return;
  }
  const unsigned grid = grid_for(ceil_div(n, kDequant8Elems), kDequantThreads);
  const bool vec = aligned(q, 16) && aligned(out, 16);
  with_dtype(out_dtype, [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    launch("dequantize_blockwise", dequantize8_kernel<DT>, grid, kDequantThreads, 0,
           as_stream(stream), reinterpret_cast<const uint8_t*>(q),
           reinterpret_cast<const float*>(absmax), reinterpret_cast<const float*>(code), n, log2_bs,
           vec, reinterpret_cast<ET<DT>*>(out));
  });
}

}  // namespace cuda
}  // namespace qpeft
