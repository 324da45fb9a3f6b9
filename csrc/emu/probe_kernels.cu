// Probes of the emulated CUDA semantics (test_kernels.h), written as ordinary
// CUDA kernels and launched through qpeft::launch; compiled only into the
// emulation module. tests/test_cuda_emulation_harness.py holds their outputs to
// the CUDA programming guide's definitions.
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <utility>

#include "launch.h"
#include "ptx.h"
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

// 4-byte pair types: out[t] = __shfl_xor_sync(full, in[t] as __half2, 1),
// out[n + t] = __shfl_down_sync(full, in[t] as __nv_bfloat162, 3, 8), as bits.
__global__ void shuffle_pairs_kernel(const uint32_t* in, uint32_t* out) {
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  __half2 h;
  __nv_bfloat162 b;
  std::memcpy(static_cast<void*>(&h), &in[t], 4);
  std::memcpy(static_cast<void*>(&b), &in[t], 4);
  h = __shfl_xor_sync(0xffffffffu, h, 1);
  b = __shfl_down_sync(0xffffffffu, b, 3u, 8);
  std::memcpy(&out[t], static_cast<const void*>(&h), 4);
  std::memcpy(&out[n + t], static_cast<const void*>(&b), 4);
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

// --- csrc/cuda/ptx.h (tests/test_emu_ptx.py) ----------------------------------------
// Fragments are built here element by element from the PTX ISA's own formulas
// ("Matrix Fragments for mma.m16n8k16 with floating point type"), independently
// of the emulator's decoding: groupID = lane >> 2, threadID_in_group = lane % 4,
//   A: a_i (i = 0..7, two per register, low half first):
//      row = groupID for 0 <= i < 2 || 4 <= i < 6, else groupID + 8;
//      col = 2 threadID_in_group + (i & 1), + 8 for i >= 4;
//   B: b_i (i = 0..3): row = 2 threadID_in_group + (i & 1), + 8 for i >= 2; col = groupID;
//   C/D: c_i (i = 0..3): row = groupID for i < 2, else groupID + 8;
//        col = 2 threadID_in_group + (i & 1).
// One 16x8x16 tile per warp: A [tiles][16][16], B [tiles][16][8]
// (16-bit bit patterns), C and D [tiles][16][8] fp32.
template <typename T>
__global__ void mma_kernel(const uint16_t* a, const uint16_t* b, const float* c, float* d,
                           int tiles) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int warps = static_cast<int>((blockDim.x + 31) / 32);
  const int tile = static_cast<int>(blockIdx.x) * warps + static_cast<int>(threadIdx.x / 32);
  const int gid = lane >> 2, tig = lane % 4;
  if (tile >= tiles) return;  // whole warps only
  const uint16_t* at = a + tile * 256;
  const uint16_t* bt = b + tile * 128;
  uint32_t ar[4] = {0, 0, 0, 0}, br[2] = {0, 0};
  float cr[4], dr[4];
  for (int i = 0; i < 8; ++i) {
    const int row = ((i >= 0 && i < 2) || (i >= 4 && i < 6)) ? gid : gid + 8;
    const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
    ar[i / 2] |= static_cast<uint32_t>(at[row * 16 + col]) << (16 * (i % 2));
  }
  for (int i = 0; i < 4; ++i) {
    const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
    br[i / 2] |= static_cast<uint32_t>(bt[row * 8 + gid]) << (16 * (i % 2));
  }
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? gid : gid + 8;
    cr[i] = c[tile * 128 + row * 8 + tig * 2 + (i & 1)];
  }
  ptx::mma_m16n8k16<T>(dr, ar, br, cr);
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? gid : gid + 8;
    d[tile * 128 + row * 8 + tig * 2 + (i & 1)] = dr[i];
  }
}

// ldmatrix from shared memory holding 32 rows of 16 halves: matrix i's row r in
// row 8i + r, columns 0..7 (columns 8..15 are a second copy of the row, negated:
// reading them would show). Lane l's address is row (8 (l / 8) + l % 8) plus
// `offset` bytes; lanes the instruction ignores pass a misaligned, non-shared
// address. use_static: 0 dynamic shared memory, 1 a __shared__ array, 2 a local
// array (not shared memory). out[l * 5 + i] = register i of lane l, out[l * 5 + 4] = smem_addr of
// the lane's address minus smem_addr of the buffer.
template <int N, bool Trans>
__global__ void ldmatrix_kernel(const uint16_t* m, uint32_t* out, int offset, int use_static) {
  __shared__ __align__(16) uint16_t s_static[32 * 16];
  __align__(16) uint16_t local[32 * 16];  // use_static == 2: not shared memory (a bug)
  uint16_t* s = use_static == 1 ? s_static : (use_static == 2 ? local : dynamic_smem<uint16_t>());
  const int lane = static_cast<int>(threadIdx.x);
  for (int r = 0; r < 32; ++r) {
    if (lane < 8) {
      s[r * 16 + lane] = m[r * 8 + lane];
      s[r * 16 + 8 + lane] = static_cast<uint16_t>(m[r * 8 + lane] ^ 0x8000u);
    }
  }
  __syncthreads();
  const void* row = reinterpret_cast<const char*>(s + (8 * (lane / 8) + lane % 8) * 16) + offset;
  if (lane >= 8 * N) row = reinterpret_cast<const void*>(static_cast<uintptr_t>(3));
  uint32_t r[N];
  ptx::ldmatrix<N, Trans>(r, row);
  for (int i = 0; i < 4; ++i) out[lane * 5 + i] = i < N ? r[i] : 0u;
  out[lane * 5 + 4] = lane < 8 * N ? ptx::smem_addr(row) - ptx::smem_addr(s) : 0xffffffffu;
}

// cp.async in one warp: stage p (0..2) of thread t is the 16-byte slot
// s[(p * 32 + t) * 16..] (static or dynamic shared memory), filled from
// src[(p * 32 + t) * Bytes..] with src_bytes[t] bytes. snap[k][p][t][16] holds
// the thread's slots as read with plain loads (k = 0 after issuing and committing
// the three stages one group each, 1 after cp_async_wait<1>, 2 after
// cp_async_wait<0>). Modes other than 0 break a rule (tests/test_emu_ptx.py).
template <int Bytes>
__global__ void cp_async_kernel(const unsigned char* src, const int* src_bytes, unsigned char* snap,
                                int mode, int use_static) {
  __shared__ __align__(16) unsigned char s_static[3 * 32 * 16];
  unsigned char* s = use_static ? s_static : dynamic_smem<unsigned char>();
  const int t = static_cast<int>(threadIdx.x);
  if (use_static) {
    for (int i = 0; i < 3 * 16; ++i) s[t * 3 * 16 + i] = 0xee;  // as dynamic smem is poisoned
    __syncthreads();
  }
  auto snapshot = [&](int k) {
    for (int p = 0; p < 3; ++p) {
      for (int i = 0; i < 16; ++i) snap[((k * 3 + p) * 32 + t) * 16 + i] = s[(p * 32 + t) * 16 + i];
    }
  };
  alignas(16) unsigned char local[32];
  for (int p = 0; p < 3; ++p) {
    unsigned char* dst = s + (p * 32 + t) * 16;
    const unsigned char* from = src + (p * 32 + t) * Bytes;
    int n = src_bytes[t];
    if (mode == 3 && p == 1) dst += Bytes / 2;    // misaligned destination
    if (mode == 4 && p == 1) from += Bytes / 2;   // misaligned source
    if (mode == 5 && p == 1) n = Bytes + 1;       // src_bytes past the copy
    if (mode == 6 && p == 1) dst = local + 16;    // not shared memory
    if (mode == 8 && p == 1) from = s + 16 * 40;  // a shared source
    ptx::cp_async<Bytes>(dst, from, n);
    if (mode == 2 && p == 2) return;  // exits with an uncommitted copy
    ptx::cp_async_commit();
  }
  if (mode == 1) return;  // exits with three committed, un-waited groups
  snapshot(0);
  ptx::cp_async_wait<1>();
  snapshot(1);
  if (mode == 7) {  // ldmatrix of stage 2, still in flight
    uint32_t r[1];
    ptx::ldmatrix<1>(r, s + (2 * 32 + t % 8) * 16);
  }
  ptx::cp_async_wait<0>();
  snapshot(2);
}

template <int... L>
void lop3_all(uint32_t a, uint32_t b, uint32_t c, uint32_t* out, int stride,
              std::integer_sequence<int, L...>) {
  ((out[L * stride] = ptx::lop3<L>(a, b, c)), ...);
}

// out[lut * n + i] = lop3<lut>(a[i], b[i], c[i]) for all 256 tables;
// out2[i] = prmt(a[i], b[i], sel[i]).
__global__ void bitops_kernel(const uint32_t* a, const uint32_t* b, const uint32_t* c,
                              const uint32_t* sel, uint32_t* out, uint32_t* out2, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= n) return;
  lop3_all(a[i], b[i], c[i], out + i, n, std::make_integer_sequence<int, 256>());
  out2[i] = ptx::prmt(a[i], b[i], sel[i]);
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

void probe_shuffle_pairs(std::uintptr_t in, std::uintptr_t out, int threads) {
  launch("probe_shuffle_pairs", shuffle_pairs_kernel, dim3(1), dim3(threads), 0, nullptr,
         ptr<const uint32_t>(in), ptr<uint32_t>(out));
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

void probe_mma(int bf16, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d,
               int tiles, int threads) {
  const int warps = (threads + 31) / 32;
  const unsigned blocks = static_cast<unsigned>((tiles + warps - 1) / warps);
  if (bf16) {
    launch("probe_mma", mma_kernel<__nv_bfloat16>, dim3(blocks), dim3(threads), 0, nullptr,
           ptr<const uint16_t>(a), ptr<const uint16_t>(b), ptr<const float>(c), ptr<float>(d),
           tiles);
  } else {
    launch("probe_mma", mma_kernel<__half>, dim3(blocks), dim3(threads), 0, nullptr,
           ptr<const uint16_t>(a), ptr<const uint16_t>(b), ptr<const float>(c), ptr<float>(d),
           tiles);
  }
}

void probe_ldmatrix(int num, int trans, std::uintptr_t m, std::uintptr_t out, int offset,
                    int use_static) {
  void (*k)(const uint16_t*, uint32_t*, int, int) = nullptr;
  if (num == 1) k = trans ? ldmatrix_kernel<1, true> : ldmatrix_kernel<1, false>;
  if (num == 2) k = trans ? ldmatrix_kernel<2, true> : ldmatrix_kernel<2, false>;
  if (num == 4) k = trans ? ldmatrix_kernel<4, true> : ldmatrix_kernel<4, false>;
  if (k == nullptr) throw std::invalid_argument("probe_ldmatrix: num must be 1, 2 or 4");
  launch("probe_ldmatrix", k, dim3(1), dim3(32), use_static ? 0 : 32 * 16 * 2, nullptr,
         ptr<const uint16_t>(m), ptr<uint32_t>(out), offset, use_static);
}

void probe_cp_async(int bytes, std::uintptr_t src, std::uintptr_t src_bytes, std::uintptr_t snap,
                    int mode, int use_static) {
  void (*k)(const unsigned char*, const int*, unsigned char*, int, int) = nullptr;
  if (bytes == 4) k = cp_async_kernel<4>;
  if (bytes == 8) k = cp_async_kernel<8>;
  if (bytes == 16) k = cp_async_kernel<16>;
  if (k == nullptr) throw std::invalid_argument("probe_cp_async: bytes must be 4, 8 or 16");
  launch("probe_cp_async", k, dim3(1), dim3(32), use_static ? 0 : 3 * 32 * 16, nullptr,
         ptr<const unsigned char>(src), ptr<const int>(src_bytes), ptr<unsigned char>(snap), mode,
         use_static);
}

void probe_bitops(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t sel,
                  std::uintptr_t out, std::uintptr_t out2, int n) {
  launch("probe_bitops", bitops_kernel, dim3(static_cast<unsigned>((n + 63) / 64)), dim3(64), 0,
         nullptr, ptr<const uint32_t>(a), ptr<const uint32_t>(b), ptr<const uint32_t>(c),
         ptr<const uint32_t>(sel), ptr<uint32_t>(out), ptr<uint32_t>(out2), n);
}

}  // namespace emu_tests
}  // namespace qpeft
