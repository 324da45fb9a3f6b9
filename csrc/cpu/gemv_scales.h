// The block scales of one row of W for the SIMD GEMV kernels, in block order.
//
// Included by each ISA TU after <qpeft/format.h>; everything here has internal linkage
// (an anonymous namespace), so no TU can link another's copy compiled with other target
// flags (kernels.h explains why that matters).
#pragma once

#include <cstdint>

#include "gemv_kernels.h"

namespace qpeft {
namespace cpu {
namespace {

// Block b's scale is absmax[b], or nested_code[absmax_q[b]] * nested_absmax[g] + offset with
// g = b / nested_blocksize. The cursor divides once per row and then counts, instead of a
// 64-bit division per block: that division cost about as much as the block's 64 products
// (the AVX-512 GEMV at M=1, 4096x4096 NF4+DQ: 3.9 ms before).
class BlockScales {
 public:
  BlockScales(const Gemv4Args& a, int64_t block) : a_(a), block_(block) {
    if (a.absmax_q != nullptr) {
      group_ = block / a.nested_blocksize;
      in_group_ = block - group_ * a.nested_blocksize;
    }
  }

  float next() {
    const int64_t b = block_++;
    if (a_.absmax_q == nullptr) return a_.absmax[b];
    const float s =
        nested_absmax_value(a_.absmax_q[b], a_.nested_code, a_.nested_absmax[group_], a_.offset);
    if (++in_group_ == a_.nested_blocksize) {
      in_group_ = 0;
      ++group_;
    }
    return s;
  }

 private:
  const Gemv4Args& a_;
  int64_t block_;
  int64_t group_ = 0, in_group_ = 0;
};

}  // namespace
}  // namespace cpu
}  // namespace qpeft
