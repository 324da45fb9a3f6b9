// Fused 4-bit dequant + LoRA GEMM on the CUDA cores (SIMT): the peer of the tensor-core
// kernel (csrc/cuda/qlora_gemm.cu) for what mma.sync does not take, so that
// qpeft::qlora_linear and its backward never materialise W on the CUDA backends
// (docs/design.md, "CUDA C++ QLoRA GEMM"): fp32 activations (IEEE fp32 FMAs, fp32
// accumulation: the contract of Triton's input_precision="ieee"), fp64 (W decoded in fp32,
// widened exactly, fp64 FMAs: the gradcheck path), and fp16/bf16 on GPUs below sm_80
// (loaded and widened exactly to fp32, fp32 FMAs). Same math and arguments as qlora_gemm.cu
// (csrc/cuda/ops.h):
//
//   forward  y  = out_scale * ((x @ W^T + t @ B^T) + bias),  t = (x @ A^T) * s * rank_scale
//   backward dx = dy' @ W + t @ A,                         t = (dy' @ B) * s * rank_scale
//                                                          (dy' = dy * out_scale, by the caller)
//
// Two launches of one kernel template, "out[M, O] = act[M, R] @ op(S)":
//  1. the LoRA down-projection (DOWN): L[M, r] = act @ op(D), D = A (forward: L = xa) or
//     B (dx: L = g), written in the compute dtype C (fp32; fp64 for fp64) to the caller's
//     buffer, and xa rounded to x's dtype when asked for;
//  2. the main pass: acc = act @ op(W) with W decoded tile by tile into shared memory, then
//     (r > 0) lacc = t @ op(U) with t = L[m, j] * s * rank_scale[j] formed as its tiles are
//     staged and U = B (forward) or A (dx); out = (acc + lacc) (+ bias) (* out_scale),
//     rounded once to the output dtype.
// Separate accumulators for the base and the LoRA sums keep the reference's rounding
// structure (qpeft/backends/default/qlora.py: x @ W^T, t @ B^T, their sum, + bias): a base
// term passes through at most R + 2 roundings (R FMAs, the two adds) and a LoRA term through
// t's R + 2 (L, * s, * rank_scale) and r + 2 more, which is what the fp64 oracle's bounds
// count (qpeft/testing.py, the comment above U_OP: K + 2 and K + r + 4). L is
// computed once per row by its own launch instead of per output tile as the tensor-core
// kernel does (there the recomputation rides on spare MMA throughput; here it would add
// r / 64 of the main pass's FMAs, a tile being 64 columns wide: 4x at r = 256).
//
// Orientation: op(S)[red, o] is S[o, red] in the forward (W [N, K], A [r, K], B [N, r]
// all indexed [o, red]) and S[red, o] in dx (W [N, K], B [N, r], A [r, K] indexed [red, o]).
//
// Tiles: 256 threads compute a 64 x 64 tile of out, each a 4 x 4 register block (rows
// 4 ty.., columns 4 tx..); the reduction runs in chunks of 32 through one shared stage per
// operand, [32][64] in C, reduction-major, so a thread reads its 4 rows and 4 columns of a
// step with two 16-byte loads (the 4 rows are the same for the 16 threads of a half-warp:
// a broadcast). Each chunk the 256 threads fetch 8 consecutive elements each of the
// activation tile (row m0 + t % 64, columns 8 (t / 64)..) and of the W tile: 4 packed bytes
// = 8 weights of one W row in one quant block, fetched with one 4-byte load, then decoded
// through a 256-entry shared table (byte -> the code values of its two nibbles, high nibble
// first) times the block's absmax in fp32: the weights equal dequantize_4bit's fp32 values.
// The next chunk's global loads are issued before the current chunk's FMAs and land in
// registers (raw: decoded and widened only when stored to shared memory after them), so
// their latency hides behind 512 FMAs per thread. Transposed tiles (the activations,
// forward W/A/B) are stored as [red][row] by threads of consecutive rows: conflict-free.
//
// Edges: rows and columns past M, O, R and r are zero; the 4-byte W path needs K % 8 == 0
// (a run of 8 weights then starts 8-aligned: in one row and in one quant block, blocksize
// >= 32 being a power of two) and a 4-byte aligned packed buffer, the vector activation /
// LoRA paths a row length % 8 == 0 and 16-byte aligned bases; anything else takes the
// per-element paths (slow, correct). Indices are 64-bit; quant block indices 32-bit (the
// host refuses >= 2^31 blocks).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "kernel_common.h"
#include "launch.h"
#include "ops.h"
#include "qlora_common.h"
#include "qpeft/format.h"

namespace qpeft {
namespace cuda {
namespace {

__constant__ float c_simt_nf4[kNumCodes4] = {QPEFT_NF4_VALUES};
__constant__ float c_simt_fp4[kNumCodes4] = {QPEFT_FP4_VALUES};

constexpr int kThreads = 256;
constexpr int kBM = 64;  // rows of out per block
constexpr int kBO = 64;  // columns of out per block
constexpr int kBK = 32;  // reduction chunk
constexpr int kTM = 4;   // rows per thread
constexpr int kTO = 4;   // columns per thread
static_assert((kBM / kTM) * (kBO / kTO) == kThreads, "one register block per thread");
constexpr int kDecodePerThread = 8;  // weights each thread decodes per chunk (sass_report.py)
static_assert(kBM * kBK == kThreads * kDecodePerThread && kBO * kBK == kThreads * kDecodePerThread,
              "8 elements of each tile per thread");

// The element type T in memory and the compute type C.
template <int DT>
struct SimtType {
  using T = uint16_t;  // fp16 / bf16 bits
  using C = float;
};
template <>
struct SimtType<kF32> {
  using T = float;
  using C = float;
};
template <>
struct SimtType<kQloraF64> {
  using T = double;
  using C = double;
};

__device__ __forceinline__ float fma_c(float a, float b, float c) {
  return fmaf(a, b, c);
}
__device__ __forceinline__ double fma_c(double a, double b, double c) {
  return fma(a, b, c);
}

// 8 consecutive elements as loaded (16-bit types: packed in 4 words; converted when stored).
template <int DT>
struct Raw8 {
  uint32_t w[4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = 0;
  }
  __device__ __forceinline__ void load_vec(const uint16_t* src) {
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
  __device__ __forceinline__ void set(int j, uint16_t v) {
    w[j >> 1] |= static_cast<uint32_t>(v) << (16 * (j & 1));
  }
  __device__ __forceinline__ float get(int j) const {
    return to_f32<DT>(static_cast<uint16_t>(w[j >> 1] >> (16 * (j & 1))));
  }
};
template <>
struct Raw8<kF32> {
  float v[8];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.0f;
  }
  __device__ __forceinline__ void load_vec(const float* src) {
    const float4 a = reinterpret_cast<const float4*>(src)[0];
    const float4 b = reinterpret_cast<const float4*>(src)[1];
    v[0] = a.x;
    v[1] = a.y;
    v[2] = a.z;
    v[3] = a.w;
    v[4] = b.x;
    v[5] = b.y;
    v[6] = b.z;
    v[7] = b.w;
  }
  __device__ __forceinline__ void set(int j, float x) { v[j] = x; }
  __device__ __forceinline__ float get(int j) const { return v[j]; }
};
template <>
struct Raw8<kQloraF64> {
  double v[8];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = 0.0;
  }
  __device__ __forceinline__ void load_vec(const double* src) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const double2 a = reinterpret_cast<const double2*>(src)[i];
      v[2 * i] = a.x;
      v[2 * i + 1] = a.y;
    }
  }
  __device__ __forceinline__ void set(int j, double x) { v[j] = x; }
  __device__ __forceinline__ double get(int j) const { return v[j]; }
};

template <int DT>
struct SimtParams {
  using T = typename SimtType<DT>::T;
  using C = typename SimtType<DT>::C;
  const T* act;  // [M, R]
  const uint8_t* packed;
  const void* absmax;
  const float* nested_absmax;  // null: absmax is fp32
  const float* nested_code;
  const float* offset;
  const T* dense;         // DOWN: D (forward A [r, K], dx B [N, r]); main: U (B / A)
  C* lbuf;                // [M, r]: DOWN writes L, the main pass reads it
  T* side;                // DOWN, forward: xa [M, r] in x's dtype, or null
  const C* rank_scale;    // [r] or null
  const C* bias;          // [N] or null (forward)
  const C* out_scale;     // [N] or null (forward)
  T* out;                 // main: [M, O]
  int64_t m, red, ocols;  // act [m, red] -> out [m, ocols] (DOWN: ocols = r)
  int64_t n, k, r;        // W [n, k], LoRA rank
  C scaling;
  FastDivU32 nested_bs;
  int log2_bs;
  int quant_type;
  bool act_vec, w_vec, dense_vec, l_vec;
};

// Thread t's 8-element piece of a 64 x 32 tile of a row-major [rows, cols] matrix stored
// transposed (smem[col][row]: activations, L, forward W/A/B), or of a 32 x 64 tile stored
// as is (smem[row][col]: dx W/B/A). (gr, gc): its first element; (sr, sc): where it goes.
struct Piece {
  int64_t gr, gc;
  int sr, sc;
};
__device__ __forceinline__ Piece piece_transposed(int64_t row0, int64_t col0) {
  const int t = static_cast<int>(threadIdx.x);
  return Piece{row0 + (t % kBM), col0 + (t / kBM) * 8, t % kBM, (t / kBM) * 8};
}
__device__ __forceinline__ Piece piece_direct(int64_t row0, int64_t col0) {
  const int t = static_cast<int>(threadIdx.x);
  return Piece{row0 + t / 8, col0 + (t % 8) * 8, t / 8, (t % 8) * 8};
}

// Loads src[gr, gc..gc+8) (zero outside [rows, cols]); vec: ld % 8 == 0 and a 16-byte
// aligned base, so the 8 elements are one aligned run inside the row or wholly outside.
template <int DT, typename T>
__device__ __forceinline__ void load_piece(Raw8<DT>& raw, const T* src, int64_t ld, int64_t rows,
                                           int64_t cols, const Piece& pc, bool vec) {
  raw.zero();
  if (pc.gr >= rows || pc.gc >= cols) return;
  const T* p = src + pc.gr * ld + pc.gc;
  if (vec) {
    raw.load_vec(p);
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (pc.gc + j < cols) raw.set(j, p[j]);
    }
  }
}

// 8 weights W[wn, wk..wk+8) as raw material for decode_w: the packed word and the block's
// absmax (vector path), or the decoded values (per-element path: the slow path decodes
// at once).
struct WRaw {
  uint32_t word;
  float am;
  float v[8];
};

template <int DT>
__device__ __forceinline__ void load_w(WRaw& w, const SimtParams<DT>& p, int64_t wn, int64_t wk,
                                       const float2* s_tab, const float* s_ncode) {
  w.word = 0;
  w.am = 0.0f;
  if (p.w_vec) {
    if (wn < p.n && wk < p.k) {  // K % 8 == 0: all 8 inside the row and one quant block
      const int64_t e = wn * p.k + wk;
      w.word = *reinterpret_cast<const uint32_t*>(p.packed + (e >> 1));
      w.am = qlora_absmax(p.absmax, p.nested_absmax, p.nested_bs,
                          static_cast<uint32_t>(e >> p.log2_bs), s_ncode);
    }
    return;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    float v = 0.0f;
    if (wn < p.n && wk + j < p.k) {
      const int64_t e = wn * p.k + wk + j;
      const float2 cv = s_tab[p.packed[e >> 1]];
      const float a = qlora_absmax(p.absmax, p.nested_absmax, p.nested_bs,
                                   static_cast<uint32_t>(e >> p.log2_bs), s_ncode);
      v = ((e & 1) ? cv.y : cv.x) * a;
    }
    w.v[j] = v;
  }
}

// The 8 decoded weights, fp32 (code value * absmax: dequantize_4bit's values exactly).
__device__ __forceinline__ float w_value(const WRaw& w, bool vec, const float2* s_tab, int j) {
  if (!vec) return w.v[j];
  const float2 c = s_tab[(w.word >> (8 * (j >> 1))) & 0xffu];
  return ((j & 1) ? c.y : c.x) * w.am;
}

// Stores 8 values at smem[(sr, sc + j)] of a [kBK][64] tile: transposed (element j of the
// piece is reduction index sc + j, row sr) or direct (reduction index sr, column sc + j).
template <bool TRANSPOSED, typename C, typename F>
__device__ __forceinline__ void store_piece(C* smem, const Piece& pc, F value) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if constexpr (TRANSPOSED) {
      smem[(pc.sc + j) * kBM + pc.sr] = value(j);
    } else {
      smem[pc.sr * kBO + pc.sc + j] = value(j);
    }
  }
}

// Four consecutive C values of a shared row (16-byte aligned).
__device__ __forceinline__ void lds4(const float* s, float (&v)[4]) {
  const float4 a = *reinterpret_cast<const float4*>(s);
  v[0] = a.x;
  v[1] = a.y;
  v[2] = a.z;
  v[3] = a.w;
}
__device__ __forceinline__ void lds4(const double* s, double (&v)[4]) {
  const double2 a = reinterpret_cast<const double2*>(s)[0];
  const double2 b = reinterpret_cast<const double2*>(s)[1];
  v[0] = a.x;
  v[1] = a.y;
  v[2] = b.x;
  v[3] = b.y;
}

// acc += the chunk's [64 x 32] @ [32 x 64] product from shared memory.
template <typename C>
__device__ __forceinline__ void fma_chunk(const C* s_a, const C* s_b, int ty, int tx,
                                          C (&acc)[kTM][kTO]) {
#pragma unroll
  for (int kk = 0; kk < kBK; ++kk) {
    C a[kTM], b[kTO];
    lds4(s_a + kk * kBM + ty * kTM, a);
    lds4(s_b + kk * kBO + tx * kTO, b);
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTO; ++j) acc[i][j] = fma_c(a[i], b[j], acc[i][j]);
  }
}

template <int DT>
struct SimtSmem {
  using C = typename SimtType<DT>::C;
  static constexpr int kA = kBK * kBM * static_cast<int>(sizeof(C));
  static constexpr int kB = kBK * kBO * static_cast<int>(sizeof(C));
  static constexpr int kTable = 256 * 8;                // byte -> two code values (fp32)
  static constexpr int kNested = (kNumCodes8 + 4) * 4;  // nested code values, offset
  static constexpr int kTotal = kA + kB + kTable + kNested;
  static_assert(kTotal <= 48 * 1024, "static dynamic-shared-memory budget (no opt-in)");
  static_assert(kA % 16 == 0 && kB % 16 == 0, "16-byte aligned regions");
};

// Occupancy hint for ptxas: 0 (none) except where its own choice spills. The fp32 dx main
// pass on sm_120 was held to 80 registers (3 CTAs of 256 threads) and spilled 8 bytes;
// there it may use up to 128 (2 CTAs): 109 registers, no spill. Every other instantiation
// and architecture keeps ptxas' choice (70-80 registers, fp64 124-132, none spilling).
#if defined(__CUDA_ARCH__)
constexpr int kSimtArch = __CUDA_ARCH__;
#else
constexpr int kSimtArch = 0;
#endif
template <int DT, bool DX, bool DOWN>
constexpr int kSimtMinBlocks = (DT == kF32 && DX && !DOWN && kSimtArch >= 1200) ? 2 : 0;

// DOWN: L = act @ op(D) (and xa); else out = act @ op(W) (+ t @ op(U)) epilogue.
template <int DT, bool DX, bool DOWN>
__global__ void __launch_bounds__(kThreads, kSimtMinBlocks<DT, DX, DOWN>)
    qlora_simt_kernel(SimtParams<DT> p) {
  using C = typename SimtType<DT>::C;
  using S = SimtSmem<DT>;
  unsigned char* smem = dynamic_smem<unsigned char>();
  C* s_a = reinterpret_cast<C*>(smem);
  C* s_b = reinterpret_cast<C*>(smem + S::kA);
  float2* s_tab = reinterpret_cast<float2*>(smem + S::kA + S::kB);
  float* s_ncode = reinterpret_cast<float*>(smem + S::kA + S::kB + S::kTable);

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % (kBO / kTO);
  const int ty = tid / (kBO / kTO);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kBO;

  if constexpr (!DOWN) {  // byte -> (code[high nibble], code[low nibble]); nested code, offset
    const bool nf4 = p.quant_type == kNF4;
    for (int b = tid; b < 256; b += kThreads) {
      s_tab[b] = nf4 ? make_float2(c_simt_nf4[b >> 4], c_simt_nf4[b & 15])
                     : make_float2(c_simt_fp4[b >> 4], c_simt_fp4[b & 15]);
    }
    if (p.nested_absmax != nullptr) {
      for (int i = tid; i < kNumCodes8; i += kThreads) s_ncode[i] = p.nested_code[i];
      if (tid == 0) s_ncode[kNumCodes8] = *p.offset;
    }
    __syncthreads();
  }

  // Phase 1: act @ op(W) (main) or act @ op(D) (DOWN).
  C acc[kTM][kTO];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int j = 0; j < kTO; ++j) acc[i][j] = C(0);

  const int64_t nchunks = (p.red + kBK - 1) / kBK;
  {
    Raw8<DT> ra;                   // the activation piece in flight
    [[maybe_unused]] Raw8<DT> rb;  // DOWN: the D piece in flight
    [[maybe_unused]] WRaw rw;      // main: the W piece in flight
    auto fetch = [&](int64_t c) {
      const int64_t red0 = c * kBK;
      load_piece<DT>(ra, p.act, p.red, p.m, p.red, piece_transposed(m0, red0), p.act_vec);
      if constexpr (DOWN) {
        if constexpr (DX) {  // B [N, r]: rows red0.., columns o0..
          load_piece<DT>(rb, p.dense, p.r, p.red, p.r, piece_direct(red0, o0), p.dense_vec);
        } else {  // A [r, K]: rows o0.., columns red0..
          load_piece<DT>(rb, p.dense, p.k, p.r, p.red, piece_transposed(o0, red0), p.dense_vec);
        }
      } else {
        const Piece pc = DX ? piece_direct(red0, o0) : piece_transposed(o0, red0);
        load_w<DT>(rw, p, pc.gr, pc.gc, s_tab, s_ncode);
      }
    };
    if (nchunks > 0) fetch(0);
#pragma unroll 1
    for (int64_t c = 0; c < nchunks; ++c) {
      __syncthreads();  // every thread is done reading the previous chunk
      const int64_t red0 = c * kBK;
      store_piece<true>(s_a, piece_transposed(m0, red0), [&](int j) { return C(ra.get(j)); });
      if constexpr (DOWN) {
        if constexpr (DX) {
          store_piece<false>(s_b, piece_direct(red0, o0), [&](int j) { return C(rb.get(j)); });
        } else {
          store_piece<true>(s_b, piece_transposed(o0, red0), [&](int j) { return C(rb.get(j)); });
        }
      } else {
        const bool wv = p.w_vec;
        auto wval = [&](int j) { return C(w_value(rw, wv, s_tab, j)); };
        if constexpr (DX) {
          store_piece<false>(s_b, piece_direct(red0, o0), wval);
        } else {
          store_piece<true>(s_b, piece_transposed(o0, red0), wval);
        }
      }
      __syncthreads();
      if (c + 1 < nchunks) fetch(c + 1);  // lands while the FMAs below run
      fma_chunk<C>(s_a, s_b, ty, tx, acc);
    }
  }

  if constexpr (DOWN) {  // L in C; xa rounded to x's dtype when asked for
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const int64_t row = m0 + ty * kTM + i;
      if (row >= p.m) continue;
#pragma unroll
      for (int j = 0; j < kTO; ++j) {
        const int64_t col = o0 + tx * kTO + j;
        if (col >= p.r) continue;
        p.lbuf[row * p.r + col] = acc[i][j];
        if (p.side != nullptr) {
          if constexpr (DT == kF16 || DT == kBF16) {
            p.side[row * p.r + col] = static_cast<uint16_t>(pack2_16<DT>(acc[i][j], 0.0f));
          } else {
            p.side[row * p.r + col] = acc[i][j];
          }
        }
      }
    }
    return;
  } else {
    // Phase 2: lacc = t @ op(U), t = L * s * rank_scale (each product rounded in C, in the
    // reference's order), over the rank in chunks of 32.
    C lacc[kTM][kTO];
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTO; ++j) lacc[i][j] = C(0);
    const int64_t rchunks = (p.r + kBK - 1) / kBK;
    if (rchunks > 0) {
      Raw8<DT> ru;  // the U piece in flight
      C lv[8];      // the L piece in flight
      auto fetch = [&](int64_t c) {
        const int64_t j0 = c * kBK;
        const Piece pl = piece_transposed(m0, j0);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          lv[j] = (pl.gr < p.m && pl.gc + j < p.r) ? p.lbuf[pl.gr * p.r + pl.gc + j] : C(0);
        }
        if constexpr (DX) {  // A [r, K]: rows j0.., columns o0..
          load_piece<DT>(ru, p.dense, p.k, p.r, p.k, piece_direct(j0, o0), p.dense_vec);
        } else {  // B [N, r]: rows o0.., columns j0..
          load_piece<DT>(ru, p.dense, p.r, p.n, p.r, piece_transposed(o0, j0), p.dense_vec);
        }
      };
      fetch(0);
#pragma unroll 1
      for (int64_t c = 0; c < rchunks; ++c) {
        __syncthreads();
        const int64_t j0 = c * kBK;
        const Piece pl = piece_transposed(m0, j0);
        store_piece<true>(s_a, pl, [&](int j) {
          C t = lv[j] * p.scaling;
          if (p.rank_scale != nullptr && pl.gc + j < p.r) t = t * p.rank_scale[pl.gc + j];
          return t;
        });
        if constexpr (DX) {
          store_piece<false>(s_b, piece_direct(j0, o0), [&](int j) { return C(ru.get(j)); });
        } else {
          store_piece<true>(s_b, piece_transposed(o0, j0), [&](int j) { return C(ru.get(j)); });
        }
        __syncthreads();
        if (c + 1 < rchunks) fetch(c + 1);
        fma_chunk<C>(s_a, s_b, ty, tx, lacc);
      }
    }

    // Epilogue: (base + lora) + bias, * out_scale, rounded once.
#pragma unroll
    for (int j = 0; j < kTO; ++j) {
      const int64_t col = o0 + tx * kTO + j;
      if (col >= p.ocols) continue;
      const C b = p.bias != nullptr ? p.bias[col] : C(0);
      const C os = p.out_scale != nullptr ? p.out_scale[col] : C(1);
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
        const int64_t row = m0 + ty * kTM + i;
        if (row >= p.m) continue;
        C v = acc[i][j];
        if (p.r > 0) v = v + lacc[i][j];
        if (p.bias != nullptr) v = v + b;
        if (p.out_scale != nullptr) v = v * os;
        if constexpr (DT == kF16 || DT == kBF16) {
          p.out[row * p.ocols + col] = static_cast<uint16_t>(pack2_16<DT>(v, 0.0f));
        } else {
          p.out[row * p.ocols + col] = v;
        }
      }
    }
  }
}

// The checks and launches shared by the two entry points. act [m, red] -> out [m, ocols].
void run_simt(const char* fn, bool dx, std::uintptr_t act, int dtype, int64_t act_len, int64_t m,
              int64_t n, int64_t k, const QuantArgs& q, std::uintptr_t lora_a, int64_t lora_a_len,
              std::uintptr_t lora_b, int64_t lora_b_len, int64_t r, double scaling,
              std::uintptr_t rank_scale, int64_t rank_scale_len, std::uintptr_t bias,
              int64_t bias_len, std::uintptr_t out_scale, int64_t out_scale_len, std::uintptr_t out,
              int64_t out_len, std::uintptr_t side, int64_t side_len, std::uintptr_t lbuf,
              int64_t lbuf_len, std::uintptr_t stream) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16 && dtype != kQloraF64) {
    host::fail(fn,
               "takes float32 (0), float16 (1), bfloat16 (2) or float64 (3) activations, "
               "got dtype " +
                   std::to_string(dtype));
  }
  const QloraDims d = check_qlora_args(fn, dx, act_len, m, n, k, q, lora_a, lora_a_len, lora_b,
                                       lora_b_len, r, rank_scale, rank_scale_len, bias, bias_len,
                                       out_scale, out_scale_len, out_len, side, side_len);
  if (!(scaling - scaling == 0.0)) host::fail(fn, "scaling must be finite");
  if (dtype != kQloraF64) host::check_finite(fn, "scaling", static_cast<float>(scaling));
  if (r > 0) {
    host::check_len(fn, dx ? "g" : "lbuf", lbuf_len, host::checked_mul(fn, "m", m, "r", r));
  }
  if (ceil_div(d.ocols, kBO) > 65535 || ceil_div(r, kBO) > 65535) {
    host::fail(fn, "more than 65535 column tiles of 64");
  }
  if (ceil_div(m, kBM) >= (int64_t{1} << 31)) host::fail(fn, "more than 2^31 - 1 row tiles of 64");
  if (m == 0) return;
  check_qlora_ptrs(fn, dx, act, q, out);
  if (r > 0) host::check_ptr(fn, dx ? "g" : "lbuf", lbuf);

  auto go = [&](auto dt) {
    constexpr int DT = decltype(dt)::value;
    using T = typename SimtType<DT>::T;
    using C = typename SimtType<DT>::C;
    SimtParams<DT> p{};
    p.act = reinterpret_cast<const T*>(act);
    p.packed = reinterpret_cast<const uint8_t*>(q.packed);
    p.absmax = reinterpret_cast<const void*>(q.absmax);
    p.nested_absmax = reinterpret_cast<const float*>(q.nested_absmax);
    p.nested_code = reinterpret_cast<const float*>(q.nested_code);
    p.offset = reinterpret_cast<const float*>(q.offset);
    p.lbuf = reinterpret_cast<C*>(lbuf);
    p.side = r > 0 && !dx ? reinterpret_cast<T*>(side) : nullptr;
    p.rank_scale = r > 0 ? reinterpret_cast<const C*>(rank_scale) : nullptr;
    p.bias = dx ? nullptr : reinterpret_cast<const C*>(bias);
    p.out_scale = dx ? nullptr : reinterpret_cast<const C*>(out_scale);
    p.out = reinterpret_cast<T*>(out);
    p.m = m;
    p.red = d.red;
    p.ocols = d.ocols;
    p.n = n;
    p.k = k;
    p.r = r;
    p.scaling = static_cast<C>(scaling);
    p.nested_bs = d.nested_div;
    p.log2_bs = d.log2_bs;
    p.quant_type = q.quant_type;
    p.act_vec = d.red % 8 == 0 && aligned(act, 16);
    p.w_vec = k % 8 == 0 && aligned(q.packed, 4);
    const std::uintptr_t down = dx ? lora_b : lora_a;  // forward A [r, K]; dx B [N, r]
    const std::uintptr_t up = dx ? lora_a : lora_b;    // forward B [N, r]; dx A [r, K]
    const cudaStream_t s = as_stream(stream);
    const unsigned gm = static_cast<unsigned>(ceil_div(m, kBM));
    constexpr int smem = SimtSmem<DT>::kTotal;
    if (r > 0) {  // L (and xa) first: the main pass reads it
      SimtParams<DT> pd = p;
      pd.ocols = r;
      pd.out = nullptr;
      pd.dense = reinterpret_cast<const T*>(down);
      pd.dense_vec = (dx ? r % 8 == 0 : k % 8 == 0) && aligned(down, 16);
      auto kern = dx ? qlora_simt_kernel<DT, true, true> : qlora_simt_kernel<DT, false, true>;
      launch(fn, kern, dim3(gm, static_cast<unsigned>(ceil_div(r, kBO))), kThreads, smem, s, pd);
    }
    p.dense = r > 0 ? reinterpret_cast<const T*>(up) : nullptr;
    p.dense_vec = (dx ? k % 8 == 0 : r % 8 == 0) && aligned(up, 16);
    auto kern = dx ? qlora_simt_kernel<DT, true, false> : qlora_simt_kernel<DT, false, false>;
    launch(fn, kern, dim3(gm, static_cast<unsigned>(ceil_div(d.ocols, kBO))), kThreads, smem, s, p);
  };
  switch (dtype) {
    case kF32:
      go(std::integral_constant<int, kF32>{});
      break;
    case kF16:
      go(std::integral_constant<int, kF16>{});
      break;
    case kBF16:
      go(std::integral_constant<int, kBF16>{});
      break;
    default:
      go(std::integral_constant<int, kQloraF64>{});
      break;
  }
}

}  // namespace

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
                        std::uintptr_t lbuf, std::int64_t lbuf_len, std::uintptr_t stream) {
  const QuantArgs q{packed,      packed_len, absmax,          absmax_len,
                    blocksize,   quant_type, nested_absmax,   nested_absmax_len,
                    nested_code, offset,     nested_blocksize};
  run_simt("qlora_simt_forward", false, x, x_dtype, x_len, m, n, k, q, lora_a, lora_a_len, lora_b,
           lora_b_len, r, scaling, rank_scale, rank_scale_len, bias, bias_len, out_scale,
           out_scale_len, y, y_len, xa, xa_len, lbuf, lbuf_len, stream);
}

void qlora_simt_dx(std::uintptr_t dy, int dy_dtype, std::int64_t dy_len, std::int64_t m,
                   std::int64_t k, std::uintptr_t packed, std::int64_t packed_len,
                   std::uintptr_t absmax, std::int64_t absmax_len, std::int64_t n,
                   std::int64_t blocksize, int quant_type, std::uintptr_t nested_absmax,
                   std::int64_t nested_absmax_len, std::uintptr_t nested_code,
                   std::uintptr_t offset, std::int64_t nested_blocksize, std::uintptr_t lora_a,
                   std::int64_t lora_a_len, std::uintptr_t lora_b, std::int64_t lora_b_len,
                   std::int64_t r, double scaling, std::uintptr_t rank_scale,
                   std::int64_t rank_scale_len, std::uintptr_t dx, std::int64_t dx_len,
                   std::uintptr_t g, std::int64_t g_len, std::uintptr_t stream) {
  const QuantArgs q{packed,      packed_len, absmax,          absmax_len,
                    blocksize,   quant_type, nested_absmax,   nested_absmax_len,
                    nested_code, offset,     nested_blocksize};
  run_simt("qlora_simt_dx", true, dy, dy_dtype, dy_len, m, n, k, q, lora_a, lora_a_len, lora_b,
           lora_b_len, r, scaling, rank_scale, rank_scale_len, 0, 0, 0, 0, dx, dx_len, 0, 0, g,
           g_len, stream);
}

}  // namespace cuda
}  // namespace qpeft
