// The kernels each ISA level runs (dispatch.cpp builds one table per level, once).
//
// Each ISA translation unit exports its own table (kernels.h, optim_kernels.h,
// gemv_kernels.h); an entry it leaves nullptr (an op where its kernel measured no faster
// than the level below: docs/design.md, "CPU ISA dispatch") falls back to the next lower
// level that has one. Like kernels.h, declarations only.
#pragma once

#include <cstdint>

#include "gemv_kernels.h"
#include "kernels.h"
#include "optim_kernels.h"

namespace qpeft {
namespace cpu {

using Gemv4Fn = void (*)(const Gemv4Args&, int64_t n0, int64_t n1);

// The ops with per-ISA kernels, in the order of IsaKernels::source.
constexpr int kNumIsaOps = 9;
extern const char* const kIsaOpNames[kNumIsaOps];

struct IsaKernels {
  int level;
  KernelTable quant;
  OptimKernelTable optim;
  Gemv4Fn gemv;            // for k % blocksize == 0 and blocksize >= 32 (else gemv4_scalar)
  int source[kNumIsaOps];  // the level of the TU each op's kernel comes from
};

// The table of active_level() (cpu_info.h); throws like it on an invalid QPEFT_CPU_ISA.
const IsaKernels& isa_kernels();
// The table of a given level (0 <= level < kNumIsaLevels).
const IsaKernels& isa_kernels_at(int level);
// Whether this build holds a TU for the level's own kernels (x86 builds: scalar, avx2,
// avx512; the levels above reuse avx512's for these ops).
bool isa_level_built(int level);
// Whether this build holds the level's own fused bf16 GEMM on packed 4-bit W
// (avx512_bf16: qgemm_avx512bf16.cpp, amx: qgemm_amx.cpp; no other level has one).
bool bf16_gemm_built(int level);

}  // namespace cpu
}  // namespace qpeft
