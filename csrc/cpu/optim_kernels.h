// Internal interface between the optimizer entry points (optim.cpp) and the
// per-ISA optimizer kernels (optim_scalar.cpp, optim_avx2.cpp).
//
// A 32-bit kernel updates the elements [e0, e1); an 8-bit kernel the state
// blocks [b0, b1) (kStateBlock elements each, the last one possibly partial).
// optim.cpp has validated every size and pointer and splits the work over
// threads. Kernels never throw and never allocate.
//
// Like kernels.h this header defines no inline functions or templates of its
// own (the AVX2 TU includes it); qpeft/optim.h's functions are QPEFT_HD, which
// the AVX2 TU defines as `static inline` before including anything.
#pragma once

#include <qpeft/optim.h>

#include <cstdint>

namespace qpeft {
namespace cpu {

// Encoder of one 256-entry map (built and cached by optim.cpp).
struct StateCodec {
  float code[kNumCodes8];  // the map, sorted ascending
  float mid[kNumCodes8];   // (code[k] + code[k+1]) / 2 for k < 255; mid[255] = +inf (never below x)
  // 65536 entries, one per state_key(x) (see optim.h): bits 0-7 the count of
  // midpoints below the key's value range, bits 8-23 the low 16 bits of the one
  // midpoint inside the range (its high 16 bits are the key itself), or of the
  // range's largest value when none is inside, so that q = base + (m < x) with m
  // rebuilt from key and entry: one table load per value, no second lookup.
  // nullptr when some range holds two midpoints (the kernels then use the binary
  // search state_count_below).
  const uint32_t* table;
};

struct Adam32Args {
  void* param;
  const void* grad;
  int dtype;
  int64_t n;
  float* exp_avg;
  float* exp_avg_sq;
  AdamScalars s;
};

struct Adam8Args {
  void* param;
  const void* grad;
  int dtype;
  int64_t n;
  uint8_t* q1;  // first moment codes (signed map)
  float* absmax1;
  uint8_t* q2;  // second moment codes (unsigned map)
  float* absmax2;
  const StateCodec* c1;
  const StateCodec* c2;
  AdamScalars s;
};

struct Lion32Args {
  void* param;
  const void* grad;
  int dtype;
  int64_t n;
  float* exp_avg;
  LionScalars s;
};

struct Lion8Args {
  void* param;
  const void* grad;
  int dtype;
  int64_t n;
  uint8_t* q1;
  float* absmax1;
  const StateCodec* c1;
  LionScalars s;
};

struct OptimKernelTable {
  const char* name;
  void (*adam32)(const Adam32Args&, int64_t e0, int64_t e1);
  void (*adam8)(const Adam8Args&, int64_t b0, int64_t b1);
  void (*lion32)(const Lion32Args&, int64_t e0, int64_t e1);
  void (*lion8)(const Lion8Args&, int64_t b0, int64_t b1);
};

extern const OptimKernelTable kOptimScalarKernels;
// Entered at the avx2 level or above (cpu_info.h; x86 builds only).
extern const OptimKernelTable kOptimAvx2Kernels;
// AVX-512 F/BW/VL/DQ (x86 builds with QPEFT_HAVE_AVX512_TU); nullptr entries fall back
// to AVX2 (isa_tables.h).
extern const OptimKernelTable kOptimAvx512Kernels;

}  // namespace cpu
}  // namespace qpeft
