// The tensor-core and asynchronous-copy instructions the GEMM kernels use, as
// one C++ function each (the contract shared by the CUDA build and the emulator).
//
// The CUDA build implements each with its inline PTX. The emulation build
// (QPEFT_CUDA_EMULATION, csrc/emu) implements the same signatures on the CPU in
// csrc/emu/emu_ptx.h, following the PTX ISA's definitions: the fragment layouts
// of mma.m16n8k16 and ldmatrix, and cp.async's group semantics (a copy lands at
// the wait_group that retires its group, not before; shared memory read before
// that wait is reported). Kernels call only these functions for the
// instructions below, never inline PTX of their own, so the emulator runs the
// very code the GPU runs.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"; g = lane / 4, t = lane % 4; a register holds two 16-bit elements, the
// lower-indexed one in the low half):
//   A (16 x 16, row-major): a[0] = A[g][2t..2t+1],   a[1] = A[g+8][2t..2t+1],
//                           a[2] = A[g][2t+8..2t+9], a[3] = A[g+8][2t+8..2t+9]
//   B (16 x 8, "col"):      b[0] = B[2t..2t+1][g],   b[1] = B[2t+8..2t+9][g]
//   C, D (16 x 8, fp32):    c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
#pragma once

#include <cstdint>

#include "launch.h"  // first: in the emulation build it defines the CUDA builtins

#if defined(QPEFT_CUDA_EMULATION)
#include "emu_ptx.h"
#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace qpeft {
namespace ptx {

// d = a * b + c on one m16n8k16 tile, T = __nv_bfloat16 or __half inputs, fp32
// accumulation. Warp-collective: every lane of the warp must call it together.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value,
                "mma_m16n8k16 takes bf16 or fp16 inputs");
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]),
          "f"(c[2]), "f"(c[3]));
  }
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix.sync.aligned.m8n8.x{N}[.trans].shared.b16: N = 1, 2 or 4 8x8 matrices
// of 16-bit elements. Lanes 8i..8i+7 give the addresses of matrix i's rows (16
// bytes each, 16-byte aligned, in shared memory); r[i] receives, in lane l,
// matrix i's row l/4, elements 2(l%4)..2(l%4)+1 (with Trans: column l/4, rows
// 2(l%4)..2(l%4)+1). Warp-collective.
template <int N, bool Trans = false>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const uint32_t addr = smem_addr(row);
  if constexpr (N == 1) {
    if constexpr (Trans) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                   : "=r"(r[0])
                   : "r"(addr));
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
                   : "=r"(r[0])
                   : "r"(addr));
    }
  } else if constexpr (N == 2) {
    if constexpr (Trans) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                   : "=r"(r[0]), "=r"(r[1])
                   : "r"(addr));
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                   : "=r"(r[0]), "=r"(r[1])
                   : "r"(addr));
    }
  } else {
    if constexpr (Trans) {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(addr));
    } else {
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(addr));
    }
  }
}

// cp.async of Bytes (4, 8 or 16) from global to shared memory, both aligned to
// Bytes; only the first src_bytes (0..Bytes) are read, the rest of dst is
// zero-filled (PTX's src-size operand: partial tiles load without branches).
// 16-byte copies bypass L1 (.cg). Per thread; the copy is not visible until
// cp_async_wait retires its group.
template <int Bytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes = Bytes) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  const uint32_t d = smem_addr(dst);
  if constexpr (Bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src),
                 "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(Bytes),
                 "r"(src_bytes));
  }
}

// Closes this thread's group of cp.async issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most N of this thread's committed groups are still pending.
// Other threads' copies need a __syncthreads() after their own wait.
// The "memory" clobber makes the wait a compiler barrier: shared-memory loads of
// the copied bytes after it are not hoisted above it.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// lop3.b32: any three-input bitwise function, given by its truth table Lut
// (the result bit is Lut's bit (a << 2 | b << 1 | c) of the inputs' bits; e.g.
// (a & b) | c is 0xf8 = (0xf0 & 0xcc) | 0xaa).
template <int Lut>
__device__ __forceinline__ uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(Lut >= 0 && Lut <= 0xff, "lop3 takes an 8-bit truth table");
  uint32_t d;
  asm volatile("lop3.b32 %0, %1, %2, %3, %4;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c), "n"(Lut));
  return d;
}

// prmt.b32 (default mode): byte i of the result is byte (sel >> 4i) & 7 of the
// 8-byte value {b, a}, or that byte's sign replicated when bit 3 of the
// selector nibble is set. (__byte_perm is the same without the sign mode.)
__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm volatile("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}

}  // namespace ptx
}  // namespace qpeft

#endif  // QPEFT_CUDA_EMULATION
