// The bodies of the emulated warp-collective instructions of csrc/emu/emu_ptx.h,
// run once per warp by the lane that completes the warp exchange (runtime.cpp),
// over the 32 lanes' slots. Fragment layouts: PTX ISA, "Matrix Fragments for
// mma.m16n8k16 with floating point type" and "ldmatrix" (restated in
// csrc/cuda/ptx.h). Compiled without the bounds sanitizer (not a kernel source).
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "qpeft_cuda_emulation.h"
#include "emu_ptx.h"

namespace qpeft {
namespace emu {
namespace {

// fp16 -> fp32 through the toolkit's own host conversion, tabulated once.
struct HalfTable {
  float v[65536];
  HalfTable() {
    for (unsigned i = 0; i < 65536; ++i) {
      __half_raw r;
      r.x = static_cast<unsigned short>(i);
      v[i] = __half2float(__half(r));
    }
  }
};

float bf16_to_float(std::uint32_t bits16) {
  const std::uint32_t u = bits16 << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <bool kBf16>
void mma_complete(unsigned char* slots) {
  static const HalfTable* half = kBf16 ? nullptr : new HalfTable();  // never freed: process-wide
  auto dec = [](std::uint32_t bits16) {
    if constexpr (kBf16) {
      return bf16_to_float(bits16);
    } else {
      return half->v[bits16 & 0xffffu];
    }
  };
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    MmaSlot s;
    std::memcpy(&s, slots + l * sizeof(MmaSlot), sizeof s);
    const int g = l >> 2, t = l & 3;
    // A, row-major: a[0] = A[g][2t..], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
    // a[3] = A[g+8][2t+8..]; the lower-indexed element in the low half.
    for (int r = 0; r < 4; ++r) {
      const int row = g + ((r & 1) ? 8 : 0), col = 2 * t + ((r & 2) ? 8 : 0);
      A[row][col] = dec(s.a[r] & 0xffffu);
      A[row][col + 1] = dec(s.a[r] >> 16);
    }
    // B ("col"): b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g].
    for (int r = 0; r < 2; ++r) {
      const int row = 2 * t + 8 * r;
      B[row][g] = dec(s.b[r] & 0xffffu);
      B[row + 1][g] = dec(s.b[r] >> 16);
    }
    // C: c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1].
    C[g][2 * t] = s.c[0];
    C[g][2 * t + 1] = s.c[1];
    C[g + 8][2 * t] = s.c[2];
    C[g + 8][2 * t + 1] = s.c[3];
  }
  // Exact products (see emu_ptx.h), added to C in k order with fp32 rounding.
  float D[16][8];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      float acc = C[i][j];
      for (int k = 0; k < 16; ++k) acc += A[i][k] * B[k][j];
      D[i][j] = acc;
    }
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const float d[4] = {D[g][2 * t], D[g][2 * t + 1], D[g + 8][2 * t], D[g + 8][2 * t + 1]};
    std::memcpy(slots + l * sizeof(MmaSlot), d, sizeof d);
  }
}

std::string hex(std::uintptr_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

}  // namespace

void mma_m16n8k16_complete(unsigned char* slots, std::size_t bytes, int arg, const char* file,
                           int line) {
  if (bytes != sizeof(MmaSlot)) trap("mma_m16n8k16: bad exchange payload", file, line);
  if (arg) {
    mma_complete<true>(slots);
  } else {
    mma_complete<false>(slots);
  }
}

void ldmatrix_check_row(const void* row, int n, const char* name, const char* file, int line) {
  const int lane = lane_id();
  if (lane >= 8 * n) return;  // an address the instruction does not read
  const auto a = reinterpret_cast<std::uintptr_t>(row);
  if (a % 16 != 0) {
    const std::string msg = std::string(name) + ": lane " + std::to_string(lane) +
                            "'s row address " + hex(a) + " (matrix " + std::to_string(lane / 8) +
                            ", row " + std::to_string(lane % 8) + ") is not 16-byte aligned";
    trap(msg.c_str(), file, line);
  }
  check_shared(row, 16, name, file, line);
}

// Each slot holds its lane's row address; becomes the lane's N registers.
void ldmatrix_complete(unsigned char* slots, std::size_t bytes, int arg, const char* file,
                       int line) {
  const int n = arg & 7;
  const bool trans = (arg & 8) != 0;
  static const char* const kNames[2][5] = {
      {"", "ldmatrix.x1", "ldmatrix.x2", "", "ldmatrix.x4"},
      {"", "ldmatrix.x1.trans", "ldmatrix.x2.trans", "", "ldmatrix.x4.trans"}};
  const char* name = kNames[trans ? 1 : 0][n];
  if (bytes != 16) trap("ldmatrix: bad exchange payload", file, line);
  std::uint16_t m[4][8][8];  // [matrix][row][column] as stored
  for (int i = 0; i < n; ++i) {
    for (int r = 0; r < 8; ++r) {
      std::uint64_t addr;
      std::memcpy(&addr, slots + (8 * i + r) * bytes, sizeof addr);
      const void* p = reinterpret_cast<const void*>(static_cast<std::uintptr_t>(addr));
      check_shared_read(p, 16, name, file, line);
      std::memcpy(m[i][r], p, 16);
    }
  }
  for (int l = 0; l < 32; ++l) {
    std::uint32_t regs[4] = {0, 0, 0, 0};
    const int q = l >> 2, e = 2 * (l & 3);
    for (int i = 0; i < n; ++i) {
      // Lane l: row l/4, columns 2(l%4), 2(l%4)+1; .trans: column l/4, rows
      // 2(l%4), 2(l%4)+1. The lower-indexed element in the low half.
      const std::uint16_t lo = trans ? m[i][e][q] : m[i][q][e];
      const std::uint16_t hi = trans ? m[i][e + 1][q] : m[i][q][e + 1];
      regs[i] = static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
    }
    std::memcpy(slots + l * bytes, regs, sizeof regs);
  }
}

}  // namespace emu
}  // namespace qpeft
