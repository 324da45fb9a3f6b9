// Per-thread scratch of the SIMD GEMV kernels: x reordered to a kernel's decode order.
//
// Included by each ISA TU; everything here has internal linkage (an anonymous namespace),
// so no TU can link another's copy compiled with other target flags (kernels.h explains
// why that matters).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>

namespace qpeft {
namespace cpu {
namespace {

// Scratch for x in a kernel's decode order, one per thread (thread_local in each TU); it
// grows and is kept (a decode step calls the GEMV once per layer with the same sizes).
// Internal linkage, and no std:: template (docs/design.md, "Internal linkage in ISA TUs").
struct XScratch {
  float* data = nullptr;
  int64_t cap = 0;  // floats
  XScratch() = default;
  XScratch(const XScratch&) = delete;
  XScratch& operator=(const XScratch&) = delete;
  ~XScratch() { std::free(data); }
  float* get(int64_t floats) {
    if (floats > cap) {
      std::free(data);
      data = nullptr;
      cap = 0;
      const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + 63) & ~size_t{63};
      data = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (data == nullptr) throw std::bad_alloc();
      cap = floats;
    }
    return data;
  }
};
}  // namespace
}  // namespace cpu
}  // namespace qpeft
