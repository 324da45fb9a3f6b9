// Test-only kernels of qpeft._C_cuda_emu (module `testing`), compiled only in the
// emulation build: probes of the emulated CUDA semantics (probe_kernels.cu) and
// planted bugs next to their correct twins (planted_bugs.cu). Plain C++: raw
// pointers as uintptr_t to CPU memory the tests allocate with torch.
#pragma once

#include <cstdint>

namespace qpeft {
namespace emu_tests {

// Each thread writes 12 int32: threadIdx, blockIdx, blockDim, gridDim (x, y, z
// each) at row (linear block) * threads + linear thread. out: blocks*threads*12.
void probe_indices(std::uintptr_t out, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                   unsigned by, unsigned bz);

// One block of `threads`. For each of `phases` phases every thread increments a
// __shared__ counter, waits at __syncthreads() and records the counter
// (out[p * threads + t], int32); then __syncthreads_count/and/or of pred[t]
// (int32) go to agg[0..2].
void probe_barrier(std::uintptr_t out, std::uintptr_t pred, std::uintptr_t agg, int threads,
                   int phases);

// One block of `threads`: lanes in `mask` call shuffle `op` (0 idx, 1 up, 2
// down, 3 xor) on in[t] with operand b[t] (int32) and `width`; others copy
// in[t]. elem_bytes: 4 (uint32) or 8 (uint64).
void probe_shuffle(int op, std::uintptr_t in, std::uintptr_t b, std::uintptr_t out, int threads,
                   unsigned mask, int width, int elem_bytes);

// __half2 / __nv_bfloat162 shuffles: out[t] = in[t ^ 1] (xor 1), out[threads + t]
// = in[t + 3] within 8-lane segments (down 3, width 8), as uint32 bits.
void probe_shuffle_pairs(std::uintptr_t in, std::uintptr_t out, int threads);

// Lanes in `mask` vote on pred[t]: out[3t..3t+2] = ballot, all, any (int32).
void probe_vote(std::uintptr_t pred, std::uintptr_t out, int threads, unsigned mask);

// `blocks` x `threads` threads hammer atomics: counters int32[6] =
// {add 1, max tid, min tid, CAS increment, inc with wrap at `wrap`, exch}, and
// sums float32[1] of +1.0 (exact in fp32 below 2^24).
void probe_atomics(std::uintptr_t counters, std::uintptr_t sums, int blocks, int threads,
                   unsigned wrap);

// One block: before[t] = dynamic smem word t as found (poisoned); then every
// thread writes t, __syncthreads(), after[t] = word (threads - 1 - t). int32.
void probe_dynamic_smem(std::uintptr_t before, std::uintptr_t after, int threads);

// Execution order: at each phase every thread takes a ticket from a __shared__
// counter and writes its id at out[p * threads + ticket] (int32, `blocks`
// blocks, one row of phases*threads each).
void probe_order(std::uintptr_t out, int blocks, int threads, int phases);

// out[t] = __activemask() called in one of two branches (lane % 3 == 0 or not).
void probe_activemask(std::uintptr_t out, int threads);

// csrc/cuda/ptx.h's instructions (tests/test_emu_ptx.py).
// mma_m16n8k16 on `tiles` tiles, fragments built by the PTX ISA's formulas:
// d[t] = a[t] (16x16) @ b[t] (16x8) + c[t]; a, b: 16-bit patterns (bf16 != 0:
// bf16, else fp16), c, d: fp32. Blocks of `threads` threads, a tile per warp.
void probe_mma(int bf16, std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t d,
               int tiles, int threads);
// ldmatrix.x{num}[.trans] of 4 8x8 matrices m (uint16 [4][8][8]) placed in shared
// memory (dynamic, or a __shared__ array); out: uint32 [32][5] (see the kernel).
void probe_ldmatrix(int num, int trans, std::uintptr_t m, std::uintptr_t out, int offset,
                    int use_static);
// cp.async<bytes> in three groups; snap: uint8 [3][3][32][16] (see the kernel).
void probe_cp_async(int bytes, std::uintptr_t src, std::uintptr_t src_bytes, std::uintptr_t snap,
                    int mode, int use_static);
// out[lut * n + i] = lop3<lut>(a[i], b[i], c[i]); out2[i] = prmt(a[i], b[i], sel[i]).
void probe_bitops(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t sel,
                  std::uintptr_t out, std::uintptr_t out2, int n);

// Planted bugs: bug == 0 runs the correct twin, bug == 1 the planted bug.
// Each computes something the test checks against torch.
void bug_block_index(std::uintptr_t in, std::uintptr_t out, std::int64_t n,
                     int bug);  // out = 2 * in
void bug_divergent_barrier(std::uintptr_t in, std::uintptr_t out, int blocks,
                           int bug);  // per-block sums of 256
void bug_missing_barrier(std::uintptr_t in, std::uintptr_t out, int blocks,
                         int bug);                                               // reverse each 256
void bug_shuffle_lane(std::uintptr_t in, std::uintptr_t out, int bug);           // sum of in[0..16)
void bug_shuffle_missing_lanes(std::uintptr_t in, std::uintptr_t out, int bug);  // sum of in[0..16)
void bug_deadlock(std::uintptr_t in, std::uintptr_t out, int bug);               // sum of in[0..32)
void bug_spin_wait(std::uintptr_t out, int bug);                                 // out[0..64) = 1
void bug_warp_sync(std::uintptr_t in, std::uintptr_t out, int blocks, int bug);  // per-warp sums
void bug_smem_oob(std::uintptr_t in, std::uintptr_t out, int bug);               // out = in (128)
void bug_dynamic_smem_oob(std::uintptr_t in, std::uintptr_t out, int bug);       // out = in (128)
// c (16 x 8, fp32) = a (16 x k, bf16) @ b (k x 8, bf16), fragments loaded from
// global memory; bug 1 swaps a[1] and a[2], 2 lets only lanes 0-15 call the mma,
// 3 calls it from two source lines.
void bug_mma_layout(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, int k, int bug);
// A 3-stage cp.async pipeline in two warps: c (16 x 16, fp32) = a (16 x k) @ b
// (k x 16) in warp 0 and ct = c^T in warp 1 (bf16 inputs). bug 1 drops the
// cp_async_wait, bug 2 the __syncthreads() after it.
void bug_cp_async_pipeline(std::uintptr_t a, std::uintptr_t b, std::uintptr_t c, std::uintptr_t ct,
                           int k, int blocks, int bug);

}  // namespace emu_tests
}  // namespace qpeft
