// Planted bugs, each next to its correct twin (bug == 0), compiled only into the
// emulation module. Each is a mistake that compiles, often passes on a GPU by
// luck, and that the harness must expose: tests/test_cuda_emulation_harness.py
// checks that the twin passes for every scheduling seed and the bug is caught
// (an exception, or a wrong result) deterministically.
#include <cstdint>

#include "launch.h"
#include "ptx.h"
#include "test_kernels.h"

namespace qpeft {
namespace emu_tests {
namespace {

constexpr int kBlock = 256;

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// A stale block stride: 128 where the launch uses 256 threads, so blocks overlap
// and the upper half of the range is never written.
__global__ void block_index_kernel(const float* in, float* out, int64_t n, int bug) {
  const int64_t stride = bug ? 128 : static_cast<int64_t>(blockDim.x);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * stride + threadIdx.x;
  if (i < n) out[i] = 2.0f * in[i];
}

// Tree sum in shared memory; the bug puts the barrier inside the branch that only
// the lower half of the active threads take.
__global__ void divergent_barrier_kernel(const float* in, float* out, int bug) {
  __shared__ float s[kBlock];
  const int t = static_cast<int>(threadIdx.x);
  s[t] = in[blockIdx.x * kBlock + t];
  __syncthreads();
  for (int half = kBlock / 2; half > 0; half >>= 1) {
    if (t < half) {
      s[t] += s[t + half];
      if (bug) __syncthreads();
    }
    if (!bug) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// Reverses each block's 256 values through shared memory; the bug drops the
// barrier between the writes and the reads of another warp's values.
__global__ void missing_barrier_kernel(const float* in, float* out, int bug) {
  __shared__ float s[kBlock];
  const int t = static_cast<int>(threadIdx.x);
  s[t] = in[blockIdx.x * kBlock + t];
  if (!bug) __syncthreads();
  out[blockIdx.x * kBlock + t] = s[kBlock - 1 - t];
}

// Sum of the lower 16 lanes. The bug shuffles down with a 16-lane mask: lanes
// 8..15 then read lanes 16..23, which are not in the mask.
__global__ void shuffle_lane_kernel(const float* in, float* out, int bug) {
  const int lane = static_cast<int>(threadIdx.x);
  float v = in[lane];
  if (lane < 16) {
    for (int off = 8; off > 0; off >>= 1) {
      v += bug ? __shfl_down_sync(0x0000ffffu, v, off) : __shfl_xor_sync(0x0000ffffu, v, off);
    }
  }
  if (lane == 0) out[0] = v;
}

// Sum of the lower 16 lanes. The bug keeps the full mask inside a branch only
// lanes 0..15 take: lanes 16..31 never arrive.
__global__ void shuffle_missing_lanes_kernel(const float* in, float* out, int bug) {
  const int lane = static_cast<int>(threadIdx.x);
  float v = in[lane];
  const unsigned mask = bug ? 0xffffffffu : 0x0000ffffu;
  if (lane < 16) {
    for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off);
  }
  if (lane == 0) out[0] = v;
}

// Warp sum, then a barrier. The bug sends the upper half of the warp to a barrier
// first while the lower half waits in a full-mask shuffle for them: neither can
// complete (a hang on a GPU).
__global__ void shuffle_barrier_deadlock_kernel(const float* in, float* out, int bug) {
  const int lane = static_cast<int>(threadIdx.x);
  float v = in[lane];
  if (bug && lane >= 16) __syncthreads();
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (!bug || lane < 16) __syncthreads();
  if (lane == 0) out[0] = v;
}

// Thread 0 raises a flag the others spin on (with __nanosleep, which yields). The
// bug names a setter that does not exist: everyone spins forever.
__global__ void spin_wait_kernel(float* out, int bug) {
  __shared__ int s_flag;
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) s_flag = 0;
  __syncthreads();
  const int setter = bug ? static_cast<int>(blockDim.x) : 0;
  if (t == setter) {
    *static_cast<volatile int*>(&s_flag) = 1;
  } else {
    while (*static_cast<volatile int*>(&s_flag) == 0) __nanosleep(100);
  }
  out[t] = 1.0f;
}

// Per-warp sum through shared memory. The bug is the pre-Volta idiom relying on
// lockstep warps (no __syncwarp between the steps).
__global__ void warp_sync_kernel(const float* in, float* out, int bug) {
  __shared__ float s[kBlock];
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t & 31;
  float* w = s + (t - lane);
  w[lane] = in[blockIdx.x * kBlock + t];
  if (bug) {
    for (int off = 16; off > 0; off >>= 1) {
      if (lane < off) w[lane] += w[lane + off];
    }
  } else {
    __syncwarp();
    for (int off = 16; off > 0; off >>= 1) {
      float v = 0.0f;
      if (lane < off) v = w[lane] + w[lane + off];
      __syncwarp();
      if (lane < off) w[lane] = v;
      __syncwarp();
    }
  }
  if (lane == 0) out[blockIdx.x * (kBlock / 32) + (t >> 5)] = w[0];
}

// Copy through a 128-entry __shared__ array; the bug writes one element past it.
__global__ void smem_oob_kernel(const float* in, float* out, int bug) {
  __shared__ float s[128];
  const int t = static_cast<int>(threadIdx.x);
  s[t + bug] = in[t];
  __syncthreads();
  out[t] = s[t];
}

// Copy through dynamic shared memory sized for 128 floats; the bug writes one past.
__global__ void dynamic_smem_oob_kernel(const float* in, float* out, int bug) {
  float* s = dynamic_smem<float>();
  const int t = static_cast<int>(threadIdx.x);
  s[t + bug] = in[t];
  __syncthreads();
  out[t] = s[t];
}

// --- csrc/cuda/ptx.h's instructions ----------------------------------------------------

// c = a @ b, one warp, 16 x 8 x k, fragments loaded straight from global memory
// (ptx.h's layouts). Bug 1: a[1] and a[2] swapped (rows g+8 and columns 2t+8
// exchanged: a plausible slip that compiles and gives a wrong D). Bug 2: the mma
// inside a branch only lanes 0-15 take. Bug 3: the two halves of the warp call it
// from different source lines.
__global__ void mma_layout_kernel(const uint16_t* a, const uint16_t* b, float* c, int k, int bug) {
  const int lane = static_cast<int>(threadIdx.x);
  const int g = lane / 4, t = lane % 4;
  auto pair = [](const uint16_t* p, int stride) {
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[stride]) << 16);
  };
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int k0 = 0; k0 < k; k0 += 16) {
    const uint16_t* at = a + k0;
    uint32_t ar[4] = {pair(at + g * k + 2 * t, 1), pair(at + (g + 8) * k + 2 * t, 1),
                      pair(at + g * k + 2 * t + 8, 1), pair(at + (g + 8) * k + 2 * t + 8, 1)};
    if (bug == 1) {
      const uint32_t x = ar[1];
      ar[1] = ar[2];
      ar[2] = x;
    }
    const uint32_t br[2] = {pair(b + (k0 + 2 * t) * 8 + g, 8),
                            pair(b + (k0 + 2 * t + 8) * 8 + g, 8)};
    if (bug == 2) {
      if (lane < 16) ptx::mma_m16n8k16<__nv_bfloat16>(acc, ar, br, acc);
    } else if (bug == 3 && lane >= 16) {
      ptx::mma_m16n8k16<__nv_bfloat16>(acc, ar, br, acc);
    } else {
      ptx::mma_m16n8k16<__nv_bfloat16>(acc, ar, br, acc);
    }
  }
  c[g * 8 + 2 * t] = acc[0];
  c[g * 8 + 2 * t + 1] = acc[1];
  c[(g + 8) * 8 + 2 * t] = acc[2];
  c[(g + 8) * 8 + 2 * t + 1] = acc[3];
}

// A 3-stage cp.async pipeline (the shape of a tensor-core GEMM's main loop), one
// 16 x 16 output tile per block, two warps. Stage: A tile [16 m][16 k] bf16 (64
// pieces of 8 bytes: thread t copies piece t, so every thread of the block
// writes part of it) and B tile [16 k][16 n] bf16 (32 chunks of 16 bytes,
// threads 0-31). Warp 0 computes C = A B: A fragments by ldmatrix.x4, B by
// ldmatrix.x4.trans. Warp 1 computes C^T = B^T A^T: its A operand (B^T) by
// ldmatrix.x4.trans, its B operand (A^T) by ldmatrix.x4. Each warp's first
// ldmatrix reads bytes copied by every thread of the other warp, so a missing
// barrier is seen whichever warp runs first.
constexpr int kStages = 3;
constexpr int kStageBytes = 2 * 16 * 16 * 2;

__global__ void cp_async_pipeline_kernel(const uint16_t* a, const uint16_t* b, float* c, float* ct,
                                         int k, int bug) {
  unsigned char* smem = dynamic_smem<unsigned char>();
  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32, lane = tid % 32;
  const int ktiles = k / 16;
  a += static_cast<int64_t>(blockIdx.x) * 16 * k;
  b += static_cast<int64_t>(blockIdx.x) * k * 16;
  auto stage_a = [&](int s) { return reinterpret_cast<uint16_t*>(smem + s * kStageBytes); };
  auto stage_b = [&](int s) { return stage_a(s) + 16 * 16; };
  auto load = [&](int s, int kt) {
    if (kt < ktiles) {
      const int row = tid / 4, quarter = tid % 4;  // A: 16 rows of 4 pieces
      ptx::cp_async<8>(stage_a(s) + row * 16 + quarter * 4, a + row * k + kt * 16 + quarter * 4);
      if (tid < 32) {  // B: 16 rows of 2 chunks
        const int kr = tid / 2, half = tid % 2;
        ptx::cp_async<16>(stage_b(s) + kr * 16 + half * 8, b + (kt * 16 + kr) * 16 + half * 8);
      }
    }
    ptx::cp_async_commit();  // possibly empty: the group count stays in step
  };
  for (int s = 0; s < kStages - 1; ++s) load(s, s);
  float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
  const int i = lane / 8, r = lane % 8;  // the matrix and row this lane addresses
  for (int kt = 0; kt < ktiles; ++kt) {
    if (bug != 1) ptx::cp_async_wait<kStages - 2>();
    if (bug != 2) __syncthreads();
    const int s = kt % kStages;
    const uint16_t* sa = stage_a(s);
    const uint16_t* sb = stage_b(s);
    uint32_t af[4], bf[4];
    if (warp == 0) {
      // a0..a3: (m0-7, k0-7), (m8-15, k0-7), (m0-7, k8-15), (m8-15, k8-15).
      ptx::ldmatrix<4>(af, sa + (r + 8 * (i & 1)) * 16 + 8 * (i >> 1));
      // b for n 0-7: (k0-7), (k8-15); for n 8-15 likewise; stored [k][n]: .trans.
      ptx::ldmatrix<4, true>(bf, sb + (r + 8 * (i & 1)) * 16 + 8 * (i >> 1));
    } else {
      // A operand B^T [n][k] from B [k][n]: a_j = (n 8(j&1).., k 8(j>>1)..), .trans.
      ptx::ldmatrix<4, true>(af, sb + (r + 8 * (i >> 1)) * 16 + 8 * (i & 1));
      // B operand A^T [k][m] from A [m][k]: m-tile j: (m 8j.., k0-7), (m 8j.., k8-15).
      ptx::ldmatrix<4>(bf, sa + (r + 8 * (i >> 1)) * 16 + 8 * (i & 1));
    }
    for (int j = 0; j < 2; ++j) {
      const uint32_t bj[2] = {bf[2 * j], bf[2 * j + 1]};
      ptx::mma_m16n8k16<__nv_bfloat16>(acc[j], af, bj, acc[j]);
    }
    load((kt + kStages - 1) % kStages, kt + kStages - 1);
  }
  ptx::cp_async_wait<0>();
  float* out = (warp == 0 ? c : ct) + blockIdx.x * 256;
  const int g = lane / 4, t = lane % 4;
  for (int j = 0; j < 2; ++j) {
    out[g * 16 + 8 * j + 2 * t] = acc[j][0];
    out[g * 16 + 8 * j + 2 * t + 1] = acc[j][1];
    out[(g + 8) * 16 + 8 * j + 2 * t] = acc[j][2];
    out[(g + 8) * 16 + 8 * j + 2 * t + 1] = acc[j][3];
  }
}

}  // namespace

void bug_block_index(std::uintptr_t in, std::uintptr_t out, std::int64_t n, int bug) {
  const unsigned blocks = static_cast<unsigned>((n + kBlock - 1) / kBlock);
  launch("bug_block_index", block_index_kernel, dim3(blocks), dim3(kBlock), 0, nullptr,
         ptr<const float>(in), ptr<float>(out), n, bug);
}

void bug_divergent_barrier(std::uintptr_t in, std::uintptr_t out, int blocks, int bug) {
  launch("bug_divergent_barrier", divergent_barrier_kernel, dim3(blocks), dim3(kBlock), 0, nullptr,
         ptr<const float>(in), ptr<float>(out), bug);
}

void bug_missing_barrier(std::uintptr_t in, std::uintptr_t out, int blocks, int bug) {
  launch("bug_missing_barrier", missing_barrier_kernel, dim3(blocks), dim3(kBlock), 0, nullptr,
         ptr<const float>(in), ptr<float>(out), bug);
}

void bug_shuffle_lane(std::uintptr_t in, std::uintptr_t out, int bug) {
  launch("bug_shuffle_lane", shuffle_lane_kernel, dim3(1), dim3(32), 0, nullptr,
         ptr<const float>(in), ptr<float>(out), bug);
}

void bug_shuffle_missing_lanes(std::uintptr_t in, std::uintptr_t out, int bug) {
  launch("bug_shuffle_missing_lanes", shuffle_missing_lanes_kernel, dim3(1), dim3(32), 0, nullptr,
         ptr<const float>(in), ptr<float>(out), bug);
}

void bug_deadlock(std::uintptr_t in, std::uintptr_t out, int bug) {
  launch("bug_deadlock", shuffle_barrier_deadlock_kernel, dim3(1), dim3(32), 0, nullptr,
         ptr<const float>(in), ptr<float>(out), bug);
}

void bug_spin_wait(std::uintptr_t out, int bug) {
  launch("bug_spin_wait", spin_wait_kernel, dim3(1), dim3(64), 0, nullptr, ptr<float>(out), bug);
}

void bug_warp_sync(std::uintptr_t in, std::uintptr_t out, int blocks, int bug) {
  launch("bug_warp_sync", warp_sync_kernel, dim3(blocks), dim3(kBlock), 0, nullptr,
         ptr<const float>(in), ptr<float>(out), bug);
}

void bug_smem_oob(std::uintptr_t in, std::uintptr_t out, int bug) {
  launch("bug_smem_oob", smem_oob_kernel, dim3(1), dim3(128), 0, nullptr, ptr<const float>(in),
         ptr<float>(out), bug);
}

void bug_dynamic_smem_oob(std::uintptr_t in, std::uintptr_t out, int bug) {
  launch("bug_dynamic_smem_oob", dynamic_smem_oob_kernel, dim3(1), dim3(128), 128 * sizeof(float),
         nullptr, ptr<const float>(in), ptr<float>(out), bug);
}

void bug_mma_layout(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, int k, int bug) {
  launch("bug_mma_layout", mma_layout_kernel, dim3(1), dim3(32), 0, nullptr, ptr<const uint16_t>(a),
         ptr<const uint16_t>(b), ptr<float>(c), k, bug);
}

void bug_cp_async_pipeline(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t ct,
                           int k, int blocks, int bug) {
  launch("bug_cp_async_pipeline", cp_async_pipeline_kernel, dim3(static_cast<unsigned>(blocks)),
         dim3(64), kStages * kStageBytes, nullptr, ptr<const uint16_t>(a), ptr<const uint16_t>(b),
         ptr<float>(c), ptr<float>(ct), k, bug);
}

}  // namespace emu_tests
}  // namespace qpeft
