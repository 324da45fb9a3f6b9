// The one place CUDA kernels are launched from.
//
// Every kernel in csrc/cuda goes through qpeft::launch so that a CPU emulation
// harness (which compiles these same kernel sources as host C++) only has to
// replace this helper: here it is a plain `<<<>>>` followed by the error check
// the native ABI promises (std::runtime_error carrying cudaGetErrorString).
//
// Emulation hook: a host build defining QPEFT_CUDA_EMULATION includes
// "qpeft_cuda_emulation.h" instead (csrc/emu, the harness's include path); it
// defines qpeft::launch and qpeft::dynamic_smem with these signatures and the
// CUDA builtins the kernels use.
#pragma once

#if defined(QPEFT_CUDA_EMULATION)
#include "qpeft_cuda_emulation.h"
#else

#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>

namespace qpeft {

// launch("name", kernel, grid, block, smem_bytes, stream, args...): the arguments
// are converted to the kernel's parameter types before the launch.
template <typename... Params, typename... Args>
inline void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                   std::size_t smem, cudaStream_t stream, Args... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count");
  kernel<<<grid, block, smem, stream>>>(static_cast<Params>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("qpeft: CUDA launch of ") + name +
                             " failed: " + cudaGetErrorString(err));
  }
}

// The block's dynamic shared memory (the `smem` bytes of the launch). Kernels
// use this instead of declaring `extern __shared__` arrays, which a host
// compiler cannot give per-block storage.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char qpeft_dynamic_smem[];
  return reinterpret_cast<T*>(qpeft_dynamic_smem);
}

}  // namespace qpeft

#endif  // QPEFT_CUDA_EMULATION
