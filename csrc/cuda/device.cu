// Device queries of qpeft._C_cuda (csrc/cuda/ops.h): the only CUDA runtime calls
// outside qpeft::launch. Kept apart from the kernel files so that the emulation
// build (csrc/emu), which compiles those as host C++ without the CUDA runtime,
// never sees them; csrc/emu/device_emu.cpp gives the emulation module's answers.
#include <cuda_runtime.h>

#include <string>
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

namespace {

__global__ void probe_kernel(int* out) {
  *out = 0x51ef7e57;
}

std::string cuda_error(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

// One device: a one-thread kernel of this module writes a word that is read back. A driver
// older than the toolkit (cudaErrorInsufficientDriver), a GPU whose architecture is not
// compiled in (cudaErrorNoKernelImageForDevice) or a broken device fails here.
std::string probe_device(int device) {
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_error("cudaSetDevice", err);
  int* buf = nullptr;
  err = cudaMalloc(&buf, sizeof(int));
  if (err != cudaSuccess) return cuda_error("cudaMalloc", err);
  probe_kernel<<<1, 1>>>(buf);
  err = cudaGetLastError();
  std::string result;
  if (err != cudaSuccess) {
    result = cuda_error("launching a probe kernel", err);
  } else if ((err = cudaDeviceSynchronize()) != cudaSuccess) {
    result = cuda_error("running a probe kernel", err);
  } else {
    int host = 0;
    err = cudaMemcpy(&host, buf, sizeof(int), cudaMemcpyDeviceToHost);
    if (err != cudaSuccess) {
      result = cuda_error("reading the probe kernel's result", err);
    } else if (host != 0x51ef7e57) {
      result = "the probe kernel ran but wrote a wrong value";
    }
  }
  cudaFree(buf);
  cudaGetLastError();  // leave no (non-sticky) error behind for torch to find
  return result;
}

}  // namespace

std::string probe() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    std::string msg = cuda_error("cudaGetDeviceCount", err);
    int driver = 0;
    if (err == cudaErrorInsufficientDriver && cudaDriverGetVersion(&driver) == cudaSuccess) {
      // CUDART_VERSION: the toolkit this module was built with, e.g. 13000 for 13.0.
      const std::string built =
          std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
      msg += driver == 0 ? "; no NVIDIA driver is loaded"
                         : "; the driver supports CUDA " + std::to_string(driver / 1000) + "." +
                               std::to_string(driver % 1000 / 10);
      msg += ", this module was built with CUDA " + built;
    }
    return msg;
  }
  if (count == 0) return "cudaGetDeviceCount: no CUDA device";
  int current = 0;
  err = cudaGetDevice(&current);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return cuda_error("cudaGetDevice", err);
  }
  std::string result;
  for (int d = 0; d < count && result.empty(); ++d) {
    result = probe_device(d);
    if (!result.empty()) result = "device " + std::to_string(d) + ": " + result;
  }
  cudaSetDevice(current);  // the caller's current device, as it was
  cudaGetLastError();
  return result;
}

}  // namespace cuda
}  // namespace qpeft
