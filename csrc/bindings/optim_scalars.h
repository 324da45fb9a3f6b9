// The per-step fp32 scalars of the optimizer entry points, as both modules take
// them from Python (one tuple per step, csrc/README.md): checked for count here,
// for finiteness by the entry points (qpeft/host_checks.h).
#pragma once

#include <qpeft/host_checks.h>
#include <qpeft/optim.h>

#include <cstddef>
#include <string>
#include <vector>

namespace qpeft {
namespace bindings {

inline std::vector<float> scalars_of(const char* fn, const std::vector<double>& v,
                                     std::size_t count) {
  if (v.size() != count) {
    host::fail(fn, "scalars must hold " + std::to_string(count) + " values, got " +
                       std::to_string(v.size()));
  }
  return std::vector<float>(v.begin(), v.end());  // double -> float rounds to nearest even
}

inline AdamScalars adam_scalars(const char* fn, const std::vector<double>& v) {
  const auto f = scalars_of(fn, v, 8);
  return AdamScalars{f[0], f[1], static_cast<int>(f[2]), f[3], f[4], f[5], f[6], f[7]};
}

inline LionScalars lion_scalars(const char* fn, const std::vector<double>& v) {
  const auto f = scalars_of(fn, v, 6);
  return LionScalars{f[0], f[1], f[2], f[3], f[4], f[5]};
}

}  // namespace bindings
}  // namespace qpeft
