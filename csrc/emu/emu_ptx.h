// The emulation of csrc/cuda/ptx.h: the same functions, with the same call
// signatures (plus trailing defaulted call-site parameters, as the emulation
// header's collectives), following the PTX ISA's definitions. csrc/cuda/ptx.h
// includes this file instead of its inline PTX when QPEFT_CUDA_EMULATION is
// defined (after launch.h, i.e. qpeft_cuda_emulation.h).
//
//  * mma_m16n8k16<T> and ldmatrix<N, Trans> are warp-collective: every lane of a
//    complete warp must call them from the same source line (else a reported
//    error, like a shuffle with a missing lane). The operands of all 32 lanes are
//    gathered by one warp exchange (runtime.cpp) and the instruction runs once,
//    in the last lane to arrive, with no other thread running in between.
//  * mma_m16n8k16: D = A * B + C on the fragments of ptx.h's comment (PTX ISA,
//    "Matrix Fragments for mma.m16n8k16 with floating point type"). Each product
//    of two bf16 or two fp16 values is exact in fp32 (8 x 8 or 11 x 11
//    significant bits <= 24; barring fp32 overflow or underflow of the product),
//    and each D element is computed as acc = C; acc += A[i][k] * B[k][j] for
//    k = 0..15 in order, each addition rounded to nearest even in fp32. The ISA
//    does not specify the tensor cores' summation order or internal rounding
//    (they differ by a few fp32 ulps per k-step), so kernels are tested against
//    error bounds, never against the emulator's bit patterns.
//  * ldmatrix: lanes 8i..8i+7 give matrix i's row addresses (x1: lanes 0-7, x2:
//    lanes 0-15 are read; the others' addresses are ignored, as in PTX). Each
//    used address must be 16-byte aligned and its 16 bytes shared memory (the
//    launch's dynamic shared memory or a __shared__ variable); reading bytes a
//    cp.async of any thread of the block still writes is reported.
//  * cp_async: a per-thread queue of copies grouped by cp_async_commit; a copy
//    lands (src_bytes read, the rest zero-filled) at the cp_async_wait that
//    retires its group, the latest moment PTX allows. Until then the
//    destination holds 0xff bytes (a plain read before the wait sees NaN / -1)
//    and is marked in flight: ldmatrix of it raises naming both lines. dst and
//    src must be aligned to Bytes, dst shared, src not; a thread that exits with
//    copies in flight (uncommitted or un-waited) is an error.
//  * lop3, prmt (default mode, with the sign-replicate bit) and smem_addr are
//    plain functions. smem_addr gives an offset in the emulated shared window
//    (dynamic shared memory from 0); only differences of such values mean
//    anything, as on the device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace qpeft {
namespace emu {

// The instructions' bodies, run by the completing lane (csrc/emu/ptx_runtime.cpp).
// arg: 1 for bf16 inputs, 0 for fp16.
void mma_m16n8k16_complete(unsigned char* slots, std::size_t bytes, int arg, const char* file,
                           int line);
// Raises unless the calling lane's row address is unused (lane >= 8 n) or
// 16-byte aligned shared memory.
void ldmatrix_check_row(const void* row, int n, const char* name, const char* file, int line);
// arg: the number of matrices, | 8 for .trans.
void ldmatrix_complete(unsigned char* slots, std::size_t bytes, int arg, const char* file,
                       int line);

struct MmaSlot {  // one lane's operands; its D overwrites the first 16 bytes
  std::uint32_t a[4];
  std::uint32_t b[2];
  float c[4];
};
static_assert(sizeof(MmaSlot) == 40, "packed mma operands");

}  // namespace emu

namespace ptx {

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                         const float (&c)[4], const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value,
                "mma_m16n8k16 takes bf16 or fp16 inputs");
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  emu::MmaSlot s;
  std::memcpy(s.a, a, sizeof s.a);
  std::memcpy(s.b, b, sizeof s.b);
  std::memcpy(s.c, c, sizeof s.c);  // before d is written: d may alias c
  const emu::WarpExchange x =
      emu::warp_exchange(kBf16 ? "mma_m16n8k16<bf16>" : "mma_m16n8k16<fp16>", &s, sizeof s,
                         &emu::mma_m16n8k16_complete, kBf16 ? 1 : 0, file, line);
  std::memcpy(d, x.slots + static_cast<std::size_t>(x.lane) * sizeof s, sizeof(float) * 4);
}

inline uint32_t smem_addr(const void* p, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return emu::shared_address(p, file, line);
}

template <int N, bool Trans = false>
inline void ldmatrix(uint32_t (&r)[N], const void* row, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  constexpr const char* kNames[2][3] = {
      {"ldmatrix.x1", "ldmatrix.x2", "ldmatrix.x4"},
      {"ldmatrix.x1.trans", "ldmatrix.x2.trans", "ldmatrix.x4.trans"}};
  constexpr const char* kName = kNames[Trans ? 1 : 0][N == 1 ? 0 : (N == 2 ? 1 : 2)];
  emu::ldmatrix_check_row(row, N, kName, file, line);
  std::uint64_t payload[2] = {static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(row)), 0};
  const emu::WarpExchange x = emu::warp_exchange(
      kName, payload, sizeof payload, &emu::ldmatrix_complete, N | (Trans ? 8 : 0), file, line);
  std::memcpy(r, x.slots + static_cast<std::size_t>(x.lane) * sizeof payload, sizeof(uint32_t) * N);
}

template <int Bytes>
inline void cp_async(void* dst, const void* src, int src_bytes = Bytes,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(Bytes == 4 || Bytes == 8 || Bytes == 16, "cp.async copies 4, 8 or 16 bytes");
  emu::cp_async(dst, src, Bytes, src_bytes, file, line);
}

inline void cp_async_commit(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::cp_async_commit(file, line);
}

template <int N>
inline void cp_async_wait(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(N >= 0, "cp.async.wait_group takes a count >= 0");
  emu::cp_async_wait(N, file, line);
}

// The result bit is Lut's bit (a << 2 | b << 1 | c): the OR of the minterms set.
template <int Lut>
inline uint32_t lop3(uint32_t a, uint32_t b, uint32_t c) {
  static_assert(Lut >= 0 && Lut <= 0xff, "lop3 takes an 8-bit truth table");
  uint32_t d = 0;
  for (int i = 0; i < 8; ++i) {
    if ((Lut >> i) & 1) d |= ((i & 4) ? a : ~a) & ((i & 2) ? b : ~b) & ((i & 1) ? c : ~c);
  }
  return d;
}

// prmt.b32, default mode: selector nibble i (bits 4i..4i+3 of sel; the upper 16
// bits are ignored) picks byte (nibble & 7) of {b, a}; with bit 3 set, that
// byte's sign bit replicated.
inline uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  const std::uint64_t v = (static_cast<std::uint64_t>(b) << 32) | a;
  uint32_t d = 0;
  for (int i = 0; i < 4; ++i) {
    const unsigned n = (sel >> (4 * i)) & 0xfu;
    uint32_t byte = static_cast<uint32_t>(v >> (8 * (n & 7u))) & 0xffu;
    if (n & 8u) byte = (byte & 0x80u) ? 0xffu : 0u;
    d |= byte << (8 * i);
  }
  return d;
}

}  // namespace ptx
}  // namespace qpeft
