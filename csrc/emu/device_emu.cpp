// qpeft._C_cuda_emu's answers to the device queries of csrc/cuda/ops.h (the CUDA
// build's are in csrc/cuda/device.cu): the emulation module carries no device
// code and drives no device.
#include <string>
#include <vector>

#include "ops.h"

namespace qpeft {
namespace cuda {

std::vector<int> compiled_archs() {
  return {};
}

int device_count() {
  return 0;
}

// The harness runs every launch on the CPU: nothing to probe.
std::string probe() {
  return "";
}

}  // namespace cuda
}  // namespace qpeft
