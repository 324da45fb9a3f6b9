// qpeft._C_cuda: pybind11 shim over csrc/cuda/ops.h (ABI: csrc/README.md).
//
// Compiled a second time as qpeft._C_cuda_emu (QPEFT_CUDA_EMULATION defined,
// QPEFT_CUDA_MODULE_NAME=_C_cuda_emu), linked with the same kernel sources built
// as host C++ (csrc/emu): the same entry points on CPU pointers, the stream
// argument ignored, plus the emulation's own functions (csrc/emu/emu_bindings.h).
//
// Compiled by the host compiler: no CUDA headers here. Importing the module
// touches no CUDA API; the first kernel call (or device_count()) initialises the
// runtime. Each kernel entry releases the GIL while it validates and enqueues;
// std::invalid_argument surfaces as ValueError, std::runtime_error (a failed
// launch) as RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "../cuda/ops.h"

#if defined(QPEFT_CUDA_EMULATION)
#include "../emu/emu_bindings.h"
#endif
#ifndef QPEFT_CUDA_MODULE_NAME
#define QPEFT_CUDA_MODULE_NAME _C_cuda
#endif

namespace py = pybind11;

PYBIND11_MODULE(QPEFT_CUDA_MODULE_NAME, m) {
#if defined(QPEFT_CUDA_EMULATION)
  m.doc() = "qpeft CUDA kernels run on the CPU by the emulation harness (CPU pointers; stream ignored)";
  qpeft::emu::bind(m);
#else
  m.doc() = "qpeft CUDA kernels (raw device pointers, sizes and a cudaStream_t as int)";
#endif
  using release = py::call_guard<py::gil_scoped_release>;
  namespace k = qpeft::cuda;

  m.def("quantize_4bit", &k::quantize_4bit, release(), py::arg("x"), py::arg("x_dtype"),
        py::arg("n"), py::arg("blocksize"), py::arg("quant_type"), py::arg("packed"),
        py::arg("packed_len"), py::arg("absmax"), py::arg("absmax_len"), py::arg("stream"));
  m.def("dequantize_4bit", &k::dequantize_4bit, release(), py::arg("packed"),
        py::arg("packed_len"), py::arg("absmax"), py::arg("absmax_len"), py::arg("n"),
        py::arg("blocksize"), py::arg("quant_type"), py::arg("out"), py::arg("out_dtype"),
        py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("stream"));
  m.def("quantize_blockwise", &k::quantize_blockwise, release(), py::arg("x"),
        py::arg("x_dtype"), py::arg("n"), py::arg("blocksize"), py::arg("code"), py::arg("q"),
        py::arg("q_len"), py::arg("absmax"), py::arg("absmax_len"), py::arg("stream"));
  m.def("dequantize_blockwise", &k::dequantize_blockwise, release(), py::arg("q"),
        py::arg("q_len"), py::arg("absmax"), py::arg("absmax_len"), py::arg("code"),
        py::arg("n"), py::arg("blocksize"), py::arg("out"), py::arg("out_dtype"),
        py::arg("stream"));
  m.def("gemv_4bit", &k::gemv_4bit, release(), py::arg("x"), py::arg("x_dtype"), py::arg("x_len"),
        py::arg("m"), py::arg("k"), py::arg("packed"), py::arg("packed_len"), py::arg("absmax"),
        py::arg("absmax_len"), py::arg("n"), py::arg("blocksize"), py::arg("quant_type"),
        py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"), py::arg("offset"),
        py::arg("nested_blocksize"), py::arg("out"), py::arg("out_len"), py::arg("stream"));

  m.def("compiled_archs", &k::compiled_archs,
        "Architectures compiled in, e.g. [75, 80, 86, 89, 90, 100, 120] (__CUDA_ARCH_LIST__ / 10).");
  m.def("device_count", &k::device_count, release(),
        "cudaGetDeviceCount, evaluated on call; 0 when there is no driver or GPU.");
}
