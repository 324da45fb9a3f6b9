// Internal interface between the CPU entry points (dispatch.cpp) and the
// per-ISA kernel translation units (kernels_scalar.cpp, kernels_avx2.cpp,
// kernels_avx512.cpp).
//
// A kernel processes the half-open block range [b0, b1) of one call; the
// dispatcher has validated every size and pointer before, and splits the blocks
// over threads. Kernels never throw and never allocate.
//
// This header must stay free of inline functions and templates: it is included by
// the AVX2 TU, and any COMDAT it instantiated there could be the copy the linker
// keeps for the scalar TU too.
#pragma once

#include <cstdint>

namespace qpeft {
namespace cpu {

struct Quant4Args {
  const void* x;
  int x_dtype;
  int64_t n;
  int64_t blocksize;
  int quant_type;
  uint8_t* packed;
  float* absmax;
};

struct Dequant4Args {
  const uint8_t* packed;
  int64_t n;
  int64_t blocksize;
  int quant_type;
  void* out;
  int out_dtype;
  // Plain absmax (absmax_q == nullptr) or double-quantized absmax:
  // absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset.
  const float* absmax;
  const uint8_t* absmax_q;
  const float* nested_absmax;
  const float* nested_code;
  float offset;
  int64_t nested_blocksize;
};

struct Quant8Args {
  const void* x;
  int x_dtype;
  int64_t n;
  int64_t blocksize;
  const uint8_t* lut;  // kLutBins entries + 3 bytes of padding (32-bit gathers)
  uint8_t* q;
  float* absmax;
};

struct Dequant8Args {
  const uint8_t* q;
  const float* absmax;
  const float* code;
  int64_t n;
  int64_t blocksize;
  void* out;
  int out_dtype;
};

struct KernelTable {
  const char* name;
  void (*quantize_4bit)(const Quant4Args&, int64_t b0, int64_t b1);
  void (*dequantize_4bit)(const Dequant4Args&, int64_t b0, int64_t b1);
  void (*quantize_blockwise)(const Quant8Args&, int64_t b0, int64_t b1);
  void (*dequantize_blockwise)(const Dequant8Args&, int64_t b0, int64_t b1);
};

// Scalar kernels: the reference, any blocksize. quantize_4bit with an odd
// blocksize writes bytes shared by two blocks, so the dispatcher runs it on one
// thread then.
extern const KernelTable kScalarKernels;

// AVX2/FMA/F16C kernels (entered at the avx2 level or above, cpu_info.h; only built on
// x86, where CMake defines QPEFT_HAVE_AVX2_TU). They require an
// even blocksize for the 4-bit kernels (blocks start on a byte boundary); the
// dispatcher uses the scalar kernels otherwise.
extern const KernelTable kAvx2Kernels;

// AVX-512 (F/BW/VL/DQ) kernels, same contract as the AVX2 ones (x86 builds with
// QPEFT_HAVE_AVX512_TU). A nullptr entry means the AVX2 kernel is used at this level
// (isa_tables.h).
extern const KernelTable kAvx512Kernels;

}  // namespace cpu
}  // namespace qpeft
