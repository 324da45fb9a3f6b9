// Fused 4-bit dequant + LoRA GEMM on tensor cores (qpeft::qlora_linear and dx of
// qpeft::qlora_linear_backward; docs/design.md, "CUDA C++ QLoRA GEMM"):
//
//   forward  y  = out_scale * (x @ W^T + bias + (s * (x @ A^T) * rank_scale) @ B^T)
//   backward dx = dy' @ W + (s * (dy' @ B) * rank_scale) @ A      (dy' = dy * out_scale,
//                                                                    formed by the caller)
//
// Both are one kernel template, "out[M, O] = act[M, R] @ op(W) (+ LoRA)", with the
// reduction extent R = K (forward) or N (dx) and O = N or K. W [N, K] is the
// bitsandbytes layout (format.h): packed codes of the flattened row-major W, two per
// byte (high nibble = lower index), one absmax per `blocksize` elements (fp32, or
// double-quantized: uint8 code, nested_absmax per nested_blocksize codes, offset).
//
// Tiles: a block of 128 threads (4 warps) computes a 64 x 128 tile of out; warp w owns
// the output columns 32w..32w+31 of all 64 rows (4 x 4 mma tiles of m16n8, 64 fp32
// accumulators), so every decoded weight is decoded once per block and read by one warp
// only. The reduction runs in chunks of 32 through a kStages-deep cp.async pipeline
// (16-byte copies, zero-filled past the edges through cp.async's src-size): per stage
// the activation tile [64 x 32], the packed W tile (2 KiB: 128 x 32 or 32 x 128
// weights) and the LoRA down-projection tile. Each chunk the 128 threads decode the W
// tile, 16 packed bytes (32 weights of one W row, in one quant block) each, into a
// shared [W row][W column] tile in the activation dtype; the warps then read it with
// ldmatrix (forward: W rows are mma's B columns, plain ldmatrix; dx: W rows are the
// reduction, ldmatrix.trans). The decode: one LDS.128 of packed bytes, then per byte a
// 256-entry shared table of fp32 pairs (byte -> its two code values, high nibble
// first), two fp32 multiplies by the block's absmax and one paired round to bf16/fp16:
// the weights equal dequantize_4bit's fp32 values rounded once to the activation dtype,
// as the Triton kernel computes them (not a paired 16-bit multiply, which would round
// the code, the absmax and their product).
//
// LoRA, fused as in triton_kernels/qlora.py: the down-projection L = act @ D (forward
// D = A^T: L = x @ A^T = xa; dx D = B: L = dy' @ B = g) is accumulated from the same
// activation fragments in the same loop; warp w computes rows 16w..16w+15 of L over
// the padded rank BR (16, 32 or 64). Epilogue: t = round(L * s * rank_scale) to the
// activation dtype in shared memory, then out += t @ U with U = B^T (forward) or A
// (dx) on the tensor cores, then + bias, * out_scale (forward; the caller applies
// out_scale to dy for dx), rounded once to the output dtype. The o-tile-0 blocks also
// write L: xa in the activation dtype (forward) or g in fp32 (dx), as the Triton
// kernels return them. Every o-tile recomputes L for its rows (r / 128 extra MMA work,
// no extra activation traffic). Ranks above 64 (BR = 64) run in rank chunks of 64: the
// main pass fuses ranks 0..63 as above; then per further chunk one pass over the
// reduction loads only the activation and D tiles (same pipeline, no W), accumulates
// that chunk's L in the same 32 registers and runs its epilogue (t @ U into the same
// out accumulators). Registers and shared memory stay those of BR = 64; the cost is
// one more read of the block's activation rows (L2-resident) per 64 ranks.
//
// Split reduction (small M): with split > 1 the grid's z dimension splits the chunks;
// each block writes fp32 partials (out and L) to a workspace and two reduce kernels sum
// them in a fixed order (z = 0, 1, ...: deterministic) and run the epilogue in fp32
// (t @ U as a scalar fp32 dot per output; a product of two 16-bit values is exact in
// fp32, so only the summation order differs from the MMA's). The caller picks split.
//
// Edges: rows and columns past M, O, R and the rank are zero-filled; decoded weights
// outside W are 0 (their absmax is taken as 0). The 16-byte paths need their operand's
// row length to be a multiple of 8 elements (W: K % 32 == 0, so that 16 packed bytes
// are one row's 32 weights of one quant block, blocksize >= 32 being a power of two)
// and 16-byte aligned base pointers; otherwise that operand takes a synchronous
// per-element path (slow, correct; W then decodes each element from global memory).
// Indices are 64-bit; quant block indices are 32-bit (the host refuses >= 2^31 blocks).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "kernel_common.h"
#include "launch.h"
#include "ops.h"
#include "ptx.h"
#include "qlora_common.h"
#include "qpeft/format.h"

namespace qpeft {
namespace cuda {
namespace {

// The device code needs sm_80 (mma.m16n8k16 in bf16, cp.async): the sm_75 pass of the
// default build compiles only the kernel's trap (below), and none of these helpers, which
// it would warn about as unused (warnings are errors).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define QPEFT_QLORA_MMA 1
#else
#define QPEFT_QLORA_MMA 0
#endif

#if QPEFT_QLORA_MMA
__constant__ float c_nf4_q[kNumCodes4] = {QPEFT_NF4_VALUES};
__constant__ float c_fp4_q[kNumCodes4] = {QPEFT_FP4_VALUES};

#endif  // QPEFT_QLORA_MMA

constexpr int kThreads = 128;
constexpr int kBM = 64;   // rows of out per block
constexpr int kBO = 128;  // columns of out per block (32 per warp)
constexpr int kBK = 32;   // reduction chunk per pipeline stage
constexpr int kPad = 8;   // 16-bit elements of padding per shared row: ldmatrix conflict-free
constexpr int kActLd = kBK + kPad;           // activation tile [64][40]
constexpr int kPackedBytes = kBO * kBK / 2;  // 2048 bytes of packed W per stage
static_assert(kPackedBytes == kThreads * 16, "one 16-byte chunk of packed W per thread");
constexpr int kDecodePerThread = 32;  // weights each thread decodes per chunk (sass_report.py)
static_assert(kDecodePerThread * kThreads == kBO * kBK, "the W tile is shared evenly");

template <int DT>
struct MmaType;
template <>
struct MmaType<kBF16> {
  using T = __nv_bfloat16;
};
template <>
struct MmaType<kF16> {
  using T = __half;
};

struct Params {
  const uint16_t* act;  // [M, R]
  const uint8_t* packed;
  const void* absmax;
  const float* nested_absmax;  // null: absmax is fp32
  const float* nested_code;
  const float* offset;
  const uint16_t* down;  // forward: A [r, K]; dx: B [N, r]
  const uint16_t* up;    // forward: B [N, r]; dx: A [r, K]
  const float* rank_scale;
  const float* bias;       // forward only
  const float* out_scale;  // forward only
  uint16_t* out;           // [M, O]
  void* side;              // forward: xa [M, r] (activation dtype); dx: g [M, r] fp32; or null
  float* part;             // split > 1: [split][M][O]
  float* side_part;        // split > 1: [split][M][r]
  int64_t m, red, ocols;   // M, R, O
  int64_t n, k;            // W [N, K]
  int64_t r;               // LoRA rank (0: none)
  int64_t chunks_per_split;
  FastDivU32 nested_bs;
  float scaling;
  int log2_bs;
  int quant_type;
  int split;
  bool act_vec, w_vec, down_vec, up_vec;
};

// Shared memory layout (bytes). Per stage: activations, packed W, the LoRA down tile.
template <bool DX, int BR>
struct Smem {
  static constexpr int kStages = BR == 64 ? 2 : 3;  // 3 stages overflow 48 KiB at BR = 64
  // down tile: forward A [BR][kBK + pad]; dx B [kBK][BR + pad]
  static constexpr int kDownLd = DX ? BR + kPad : kActLd;
  static constexpr int kDownRows = DX ? kBK : BR;
  static constexpr int kAct = kBM * kActLd * 2;
  static constexpr int kDown = BR > 0 ? kDownRows * kDownLd * 2 : 0;
  static constexpr int kStage = kAct + kPackedBytes + kDown;
  // decoded W: forward [kBO W rows][kBK]; dx [kBK W rows][kBO]
  static constexpr int kWdLd = DX ? kBO + kPad : kActLd;
  static constexpr int kWdRows = DX ? kBK : kBO;
  static constexpr int kWd = kWdRows * kWdLd * 2;
  // epilogue (aliases the stages and Wd): t [kBM][BR + pad], U: forward B rows [kBO][BR +
  // pad], dx A rows [BR][kBO + pad]
  static constexpr int kTLd = BR + kPad;
  static constexpr int kULd = DX ? kBO + kPad : BR + kPad;
  static constexpr int kURows = DX ? BR : kBO;
  static constexpr int kEpi = BR > 0 ? kBM * kTLd * 2 + kURows * kULd * 2 : 0;
  static constexpr int kMain = kStages * kStage + kWd;
  static constexpr int kArena = kMain > kEpi ? kMain : kEpi;
  static constexpr int kTable = 256 * 8;                // byte -> two code values (fp32)
  static constexpr int kNested = (kNumCodes8 + 4) * 4;  // nested code values, offset
  static constexpr int kTotal = kArena + kTable + kNested;
  static_assert(kTotal <= 48 * 1024, "static dynamic-shared-memory budget (no opt-in)");
  static_assert(kStage % 16 == 0 && kAct % 16 == 0 && kWd % 16 == 0, "16-byte aligned regions");
};

#if QPEFT_QLORA_MMA
// Copies a ROWS x COLS tile of 16-bit elements starting at (row0, col0) of a row-major
// [rows, cols] matrix with row stride ld into shared memory (row stride dld), zero
// outside the matrix. vec: cp.async of 16 bytes (ld % 8 == 0, 16-byte aligned base);
// else synchronous element loads.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_tile(uint16_t* dst, int dld, const uint16_t* src, int64_t ld,
                                          int64_t rows, int64_t cols, int64_t row0, int64_t col0,
                                          bool vec) {
  static_assert(COLS % 8 == 0, "whole 16-byte chunks");
  constexpr int kChunks = ROWS * COLS / 8;
  const int tid = static_cast<int>(threadIdx.x);
  if (vec) {
    // A compile-time trip count: a `for (i = tid; i < kChunks; ...)` loop keeps a guard
    // branch for tid >= kChunks that ptxas cannot drop.
    constexpr int kIters = (kChunks + kThreads - 1) / kThreads;
#pragma unroll
    for (int j = 0; j < kIters; ++j) {
      const int i = tid + j * kThreads;
      if (kChunks % kThreads != 0 && i >= kChunks) break;
      const int rr = i / (COLS / 8);
      const int cc = (i % (COLS / 8)) * 8;
      const int64_t gr = row0 + rr;
      const int64_t gc = col0 + cc;
      int64_t valid = cols - gc;
      valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
      if (gr >= rows) valid = 0;
      const uint16_t* s = valid > 0 ? src + gr * ld + gc : src;
      ptx::cp_async<16>(dst + rr * dld + cc, s, static_cast<int>(valid) * 2);
    }
  } else {
#pragma unroll 1
    for (int i = tid; i < ROWS * COLS; i += kThreads) {
      const int rr = i / COLS;
      const int cc = i % COLS;
      const int64_t gr = row0 + rr;
      const int64_t gc = col0 + cc;
      dst[rr * dld + cc] = (gr < rows && gc < cols) ? src[gr * ld + gc] : uint16_t{0};
    }
  }
}

// A tile of a row-major [rows, cols] matrix that the reduction loop streams into shared
// memory chunk after chunk (16-byte cp.async, ld % 8 == 0, 16-byte aligned base): along
// its columns (COL: the activations, the forward's A) or along its rows (dx's B). The
// thread's copies, their addresses and the bounds of the fixed dimension are worked out
// once per pass; a chunk then costs a 64-bit add per copy, and only the last, partial
// chunk checks the streamed dimension (load_tile's per-chunk 64-bit bounds arithmetic was
// most of the loop's integer work in the SASS report).
template <int ROWS, int COLS, bool COL>
struct TileStream {
  static_assert(COLS % 8 == 0, "whole 16-byte chunks");
  static constexpr int kChunks = ROWS * COLS / 8;
  static constexpr int kIters = (kChunks + kThreads - 1) / kThreads;
  const uint16_t* base;
  const uint16_t* src[kIters];
  int dst[kIters];    // element offset in the shared tile
  int pos[kIters];    // the copy's offset along the streamed dimension within the chunk
  int bytes[kIters];  // 16, fewer at the fixed dimension's edge, 0 outside the matrix
  int64_t step;       // elements from one chunk to the next

  // (row0, col0): the tile's origin at the first chunk the pass loads.
  __device__ __forceinline__ void init(const uint16_t* s, int64_t ld, int64_t rows, int64_t cols,
                                       int64_t row0, int64_t col0, int dld) {
    base = s;
    step = COL ? kBK : kBK * ld;
    const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
    for (int j = 0; j < kIters; ++j) {
      const int i = tid + j * kThreads < kChunks ? tid + j * kThreads : 0;
      const int rr = i / (COLS / 8);
      const int cc = (i % (COLS / 8)) * 8;
      const int64_t gr = row0 + rr;
      const int64_t gc = col0 + cc;
      dst[j] = rr * dld + cc;
      pos[j] = COL ? cc : rr;
      int64_t valid = 8;
      if (COL) {
        if (gr >= rows) valid = 0;
      } else {
        valid = cols - gc;
        valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
      }
      bytes[j] = static_cast<int>(valid) * 2;
      src[j] = valid > 0 ? s + gr * ld + gc : s;
    }
  }

  // One chunk into tile; left: rows (COL: columns) from the chunk's start to the matrix's
  // end, read only when tail (left < kBK: the last chunk, part of it past the end).
  __device__ __forceinline__ void issue(uint16_t* tile, bool tail, int64_t left) {
    const int tid = static_cast<int>(threadIdx.x);
#pragma unroll
    for (int j = 0; j < kIters; ++j) {
      if (kChunks % kThreads != 0 && tid + j * kThreads >= kChunks) break;
      int b = bytes[j];
      if (tail) {
        const int64_t v = left - pos[j];
        if (v <= 0) {
          b = 0;
        } else if (COL && v < 8) {
          b = b < 2 * static_cast<int>(v) ? b : 2 * static_cast<int>(v);
        }
      }
      ptx::cp_async<16>(tile + dst[j], b > 0 ? src[j] : base, b);
      src[j] += step;
    }
  }
};

__device__ __forceinline__ float absmax_of(const Params& p, uint32_t blk, const float* s_ncode) {
  return qlora_absmax(p.absmax, p.nested_absmax, p.nested_bs, blk, s_ncode);
}

// The W rows/columns this thread decodes for reduction chunk red0: 32 consecutive
// weights of W row wn starting at column wk, into Wd at (lr, lc).
template <bool DX>
__device__ __forceinline__ void decode_coords(int64_t red0, int64_t o0, int64_t& wn, int64_t& wk,
                                              int& lr, int& lc) {
  const int tid = static_cast<int>(threadIdx.x);
  if constexpr (DX) {  // W tile: rows red0..red0+31, columns o0..o0+127
    lr = tid >> 2;
    lc = (tid & 3) * 32;
    wn = red0 + lr;
    wk = o0 + lc;
  } else {  // W tile: rows o0..o0+127, columns red0..red0+31
    lr = tid;
    lc = 0;
    wn = o0 + lr;
    wk = red0;
  }
}

// 16 packed bytes (32 weights) -> 32 values of dtype DT at dst (16-byte aligned).
template <int DT>
__device__ __forceinline__ void decode32(uint4 w, float am, const float2* tab, uint16_t* dst) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t word = q == 0 ? w.x : q == 1 ? w.y : q == 2 ? w.z : w.w;
    uint32_t o[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      // PRMT extracts the byte; the shared load scales the index itself ([R.X8])
      const float2 c = tab[__byte_perm(word, 0u, 0x4440u + b)];
      o[b] = pack2_16<DT>(c.x * am, c.y * am);
    }
    *reinterpret_cast<uint4*>(dst + 8 * q) = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

#endif  // QPEFT_QLORA_MMA

// RC: rank chunks (BR = 64 and r > 64), a separate instantiation so that r <= 64 keeps the
// registers (and occupancy) of the single pass.
template <int DT, bool DX, int BR, bool RC = false>
__global__ void __launch_bounds__(kThreads) qlora_gemm_kernel(Params p) {
#if !QPEFT_QLORA_MMA
  // mma.m16n8k16 (bf16) and cp.async need sm_80; the caller (qpeft/backends/native/qlora.py)
  // sends older GPUs to the reference, so reaching this is a bug: fail loudly.
  __trap();
#else
  using S = Smem<DX, BR>;
  using MT = typename MmaType<DT>::T;
  constexpr int kStages = S::kStages;
  constexpr int kRT = BR / 8;  // n8 tiles of the LoRA rank
  unsigned char* smem = dynamic_smem<unsigned char>();
  float2* s_tab = reinterpret_cast<float2*>(smem + S::kArena);
  float* s_ncode = reinterpret_cast<float*>(smem + S::kArena + S::kTable);
  uint16_t* s_wd = reinterpret_cast<uint16_t*>(smem + S::kStages * S::kStage);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;

  {  // byte -> (code[high nibble], code[low nibble]); the nested code values and offset
    const bool nf4 = p.quant_type == kNF4;
    for (int b = tid; b < 256; b += kThreads) {
      s_tab[b] = nf4 ? make_float2(c_nf4_q[b >> 4], c_nf4_q[b & 15])
                     : make_float2(c_fp4_q[b >> 4], c_fp4_q[b & 15]);
    }
    if (p.nested_absmax != nullptr) {
      for (int i = tid; i < kNumCodes8; i += kThreads) s_ncode[i] = p.nested_code[i];
      if (tid == 0) s_ncode[kNumCodes8] = *p.offset;
    }
  }

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kBO;
  const int64_t nchunks = (p.red + kBK - 1) / kBK;
  const int64_t c_lo = static_cast<int64_t>(blockIdx.z) * p.chunks_per_split;
  int64_t c_hi = c_lo + p.chunks_per_split;
  if (c_hi > nchunks) c_hi = nchunks;

  auto stage_act = [&](int s) { return reinterpret_cast<uint16_t*>(smem + s * S::kStage); };
  auto stage_packed = [&](int s) { return smem + s * S::kStage + S::kAct; };
  auto stage_down = [&](int s) {
    return reinterpret_cast<uint16_t*>(smem + s * S::kStage + S::kAct + kPackedBytes);
  };

  // rank0: the first LoRA rank of the current rank chunk (ranks above BR = 64 run as more
  // chunks of 64, see the rank-chunk passes below).
  int64_t rank0 = 0;

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;
  float lacc[kRT > 0 ? kRT : 1][4];
  auto zero_lacc = [&] {
#pragma unroll
    for (int j = 0; j < (kRT > 0 ? kRT : 1); ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) lacc[j][e] = 0.0f;
  };
  zero_lacc();

  // ldmatrix lane roles: matrix q = lane / 8, row rr = lane % 8 of it.
  const int lq = lane >> 3;
  const int lrr = lane & 7;

  // wpass: the main pass (W decode and MMAs, the first rank chunk of L); otherwise a
  // rank-chunk pass (L for ranks rank0..rank0+63 only: activation and D tiles).
  // kWVec: W takes the 16-byte path (K % 32 == 0, aligned); the main loop is compiled once
  // per value (below), so the per-element path is not a branch inside the fast loop.
  auto main_loop = [&](auto wvec, auto wpass) {
    constexpr bool kWVec = decltype(wvec)::value;
    constexpr bool kW = decltype(wpass)::value;
    // The streams of this pass, at chunk c_lo. W: 16 bytes = 32 weights of one W row per
    // thread (decode_coords); forward: row o0 + tid, the reduction runs along it; dx: row
    // red0 + tid / 4, the reduction runs down W's rows. w_fixed: the coordinate the
    // reduction does not move is inside W; w_pos: dx's row offset in the chunk (tail check).
    const int64_t red_lo = c_lo * kBK;
    const int64_t full_chunks = p.red / kBK;  // chunks before the partial one, if any
    TileStream<kBM, kBK, true> act_st;
    if (p.act_vec) act_st.init(p.act, p.red, p.m, p.red, m0, red_lo, kActLd);
    using DownStream =
        std::conditional_t<DX, TileStream<kBK, BR, false>, TileStream<BR, kBK, true>>;
    [[maybe_unused]] DownStream down_st;
    if constexpr (BR > 0) {
      if (p.down_vec) {
        if constexpr (DX) {  // B [N, r]: rows red0..red0+31, ranks rank0..rank0+BR-1
          down_st.init(p.down, p.r, p.n, p.r, red_lo, rank0, S::kDownLd);
        } else {  // A [r, K]: ranks rank0..rank0+BR-1, columns red0..red0+31
          down_st.init(p.down, p.k, p.r, p.k, rank0, red_lo, S::kDownLd);
        }
      }
    }
    int64_t wn0, wk0;
    int lr, lc;
    decode_coords<DX>(red_lo, o0, wn0, wk0, lr, lc);
    const bool w_fixed = DX ? wk0 < p.k : wn0 < p.n;
    const int w_pos = DX ? lr : 0;
    // the element index of the thread's first weight (absmax block: >> log2_bs) and of its
    // packed bytes, per chunk c + e_step
    int64_t e_dec = wn0 * p.k + wk0;
    const int64_t e_step = DX ? kBK * p.k : kBK;
    [[maybe_unused]] const uint8_t* w_src = w_fixed ? p.packed + (e_dec >> 1) : p.packed;
    [[maybe_unused]] const int64_t w_step = w_fixed ? e_step >> 1 : 0;

    auto load_stage = [&](int64_t c, int s) {
      const bool tail = c >= full_chunks;
      const int64_t left = p.red - c * kBK;  // reduction steps from this chunk to the end
      if (p.act_vec) {
        act_st.issue(stage_act(s), tail, left);
      } else {
        load_tile<kBM, kBK>(stage_act(s), kActLd, p.act, p.red, p.m, p.red, m0, c * kBK, false);
      }
      if constexpr (kW && kWVec) {
        const bool ok = w_fixed && (!DX || !tail || w_pos < left);
        ptx::cp_async<16>(stage_packed(s) + tid * 16, ok ? w_src : p.packed, ok ? 16 : 0);
        w_src += w_step;
      }
      if constexpr (BR > 0) {
        if (p.down_vec) {
          down_st.issue(stage_down(s), tail, left);
        } else if constexpr (DX) {
          load_tile<kBK, BR>(stage_down(s), S::kDownLd, p.down, p.r, p.n, p.r, c * kBK, rank0,
                             false);
        } else {
          load_tile<BR, kBK>(stage_down(s), S::kDownLd, p.down, p.k, p.r, p.k, rank0, c * kBK,
                             false);
        }
      }
    };

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (c_lo + s < c_hi) load_stage(c_lo + s, s);
      ptx::cp_async_commit();  // always: the group count stays uniform
    }
    __syncthreads();  // the tables

    // The stage read this chunk and the one the prefetch writes, advanced by a wrap (a
    // 64-bit `% kStages` costs ~17 instructions per chunk).
    int s = 0;
    int s_next = kStages - 1;
#pragma unroll 1
    for (int64_t c = c_lo; c < c_hi; ++c) {
      if constexpr (!kW) {
        ptx::cp_async_wait<kStages - 2>();
        __syncthreads();  // also: every warp is done with the stage the prefetch overwrites
      } else {
        const int64_t red0 = c * kBK;
        const bool wok = w_fixed && (!DX || w_pos < p.red - red0);
        // The absmax before the wait: its loads overlap the pipeline wait and the barrier.
        [[maybe_unused]] float am = 0.0f;
        if (kWVec && wok) am = absmax_of(p, static_cast<uint32_t>(e_dec >> p.log2_bs), s_ncode);
        e_dec += e_step;
        ptx::cp_async_wait<kStages - 2>();
        __syncthreads();

        uint16_t* wd = s_wd + lr * S::kWdLd + lc;
        if constexpr (kWVec) {
          const uint4 w = *reinterpret_cast<const uint4*>(stage_packed(s) + tid * 16);
          decode32<DT>(w, am, s_tab, wd);
        } else {  // per element from global memory (K % 32 != 0 or an unaligned W)
          int64_t wn, wk;
          decode_coords<DX>(red0, o0, wn, wk, lr, lc);
#pragma unroll 1
          for (int j = 0; j < 32; ++j) {
            float v = 0.0f;
            if (wn < p.n && wk + j < p.k) {
              const int64_t e = wn * p.k + wk + j;
              const uint8_t byte = p.packed[e >> 1];
              const float2 cv = s_tab[byte];
              const float a = absmax_of(p, static_cast<uint32_t>(e >> p.log2_bs), s_ncode);
              v = ((e & 1) ? cv.y : cv.x) * a;
            }
            wd[j] = static_cast<uint16_t>(pack2_16<DT>(v, 0.0f));
          }
        }
        __syncthreads();
      }

      if (c + kStages - 1 < c_hi) load_stage(c + kStages - 1, s_next);
      ptx::cp_async_commit();

      const uint16_t* xs = stage_act(s);
      [[maybe_unused]] const uint16_t* ds = stage_down(s);
      s = s + 1 == kStages ? 0 : s + 1;
      s_next = s_next + 1 == kStages ? 0 : s_next + 1;
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        if constexpr (kW) {
          uint32_t af[4][4];
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) {
            ptx::ldmatrix<4>(af[mt], xs + (mt * 16 + (lane & 15)) * kActLd + kk + (lane >> 4) * 8);
          }
          uint32_t bf[4][2];
#pragma unroll
          for (int np = 0; np < 2; ++np) {  // two n8 tiles per ldmatrix.x4
            uint32_t r4[4];
            if constexpr (DX) {
              ptx::ldmatrix<4, true>(r4, s_wd + (kk + (lq & 1) * 8 + lrr) * S::kWdLd + warp * 32 +
                                             np * 16 + (lq >> 1) * 8);
            } else {
              ptx::ldmatrix<4>(r4, s_wd + (warp * 32 + np * 16 + (lq >> 1) * 8 + lrr) * S::kWdLd +
                                       kk + (lq & 1) * 8);
            }
            bf[2 * np][0] = r4[0];
            bf[2 * np][1] = r4[1];
            bf[2 * np + 1][0] = r4[2];
            bf[2 * np + 1][1] = r4[3];
          }
#pragma unroll
          for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int nt = 0; nt < 4; ++nt)
              ptx::mma_m16n8k16<MT>(acc[mt][nt], af[mt], bf[nt], acc[mt][nt]);
        }

        if constexpr (BR > 0) {  // L rows 16w..16w+15 += act @ D
          uint32_t la[4];
          ptx::ldmatrix<4>(la, xs + (warp * 16 + (lane & 15)) * kActLd + kk + (lane >> 4) * 8);
#pragma unroll
          for (int rp = 0; rp < BR / 16; ++rp) {
            uint32_t r4[4];
            if constexpr (DX) {
              ptx::ldmatrix<4, true>(
                  r4, ds + (kk + (lq & 1) * 8 + lrr) * S::kDownLd + rp * 16 + (lq >> 1) * 8);
            } else {
              ptx::ldmatrix<4>(
                  r4, ds + (rp * 16 + (lq >> 1) * 8 + lrr) * S::kDownLd + kk + (lq & 1) * 8);
            }
            const uint32_t b0[2] = {r4[0], r4[1]};
            const uint32_t b1[2] = {r4[2], r4[3]};
            ptx::mma_m16n8k16<MT>(lacc[2 * rp], la, b0, lacc[2 * rp]);
            ptx::mma_m16n8k16<MT>(lacc[2 * rp + 1], la, b1, lacc[2 * rp + 1]);
          }
        }
      }
    }
  };
  if (p.w_vec) {
    main_loop(std::true_type{}, std::true_type{});
  } else {
    main_loop(std::false_type{}, std::true_type{});
  }
  ptx::cp_async_wait<0>();
  __syncthreads();  // the arena is reused below

  // Fragment coordinates: acc[mt][nt][e] is out row m0 + 16 mt + g + 8 (e >> 1), column
  // o0 + 32 w + 8 nt + 2 t + (e & 1); lacc[j][e] is L row m0 + 16 w + g + 8 (e >> 1),
  // rank rank0 + 8 j + 2 t + (e & 1).
  // The current rank chunk's L: split > 1: its fp32 partials (the o-tile-0 blocks); else
  // the side output and out += t @ U on the tensor cores.
  [[maybe_unused]] auto lora_out = [&] {
    if constexpr (BR > 0) {
      if (p.split > 1) {
        if (blockIdx.y == 0) {
          float* sp = p.side_part + static_cast<int64_t>(blockIdx.z) * p.m * p.r;
#pragma unroll
          for (int j = 0; j < kRT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int64_t row = m0 + warp * 16 + g + 8 * (e >> 1);
              const int64_t rk = rank0 + j * 8 + 2 * t + (e & 1);
              if (row < p.m && rk < p.r) sp[row * p.r + rk] = lacc[j][e];
            }
        }
        return;
      }
      uint16_t* s_t = reinterpret_cast<uint16_t*>(smem);
      uint16_t* s_u = reinterpret_cast<uint16_t*>(smem + kBM * S::kTLd * 2);
      // U tile first (its copies fly while t is formed)
      if constexpr (DX) {  // A [r, K]: rows rank0..rank0+BR-1, columns o0..o0+127
        load_tile<BR, kBO>(s_u, S::kULd, p.up, p.k, p.r, p.k, rank0, o0, p.up_vec);
      } else {  // B [N, r]: rows o0..o0+127, columns rank0..rank0+BR-1
        load_tile<kBO, BR>(s_u, S::kULd, p.up, p.r, p.n, p.r, o0, rank0, p.up_vec);
      }
      ptx::cp_async_commit();
      const bool write_side = p.side != nullptr && blockIdx.y == 0;
#pragma unroll
      for (int j = 0; j < kRT; ++j) {
        const int64_t rk = rank0 + j * 8 + 2 * t;
        const float rs0 = (p.rank_scale != nullptr && rk < p.r) ? p.rank_scale[rk] : 1.0f;
        const float rs1 = (p.rank_scale != nullptr && rk + 1 < p.r) ? p.rank_scale[rk + 1] : 1.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int lrow = warp * 16 + g + 8 * h;
          const float l0 = lacc[j][2 * h], l1 = lacc[j][2 * h + 1];
          *reinterpret_cast<uint32_t*>(s_t + lrow * S::kTLd + j * 8 + 2 * t) =
              pack2_16<DT>(l0 * p.scaling * rs0, l1 * p.scaling * rs1);
          const int64_t row = m0 + lrow;
          if (write_side && row < p.m) {
            if constexpr (DX) {
              float* gp = static_cast<float*>(p.side) + row * p.r;
              if (rk < p.r) gp[rk] = l0;
              if (rk + 1 < p.r) gp[rk + 1] = l1;
            } else {
              uint16_t* xp = static_cast<uint16_t*>(p.side) + row * p.r;
              const uint32_t both = pack2_16<DT>(l0, l1);
              if (rk < p.r) xp[rk] = static_cast<uint16_t>(both);
              if (rk + 1 < p.r) xp[rk + 1] = static_cast<uint16_t>(both >> 16);
            }
          }
        }
      }
      ptx::cp_async_wait<0>();
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BR; kk += 16) {
        uint32_t af[4][4];
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          ptx::ldmatrix<4>(af[mt], s_t + (mt * 16 + (lane & 15)) * S::kTLd + kk + (lane >> 4) * 8);
        }
#pragma unroll
        for (int np = 0; np < 2; ++np) {
          uint32_t r4[4];
          if constexpr (DX) {
            ptx::ldmatrix<4, true>(r4, s_u + (kk + (lq & 1) * 8 + lrr) * S::kULd + warp * 32 +
                                           np * 16 + (lq >> 1) * 8);
          } else {
            ptx::ldmatrix<4>(r4, s_u + (warp * 32 + np * 16 + (lq >> 1) * 8 + lrr) * S::kULd + kk +
                                     (lq & 1) * 8);
          }
          const uint32_t b0[2] = {r4[0], r4[1]};
          const uint32_t b1[2] = {r4[2], r4[3]};
#pragma unroll
          for (int mt = 0; mt < 4; ++mt) {
            ptx::mma_m16n8k16<MT>(acc[mt][2 * np], af[mt], b0, acc[mt][2 * np]);
            ptx::mma_m16n8k16<MT>(acc[mt][2 * np + 1], af[mt], b1, acc[mt][2 * np + 1]);
          }
        }
      }
    }
  };
  lora_out();
  if constexpr (RC) {
    static_assert(BR == 64, "rank chunks of 64");
    // Ranks above 64: one more pass over the reduction per chunk of 64 ranks (activation
    // and D tiles through the same pipeline, no W), then that chunk's lora_out. acc stays
    // in registers; the split schedule's partials of L come from the o-tile-0 blocks only,
    // so the others skip these passes.
    const bool passes = p.split == 1 || blockIdx.y == 0;
#pragma unroll 1
    for (rank0 = BR; passes && rank0 < p.r; rank0 += BR) {
      __syncthreads();  // lora_out's reads of the arena are done
      zero_lacc();
      main_loop(std::false_type{}, std::false_type{});
      ptx::cp_async_wait<0>();
      __syncthreads();
      lora_out();
    }
  }

  if (p.split > 1) {  // fp32 partials of out; the reduce kernels finish
    float* part = p.part + static_cast<int64_t>(blockIdx.z) * p.m * p.ocols;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t row = m0 + mt * 16 + g + 8 * (e >> 1);
          const int64_t col = o0 + warp * 32 + nt * 8 + 2 * t + (e & 1);
          if (row < p.m && col < p.ocols) part[row * p.ocols + col] = acc[mt][nt][e];
        }
    return;
  }

#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int64_t col = o0 + warp * 32 + nt * 8 + 2 * t;
    float bias[2] = {0.0f, 0.0f}, osc[2] = {1.0f, 1.0f};
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      if (col + e < p.ocols) {
        if (p.bias != nullptr) bias[e] = p.bias[col + e];
        if (p.out_scale != nullptr) osc[e] = p.out_scale[col + e];
      }
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t row = m0 + mt * 16 + g + 8 * h;
        if (row >= p.m) continue;
        float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
        if (p.bias != nullptr) {
          v0 += bias[0];
          v1 += bias[1];
        }
        if (p.out_scale != nullptr) {
          v0 *= osc[0];
          v1 *= osc[1];
        }
        const uint32_t both = pack2_16<DT>(v0, v1);
        uint16_t* op = p.out + row * p.ocols + col;
        if (col + 1 < p.ocols && (reinterpret_cast<std::uintptr_t>(op) & 3) == 0) {
          *reinterpret_cast<uint32_t*>(op) = both;
        } else {
          if (col < p.ocols) op[0] = static_cast<uint16_t>(both);
          if (col + 1 < p.ocols) op[1] = static_cast<uint16_t>(both >> 16);
        }
      }
  }
#endif  // QPEFT_QLORA_MMA
}

// Split reduction, step 1: L[m, j] = sum_z side_part[z][m][j] in z order; the side
// output (xa rounded / g fp32) and t = round(L * s * rank_scale) (as fp32) into tbuf.
template <int DT, bool DX>
__global__ void __launch_bounds__(kThreads) qlora_reduce_side_kernel(Params p, float* tbuf) {
  const int64_t total = p.m * p.r;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float l = 0.0f;
    for (int z = 0; z < p.split; ++z) l += p.side_part[z * total + i];
    const int64_t j = i % p.r;
    if (p.side != nullptr) {
      if constexpr (DX) {
        static_cast<float*>(p.side)[i] = l;
      } else {
        static_cast<uint16_t*>(p.side)[i] = static_cast<uint16_t>(pack2_16<DT>(l, 0.0f));
      }
    }
    const float rs = p.rank_scale != nullptr ? p.rank_scale[j] : 1.0f;
    tbuf[i] = to_f32<DT>(static_cast<uint16_t>(pack2_16<DT>(l * p.scaling * rs, 0.0f)));
  }
}

// Step 2: out[m, o] = sum_z part[z][m][o] + t[m, :] . U[:, o] (+ bias) (* out_scale).
template <int DT, bool DX>
__global__ void __launch_bounds__(kThreads) qlora_reduce_out_kernel(Params p, const float* tbuf) {
  const int64_t total = p.m * p.ocols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    float v = 0.0f;
    for (int z = 0; z < p.split; ++z) v += p.part[z * total + i];
    const int64_t row = i / p.ocols;
    const int64_t col = i % p.ocols;
    for (int64_t j = 0; j < p.r; ++j) {  // r = 0 when the caller does the LoRA terms
      const uint16_t u = DX ? p.up[j * p.k + col] : p.up[col * p.r + j];
      v += tbuf[row * p.r + j] * to_f32<DT>(u);
    }
    if (p.bias != nullptr) v += p.bias[col];
    if (p.out_scale != nullptr) v *= p.out_scale[col];
    p.out[i] = static_cast<uint16_t>(pack2_16<DT>(v, 0.0f));
  }
}

template <int DT, bool DX>
void launch_gemm(const char* fn, const Params& p, int br, float* tbuf, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.m, kBM)),
                  static_cast<unsigned>(ceil_div(p.ocols, kBO)), static_cast<unsigned>(p.split));
  switch (br) {
    case 0:
      launch(fn, qlora_gemm_kernel<DT, DX, 0>, grid, kThreads, Smem<DX, 0>::kTotal, stream, p);
      break;
    case 16:
      launch(fn, qlora_gemm_kernel<DT, DX, 16>, grid, kThreads, Smem<DX, 16>::kTotal, stream, p);
      break;
    case 32:
      launch(fn, qlora_gemm_kernel<DT, DX, 32>, grid, kThreads, Smem<DX, 32>::kTotal, stream, p);
      break;
    case 64:
      launch(fn, qlora_gemm_kernel<DT, DX, 64>, grid, kThreads, Smem<DX, 64>::kTotal, stream, p);
      break;
    default:  // r > 64: rank chunks of 64
      launch(fn, qlora_gemm_kernel<DT, DX, 64, true>, grid, kThreads, Smem<DX, 64>::kTotal, stream,
             p);
      break;
  }
  if (p.split > 1) {
    if (p.r > 0) {
      launch(fn, qlora_reduce_side_kernel<DT, DX>, dim3(grid_for(p.m * p.r, kThreads)), kThreads, 0,
             stream, p, tbuf);
    }
    launch(fn, qlora_reduce_out_kernel<DT, DX>, dim3(grid_for(p.m * p.ocols, kThreads)), kThreads,
           0, stream, p, static_cast<const float*>(tbuf));
  }
}

// The checks and launch shared by the two entry points. act [m, red] -> out [m, ocols].
void run(const char* fn, bool dx, std::uintptr_t act, int dtype, int64_t act_len, int64_t m,
         int64_t n, int64_t k, const QuantArgs& q, std::uintptr_t lora_a, int64_t lora_a_len,
         std::uintptr_t lora_b, int64_t lora_b_len, int64_t r, double scaling,
         std::uintptr_t rank_scale, int64_t rank_scale_len, std::uintptr_t bias, int64_t bias_len,
         std::uintptr_t out_scale, int64_t out_scale_len, std::uintptr_t out, int64_t out_len,
         std::uintptr_t side, int64_t side_len, int64_t split, std::uintptr_t workspace,
         int64_t workspace_len, std::uintptr_t stream) {
  if (dtype != kF16 && dtype != kBF16) {
    host::fail(fn, "takes float16 (1) or bfloat16 (2) activations, got dtype " +
                       std::to_string(dtype) + " (others: qlora_simt_forward / qlora_simt_dx)");
  }
  if (r > kQloraMaxRank) {
    host::fail(fn, "takes a LoRA rank of at most " + std::to_string(kQloraMaxRank) +
                       " (larger "
                       "ranks: r = 0 and the LoRA terms outside), got r=" +
                       std::to_string(r));
  }
  const QloraDims d = check_qlora_args(fn, dx, act_len, m, n, k, q, lora_a, lora_a_len, lora_b,
                                       lora_b_len, r, rank_scale, rank_scale_len, bias, bias_len,
                                       out_scale, out_scale_len, out_len, side, side_len);
  const int64_t red = d.red;
  const int64_t ocols = d.ocols;
  const int log2_bs = d.log2_bs;
  const FastDivU32 nested_div = d.nested_div;
  const float s = static_cast<float>(scaling);
  host::check_finite(fn, "scaling", s);
  const int64_t nchunks = ceil_div(red, kBK);
  if (split < 1 || split > nchunks || split > kQloraMaxSplit) {
    host::fail(fn, "split must be in [1, min(" + std::to_string(kQloraMaxSplit) +
                       ", ceil(reduction / 32) = " + std::to_string(nchunks) + ")], got " +
                       std::to_string(split));
  }
  if (ceil_div(ocols, kBO) > 65535) host::fail(fn, "more than 65535 column tiles of 128");
  if (ceil_div(m, kBM) >= (int64_t{1} << 31)) host::fail(fn, "more than 2^31 - 1 row tiles of 64");
  if (split > 1) {
    host::check_len(fn, "workspace", workspace_len, qlora_workspace_len(m, ocols, r, split));
    host::check_ptr(fn, "workspace", workspace);
  }
  if (m == 0) return;
  check_qlora_ptrs(fn, dx, act, q, out);

  Params p{};
  p.act = reinterpret_cast<const uint16_t*>(act);
  p.packed = reinterpret_cast<const uint8_t*>(q.packed);
  p.absmax = reinterpret_cast<const void*>(q.absmax);
  p.nested_absmax = reinterpret_cast<const float*>(q.nested_absmax);
  p.nested_code = reinterpret_cast<const float*>(q.nested_code);
  p.offset = reinterpret_cast<const float*>(q.offset);
  p.down = reinterpret_cast<const uint16_t*>(dx ? lora_b : lora_a);
  p.up = reinterpret_cast<const uint16_t*>(dx ? lora_a : lora_b);
  p.rank_scale = reinterpret_cast<const float*>(rank_scale);
  p.bias = dx ? nullptr : reinterpret_cast<const float*>(bias);
  p.out_scale = dx ? nullptr : reinterpret_cast<const float*>(out_scale);
  p.out = reinterpret_cast<uint16_t*>(out);
  p.side = r > 0 ? reinterpret_cast<void*>(side) : nullptr;
  p.m = m;
  p.red = red;
  p.ocols = ocols;
  p.n = n;
  p.k = k;
  p.r = r;
  p.chunks_per_split = ceil_div(nchunks, split);
  p.split = static_cast<int>(split);
  p.nested_bs = nested_div;
  p.scaling = s;
  p.log2_bs = log2_bs;
  p.quant_type = q.quant_type;
  p.act_vec = red % 8 == 0 && aligned(act, 16);
  p.w_vec = k % kBK == 0 && aligned(q.packed, 16);
  const std::uintptr_t down = dx ? lora_b : lora_a;
  const std::uintptr_t up = dx ? lora_a : lora_b;
  // forward: down = A [r, K] (rows of K), up = B [N, r] (rows of r); dx: the other way
  p.down_vec = (dx ? r % 8 == 0 : k % 8 == 0) && aligned(down, 16);
  p.up_vec = (dx ? k % 8 == 0 : r % 8 == 0) && aligned(up, 16);
  float* tbuf = nullptr;
  if (split > 1) {
    float* ws = reinterpret_cast<float*>(workspace);
    p.part = ws;
    p.side_part = ws + split * m * ocols;
    tbuf = p.side_part + split * m * r;
  }
  const int br = r == 0 ? 0 : r <= 16 ? 16 : r <= 32 ? 32 : r <= 64 ? 64 : 128;
  if (dtype == kBF16) {
    dx ? launch_gemm<kBF16, true>(fn, p, br, tbuf, as_stream(stream))
       : launch_gemm<kBF16, false>(fn, p, br, tbuf, as_stream(stream));
  } else {
    dx ? launch_gemm<kF16, true>(fn, p, br, tbuf, as_stream(stream))
       : launch_gemm<kF16, false>(fn, p, br, tbuf, as_stream(stream));
  }
}

}  // namespace

int64_t qlora_workspace_len(int64_t m, int64_t ocols, int64_t r, int64_t split) {
  // split * m * ocols (partials of out) + split * m * r (of L) + m * r (t); the entry
  // points check every factor first, and the caller's buffer exists, so no overflow
  return split > 1 ? split * m * ocols + split * m * r + m * r : 0;
}

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
                   std::uintptr_t workspace, std::int64_t workspace_len, std::uintptr_t stream) {
  const QuantArgs q{packed,      packed_len, absmax,          absmax_len,
                    blocksize,   quant_type, nested_absmax,   nested_absmax_len,
                    nested_code, offset,     nested_blocksize};
  run("qlora_forward", false, x, x_dtype, x_len, m, n, k, q, lora_a, lora_a_len, lora_b, lora_b_len,
      r, scaling, rank_scale, rank_scale_len, bias, bias_len, out_scale, out_scale_len, y, y_len,
      xa, xa_len, split, workspace, workspace_len, stream);
}

void qlora_dx(std::uintptr_t dy, int dy_dtype, std::int64_t dy_len, std::int64_t m, std::int64_t k,
              std::uintptr_t packed, std::int64_t packed_len, std::uintptr_t absmax,
              std::int64_t absmax_len, std::int64_t n, std::int64_t blocksize, int quant_type,
              std::uintptr_t nested_absmax, std::int64_t nested_absmax_len,
              std::uintptr_t nested_code, std::uintptr_t offset, std::int64_t nested_blocksize,
              std::uintptr_t lora_a, std::int64_t lora_a_len, std::uintptr_t lora_b,
              std::int64_t lora_b_len, std::int64_t r, double scaling, std::uintptr_t rank_scale,
              std::int64_t rank_scale_len, std::uintptr_t dx, std::int64_t dx_len, std::uintptr_t g,
              std::int64_t g_len, std::int64_t split, std::uintptr_t workspace,
              std::int64_t workspace_len, std::uintptr_t stream) {
  const QuantArgs q{packed,      packed_len, absmax,          absmax_len,
                    blocksize,   quant_type, nested_absmax,   nested_absmax_len,
                    nested_code, offset,     nested_blocksize};
  run("qlora_dx", true, dy, dy_dtype, dy_len, m, n, k, q, lora_a, lora_a_len, lora_b, lora_b_len, r,
      scaling, rank_scale, rank_scale_len, 0, 0, 0, 0, dx, dx_len, g, g_len, split, workspace,
      workspace_len, stream);
}

}  // namespace cuda
}  // namespace qpeft
