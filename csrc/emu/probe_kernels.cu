// Probes of the emulated CUDA semantics (test_kernels.h), written as ordinary
// CUDA kernels and launched through qpeft::launch; compiled only into the
// emulation module. tests/test_cuda_emulation_harness.py holds their outputs to
// the CUDA programming guide's definitions.
#include <cstdint>

#include "launch.h"
#include "test_kernels.h"

namespace qpeft {
namespace emu_tests {
namespace {

template <typename T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

__global__ void indices_kernel(int* out) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned long long b =
      blockIdx.x + 1ull * gridDim.x * (blockIdx.y + 1ull * gridDim.y * blockIdx.z);
  int* o = out + (b * threads + t) * 12;
  const unsigned v[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                          blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
  for (int i = 0; i < 12; ++i) o[i] = static_cast<int>(v[i]);
}

__global__ void barrier_kernel(int* out, const int* pred, int* agg, int phases) {
  __shared__ int s_count;
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) s_count = 0;
  __syncthreads();
  for (int p = 0; p < phases; ++p) {
    atomicAdd(&s_count, 1);
    __syncthreads();
    out[p * static_cast<int>(blockDim.x) + t] = s_count;
    __syncthreads();  // nobody increments for p+1 before everyone has read
  }
  const int c = __syncthreads_count(pred[t]);
  const int a = __syncthreads_and(pred[t]);
  const int o = __syncthreads_or(pred[t]);
  if (t == 0) {
    agg[0] = c;
    agg[1] = a;
    agg[2] = o;
  }
}

template <typename T>
__global__ void shuffle_kernel(int op, const T* in, const int* b, T* out, unsigned mask,
                               int width) {
  const int t = static_cast<int>(threadIdx.x);
  const int lane = t & 31;
  T v = in[t];
  if ((mask >> lane) & 1u) {
    switch (op) {
      case 0:
        v = __shfl_sync(mask, v, b[t], width);
        break;
      case 1:
        v = __shfl_up_sync(mask, v, static_cast<unsigned>(b[t]), width);
        break;
      case 2:
        v = __shfl_down_sync(mask, v, static_cast<unsigned>(b[t]), width);
        break;
      default:
        v = __shfl_xor_sync(mask, v, b[t], width);
        break;
    }
  }
  out[t] = v;
}

__global__ void vote_kernel(const int* pred, int* out, unsigned mask) {
  const int t = static_cast<int>(threadIdx.x);
  if ((mask >> (t & 31)) & 1u) {
    out[3 * t] = static_cast<int>(__ballot_sync(mask, pred[t]));
    out[3 * t + 1] = __all_sync(mask, pred[t]);
    out[3 * t + 2] = __any_sync(mask, pred[t]);
  }
}

__global__ void atomics_kernel(int* counters, float* sums, unsigned wrap) {
  const int gt = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  atomicAdd(&counters[0], 1);
  atomicMax(&counters[1], gt);
  atomicMin(&counters[2], gt);
  int old = counters[3];
  for (;;) {
    const int seen = atomicCAS(&counters[3], old, old + 1);
    if (seen == old) break;
    old = seen;
  }
  atomicInc(reinterpret_cast<unsigned*>(&counters[4]), wrap);
  atomicExch(&counters[5], 7);
  atomicAdd(&sums[0], 1.0f);
}

__global__ void dynamic_smem_kernel(int* before, int* after) {
  int* s = dynamic_smem<int>();
  const int t = static_cast<int>(threadIdx.x);
  before[t] = s[t];
  __syncthreads();  // everyone has seen the initial contents before anyone writes
  s[t] = t;
  __syncthreads();
  after[t] = s[blockDim.x - 1 - t];
}

__global__ void order_kernel(int* out, int phases) {
  __shared__ int s_ticket;
  const int t = static_cast<int>(threadIdx.x);
  const int n = static_cast<int>(blockDim.x);
  int* row = out + static_cast<int64_t>(blockIdx.x) * phases * n;
  for (int p = 0; p < phases; ++p) {
    if (t == 0) s_ticket = 0;
    __syncthreads();
    const int ticket = atomicAdd(&s_ticket, 1);
    row[p * n + ticket] = t;
    __syncthreads();
  }
}

__global__ void activemask_kernel(unsigned* out) {
  const int t = static_cast<int>(threadIdx.x);
  if ((t & 31) % 3 == 0) {
    out[t] = __activemask();
  } else {
    out[t] = __activemask();
  }
}

}  // namespace

void probe_indices(std::uintptr_t out, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                   unsigned by, unsigned bz) {
  launch("probe_indices", indices_kernel, dim3(gx, gy, gz), dim3(bx, by, bz), 0, nullptr,
         ptr<int>(out));
}

void probe_barrier(std::uintptr_t out, std::uintptr_t pred, std::uintptr_t agg, int threads,
                   int phases) {
  launch("probe_barrier", barrier_kernel, dim3(1), dim3(threads), 0, nullptr, ptr<int>(out),
         ptr<const int>(pred), ptr<int>(agg), phases);
}

void probe_shuffle(int op, std::uintptr_t in, std::uintptr_t b, std::uintptr_t out, int threads,
                   unsigned mask, int width, int elem_bytes) {
  if (elem_bytes == 8) {
    launch("probe_shuffle", shuffle_kernel<unsigned long long>, dim3(1), dim3(threads), 0, nullptr,
           op, ptr<const unsigned long long>(in), ptr<const int>(b), ptr<unsigned long long>(out),
           mask, width);
  } else {
    launch("probe_shuffle", shuffle_kernel<unsigned>, dim3(1), dim3(threads), 0, nullptr, op,
           ptr<const unsigned>(in), ptr<const int>(b), ptr<unsigned>(out), mask, width);
  }
}

void probe_vote(std::uintptr_t pred, std::uintptr_t out, int threads, unsigned mask) {
  launch("probe_vote", vote_kernel, dim3(1), dim3(threads), 0, nullptr, ptr<const int>(pred),
         ptr<int>(out), mask);
}

void probe_atomics(std::uintptr_t counters, std::uintptr_t sums, int blocks, int threads,
                   unsigned wrap) {
  launch("probe_atomics", atomics_kernel, dim3(blocks), dim3(threads), 0, nullptr,
         ptr<int>(counters), ptr<float>(sums), wrap);
}

void probe_dynamic_smem(std::uintptr_t before, std::uintptr_t after, int threads) {
  launch("probe_dynamic_smem", dynamic_smem_kernel, dim3(1), dim3(threads), threads * sizeof(int),
         nullptr, ptr<int>(before), ptr<int>(after));
}

void probe_order(std::uintptr_t out, int blocks, int threads, int phases) {
  launch("probe_order", order_kernel, dim3(blocks), dim3(threads), 0, nullptr, ptr<int>(out),
         phases);
}

void probe_activemask(std::uintptr_t out, int threads) {
  launch("probe_activemask", activemask_kernel, dim3(1), dim3(threads), 0, nullptr,
         ptr<unsigned>(out));
}

}  // namespace emu_tests
}  // namespace qpeft
