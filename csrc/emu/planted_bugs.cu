// Planted bugs, each next to its correct twin (bug == 0), compiled only into the
// emulation module. Each is a mistake that compiles, often passes on a GPU by
// luck, and that the harness must expose: tests/test_cuda_emulation_harness.py
// checks that the twin passes for every scheduling seed and the bug is caught
// (an exception, or a wrong result) deterministically.
#include <cstdint>

#include "launch.h"
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

}  // namespace emu_tests
}  // namespace qpeft
