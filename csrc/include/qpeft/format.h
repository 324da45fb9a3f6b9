// qpeft quantization formats: the tables and the per-element math shared by the
// CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
//
// Everything here is mirrored by qpeft/_formats.py (and the Triton kernels read
// it from there); tests/test_formats.py checks that the two agree bit for bit,
// through qpeft._C.format_tables() (csrc/bindings/cpu_module.cpp), which returns
// these tables and constants (a new constant goes there and into that test).
// The semantics are those of docs/design.md ("Formats") and are bit-compatible
// with bitsandbytes >= 0.45:
//
//  * 4-bit encode: v = x * (1 / max(absmax, 1e-38)) in fp32 (in the last block,
//    when it is partial, v = x / max(absmax, 1e-38): bitsandbytes' CPU path
//    divides there and the two differ by an ulp now and then), clamped to [-1, 1];
//    the code index is the number of midpoints m of the sorted table with
//    !(v <= m), i.e. a value exactly on a midpoint takes the lower code and NaN
//    takes the top code (what torch.bucketize does). FP4 has two zeros; its
//    sorted order keeps code 0 (+0) before code 8 (-0), as a stable sort does.
//  * 8-bit blockwise encode (double quantization, optimizer state): the
//    65536-bin lookup of bitsandbytes' CPU path. v = x * (1 / absmax) is mapped
//    to the bin round(((v + 1) * 0.5) * 65535) and the bin's grid value
//    -1 + 2 * bin / 65535 picks the nearest code by the midpoint rule. This
//    equals "nearest code" except within 1/65535 of a midpoint, and it is what
//    makes nested codes identical to the ones bitsandbytes writes on CPU.
//    An all-zero block encodes to index 0.
//  * Every product/sum is rounded on its own: build with -ffp-contract=off
//    (host) and --fmad=false (device); a fused multiply-add changes bits.
#pragma once

#include <cstdint>

// A translation unit may define QPEFT_HD itself before including this header:
// the AVX2 TU of the CPU build uses `static inline` so that out-of-line copies of
// these functions compiled with -mavx2 get internal linkage and can never be the
// COMDAT copy the linker hands to the scalar TU (an illegal instruction on a CPU
// without AVX2).
#if defined(__CUDACC__)
#ifndef QPEFT_HD
#define QPEFT_HD __host__ __device__ __forceinline__
#endif
#define QPEFT_UNROLL _Pragma("unroll")
#else
#ifndef QPEFT_HD
#define QPEFT_HD inline
#endif
#define QPEFT_UNROLL
#endif

namespace qpeft {

enum QuantType : int { kFP4 = 1, kNF4 = 2 };
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr int kNumCodes4 = 16;
constexpr int kNumCodes8 = 256;
constexpr int kLutBins = 65536;
constexpr float kAbsmaxFloor = 1e-38f;  // bitsandbytes clamps absmax to this before 1/absmax

// Blocksizes of the formats: the powers of two 2^5 = 32 .. 2^12 = 4096 (what
// bitsandbytes supports; the CUDA kernels are built for exactly these).
constexpr int kBlocksizeLog2Min = 5;
constexpr int kBlocksizeLog2Max = 12;

// Most rows of x the decode GEMV (qpeft::gemv_4bit) takes: the CUDA kernel is
// instantiated once per row count 1..kGemvMaxRows, and the CPU QLoRA forward
// switches to it at or below this M.
constexpr int kGemvMaxRows = 8;

// Value of each 4-bit code (index = code).
#define QPEFT_NF4_VALUES                                                                     \
  -1.0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f, -0x1.23449ap-2f, -0x1.7a6a7ep-3f,  \
      -0x1.74f0e2p-4f, 0.0f, 0x1.45f5fep-4f, 0x1.4995c6p-3f, 0x1.f809bap-3f, 0x1.5a0674p-2f, \
      0x1.c3497p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 1.0f

// [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8, -12, -4, -6, -2, -3] / 12 in fp32,
// with code 8 ("-0") stored as +0.0 as in bitsandbytes' table.
#define QPEFT_FP4_VALUES                                                                         \
  0.0f, 0x1.555556p-8f, 0x1.555556p-1f, 1.0f, 0x1.555556p-2f, 0.5f, 0x1.555556p-3f, 0.25f, 0.0f, \
      -0x1.555556p-8f, -0x1.555556p-1f, -1.0f, -0x1.555556p-2f, -0.5f, -0x1.555556p-3f, -0.25f

// Codes in ascending order of value (stable for FP4's +0/-0 pair).
#define QPEFT_NF4_ORDER 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15
#define QPEFT_FP4_ORDER 11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3

// (Named *Values: kNF4 / kFP4 are the QuantType enumerators above.)
constexpr float kNF4Values[kNumCodes4] = {QPEFT_NF4_VALUES};
constexpr float kFP4Values[kNumCodes4] = {QPEFT_FP4_VALUES};
constexpr uint8_t kNF4Order[kNumCodes4] = {QPEFT_NF4_ORDER};
constexpr uint8_t kFP4Order[kNumCodes4] = {QPEFT_FP4_ORDER};

// Midpoints of adjacent codes in sorted order, (a + b) / 2 in fp32 arithmetic
// exactly as torch computes (code[:-1] + code[1:]) / 2.
constexpr float midpoint(float a, float b) {
  return (a + b) / 2.0f;
}

#define QPEFT_MIDPOINTS(V, O)                                                                \
  {midpoint(V[O[0]], V[O[1]]),   midpoint(V[O[1]], V[O[2]]),   midpoint(V[O[2]], V[O[3]]),   \
   midpoint(V[O[3]], V[O[4]]),   midpoint(V[O[4]], V[O[5]]),   midpoint(V[O[5]], V[O[6]]),   \
   midpoint(V[O[6]], V[O[7]]),   midpoint(V[O[7]], V[O[8]]),   midpoint(V[O[8]], V[O[9]]),   \
   midpoint(V[O[9]], V[O[10]]),  midpoint(V[O[10]], V[O[11]]), midpoint(V[O[11]], V[O[12]]), \
   midpoint(V[O[12]], V[O[13]]), midpoint(V[O[13]], V[O[14]]), midpoint(V[O[14]], V[O[15]])}

constexpr float kNF4Mid[kNumCodes4 - 1] = QPEFT_MIDPOINTS(kNF4Values, kNF4Order);
constexpr float kFP4Mid[kNumCodes4 - 1] = QPEFT_MIDPOINTS(kFP4Values, kFP4Order);

static_assert(kNF4Mid[6] < 0.0f && kNF4Mid[7] > 0.0f, "NF4 midpoints must bracket zero");
static_assert(kFP4Mid[7] == 0.0f, "FP4 +0/-0 midpoint is zero");
static_assert(sizeof(float) == 4 && sizeof(uint16_t) == 2, "format sizes");

// ----------------------------------------------------------------------------
// Scalar per-element math. Tables are passed in so that device code can keep
// them in shared or constant memory while host code uses the constexpr arrays.

// Normalise x by its block's absmax as bitsandbytes does: x * (1 / absmax),
// with absmax floored at 1e-38 and the result clamped to [-1, 1]; NaN stays NaN.
// The floor must let a NaN absmax through (torch.clamp(min=) propagates NaN), so
// that every element of a block holding a NaN normalises to NaN and takes the top
// sorted code, as bitsandbytes writes; `absmax > floor ? absmax : floor` would
// turn NaN into 1/1e-38 = 1e38 instead.
QPEFT_HD float inv_absmax4(float absmax) {
  return 1.0f / (absmax < kAbsmaxFloor ? kAbsmaxFloor : absmax);
}
// Scale of a block for the 4-bit encoder: either 1/absmax to multiply by (full
// blocks), or absmax itself to divide by (a partial last block), see above.
// NaN passes through (NaN < floor is false), as torch.clamp(min=) lets it.
QPEFT_HD float floor_absmax4(float absmax) {
  return absmax < kAbsmaxFloor ? kAbsmaxFloor : absmax;
}
QPEFT_HD float normalize4(float x, float absmax_floored, float inv, bool partial_block) {
  return partial_block ? x / absmax_floored : x * inv;
}
QPEFT_HD float clamp_unit(float v) {
  // NaN compares false both ways and passes through, as torch.clamp does.
  return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
}

// Index (in sorted order) of the nearest code: #{k : !(v <= mid[k])}.
QPEFT_HD int sorted_index4(float v, const float* mid) {
  int idx = 0;
  QPEFT_UNROLL
  for (int k = 0; k < kNumCodes4 - 1; ++k) idx += !(v <= mid[k]);
  return idx;
}

// 4-bit code of an already-normalised value.
QPEFT_HD uint8_t encode4(float v, const float* mid, const uint8_t* order) {
  return order[sorted_index4(clamp_unit(v), mid)];
}

QPEFT_HD uint8_t pack_pair(uint8_t hi, uint8_t lo) {
  return static_cast<uint8_t>((hi << 4) | lo);
}

// Padding nibble of an odd-length tensor: the code of 0.0.
QPEFT_HD uint8_t zero_code4(int quant_type) {
  return quant_type == kNF4 ? 7 : 0;
}

// 8-bit lookup: grid value of a bin, and the bin of a normalised value.
QPEFT_HD float lut_grid_value(int bin) {
  return -1.0f + (2.0f * static_cast<float>(bin)) / 65535.0f;
}
QPEFT_HD int lut_bin(float v) {
  if (!(v == v)) return 0;  // NaN (only reachable with non-finite input)
  v = clamp_unit(v);
  return static_cast<int>(((v + 1.0f) * 0.5f) * 65535.0f + 0.5f);
}

// Code chosen for a grid value: #{k : mid[k] < g} over the 255 midpoints of a
// sorted 256-entry code (binary search; the CPU path tabulates it once per code).
QPEFT_HD int code8_for_grid(float g, const float* mid8) {
  int lo = 0, hi = kNumCodes8 - 1;  // answer in [0, 255]
  while (lo < hi) {
    int m = (lo + hi) >> 1;
    if (mid8[m] < g)
      lo = m + 1;
    else
      hi = m;
  }
  return lo;
}

// ----------------------------------------------------------------------------
// fp16 / bf16 conversions, bit-exact with torch's .to() for finite values
// (round to nearest even, subnormals kept); NaN becomes a quiet NaN.

QPEFT_HD uint32_t f32_bits(float f) {
  union {
    float f;
    uint32_t u;
  } c;
  c.f = f;
  return c.u;
}
QPEFT_HD float bits_f32(uint32_t u) {
  union {
    float f;
    uint32_t u;
  } c;
  c.u = u;
  return c.f;
}

QPEFT_HD float bf16_to_f32(uint16_t h) {
  return bits_f32(static_cast<uint32_t>(h) << 16);
}

QPEFT_HD uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  uint32_t bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + bias) >> 16);
}

QPEFT_HD float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  // inf, or NaN made quiet (bit 22) as F16C's vcvtph2ps and torch do
  if (exp == 0x1fu) return bits_f32(sign | 0x7f800000u | (man << 13) | (man != 0 ? 0x400000u : 0u));
  if (exp != 0) return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
  if (man == 0) return bits_f32(sign);
  // subnormal half: value = man * 2^-24, exact in fp32
  float v = static_cast<float>(man) * 0x1p-24f;
  return sign ? -v : v;
}

QPEFT_HD uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a >= 0x38800000u) {  // normal half range (>= 2^-14)
    uint32_t bias = 0xfffu + ((a >> 13) & 1u);
    return static_cast<uint16_t>(sign | ((a - 0x38000000u + bias) >> 13));
  }
  if (a < 0x33000000u) return sign;  // < 2^-25: rounds to zero (2^-25 itself ties to even 0)
  // subnormal half: shift the 24-bit significand into place, round to nearest even
  uint32_t e = a >> 23;
  uint32_t m = (a & 0x7fffffu) | 0x800000u;
  uint32_t shift = 126u - e;  // 14 + (113 - e) - 1 ... result = m >> (shift)
  uint32_t r = m >> shift;
  uint32_t rem = m & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

QPEFT_HD float load_as_f32(const void* p, int64_t i, int dtype) {
  if (dtype == kF32) return static_cast<const float*>(p)[i];
  if (dtype == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

QPEFT_HD void store_from_f32(void* p, int64_t i, int dtype, float v) {
  if (dtype == kF32)
    static_cast<float*>(p)[i] = v;
  else if (dtype == kBF16)
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
}

// Absmax of a double-quantized block: code8[q] * nested_absmax + offset,
// each step rounded in fp32 as bitsandbytes does (dequantize, then += offset).
QPEFT_HD float nested_absmax_value(uint8_t q, const float* code8, float nested_absmax,
                                   float offset) {
  float v = code8[q] * nested_absmax;
  return v + offset;
}

}  // namespace qpeft
