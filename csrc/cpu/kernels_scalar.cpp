// Scalar CPU kernels: the per-element math of format.h applied literally. This
// is the fallback for CPUs without AVX2 and the reference the AVX2 kernels are
// held to bit for bit (qpeft._C.set_isa("scalar")).
//
// Compiled without -mavx2 & co. and with -ffp-contract=off: every product and
// sum is rounded on its own, as in torch and bitsandbytes.

#include "kernels.h"

#include <qpeft/format.h>

namespace qpeft {
namespace cpu {
namespace {

// |x| max over [begin, end) with NaN propagating like torch.amax: any NaN gives
// the canonical quiet NaN (the AVX2 path returns the same bits).
float block_absmax(const void* x, int dtype, int64_t begin, int64_t end) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t i = begin; i < end; ++i) {
    float a = load_as_f32(x, i, dtype);
    a = a < 0.0f ? -a : a;  // -0.0 stays -0.0 here, but 0.0 > -0.0 is false: m stays +0
    if (!(a == a))
      nan = true;
    else if (a > m)
      m = a;
  }
  return nan ? bits_f32(0x7fc00000u) : m;
}

void quantize_4bit(const Quant4Args& a, int64_t b0, int64_t b1) {
  const float* mid = a.quant_type == kNF4 ? kNF4Mid : kFP4Mid;
  const uint8_t* order = a.quant_type == kNF4 ? kNF4Order : kFP4Order;
  const uint8_t pad = zero_code4(a.quant_type);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * a.blocksize;
    const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
    const float am = block_absmax(a.x, a.x_dtype, begin, end);
    const bool partial = end - begin < a.blocksize;  // the last block divides (format.h)
    a.absmax[b] = stored_absmax4(am, partial);       // full blocks: unfloored, 0 if all zero
    const float floored = floor_absmax4(am), inv = inv_absmax4(am);
    auto norm = [&](int64_t i) {
      return normalize4(load_as_f32(a.x, i, a.x_dtype), floored, inv, partial);
    };
    for (int64_t i = begin; i < end;) {
      const uint8_t c = encode4(norm(i), mid, order);
      uint8_t& byte = a.packed[i >> 1];
      if (i & 1) {  // block starts mid-byte (odd blocksize): keep the high nibble
        byte = static_cast<uint8_t>((byte & 0xf0u) | c);
        i += 1;
      } else if (i + 1 < end) {
        byte = pack_pair(c, encode4(norm(i + 1), mid, order));
        i += 2;
      } else if (i + 1 == a.n) {  // last element of an odd-length tensor
        byte = pack_pair(c, pad);
        i += 1;
      } else {  // block ends mid-byte (odd blocksize): the next block writes the low nibble
        byte = static_cast<uint8_t>((c << 4) | (byte & 0x0fu));
        i += 1;
      }
    }
  }
}

float block_scale(const Dequant4Args& a, int64_t b) {
  if (a.absmax_q == nullptr) return a.absmax[b];
  return nested_absmax_value(a.absmax_q[b], a.nested_code, a.nested_absmax[b / a.nested_blocksize],
                             a.offset);
}

void dequantize_4bit(const Dequant4Args& a, int64_t b0, int64_t b1) {
  const float* table = a.quant_type == kNF4 ? kNF4Values : kFP4Values;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * a.blocksize;
    const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
    const float s = block_scale(a, b);
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t byte = a.packed[i >> 1];
      const int c = (i & 1) ? (byte & 0x0f) : (byte >> 4);
      store_from_f32(a.out, i, a.out_dtype, table[c] * s);
    }
  }
}

void quantize_blockwise(const Quant8Args& a, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * a.blocksize;
    const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
    const float am = block_absmax(a.x, a.x_dtype, begin, end);
    a.absmax[b] = am;
    if (am == 0.0f) {
      for (int64_t i = begin; i < end; ++i) a.q[i] = 0;
      continue;
    }
    const float inv = 1.0f / am;
    for (int64_t i = begin; i < end; ++i)
      a.q[i] = a.lut[lut_bin(load_as_f32(a.x, i, a.x_dtype) * inv)];
  }
}

void dequantize_blockwise(const Dequant8Args& a, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t begin = b * a.blocksize;
    const int64_t end = begin + a.blocksize < a.n ? begin + a.blocksize : a.n;
    const float s = a.absmax[b];
    for (int64_t i = begin; i < end; ++i) store_from_f32(a.out, i, a.out_dtype, a.code[a.q[i]] * s);
  }
}

}  // namespace

const KernelTable kScalarKernels = {"scalar", quantize_4bit, dequantize_4bit, quantize_blockwise,
                                    dequantize_blockwise};

}  // namespace cpu
}  // namespace qpeft
