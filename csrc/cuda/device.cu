// Device queries of qpeft._C_cuda (csrc/cuda/ops.h): the only CUDA runtime calls
// outside qpeft::launch. Kept apart from the kernel files so that the emulation
// build (csrc/emu), which compiles those as host C++ without the CUDA runtime,
// never sees them; csrc/emu/device_emu.cpp gives the emulation module's answers.
#include <cuda_runtime.h>

#include <vector>

#include "ops.h"

namespace qpeft {
namespace cuda {

std::vector<int> compiled_archs() {
#if defined(__CUDA_ARCH_LIST__)
  const int list[] = {__CUDA_ARCH_LIST__};
  std::vector<int> archs;
  for (int a : list) archs.push_back(a / 10);
  return archs;
#else
  return {};
#endif
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error: no driver or no device
    return 0;
  }
  return count;
}

}  // namespace cuda
}  // namespace qpeft
