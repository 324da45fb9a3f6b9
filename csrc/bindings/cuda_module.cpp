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
#include <stdexcept>
#include <string>
#include <vector>

#include "../cuda/ops.h"
#include "dlpack_capsule.h"
#include "optim_scalars.h"

#if defined(QPEFT_CUDA_EMULATION)
#include "../emu/emu_bindings.h"
#endif
#ifndef QPEFT_CUDA_MODULE_NAME
#define QPEFT_CUDA_MODULE_NAME _C_cuda
#endif

namespace py = pybind11;

// Optimizer steps: the fp32 scalars arrive as one tuple per step (csrc/README.md).
using qpeft::bindings::adam_scalars;
using qpeft::bindings::lion_scalars;

PYBIND11_MODULE(QPEFT_CUDA_MODULE_NAME, m) {
#if defined(QPEFT_CUDA_EMULATION)
  m.doc() =
      "qpeft CUDA kernels run on the CPU by the emulation harness (CPU pointers; stream ignored)";
  qpeft::emu::bind(m);
#else
  m.doc() = "qpeft CUDA kernels (raw device pointers, sizes and a cudaStream_t as int)";
#endif
  using release = py::call_guard<py::gil_scoped_release>;
  namespace k = qpeft::cuda;

  m.def("quantize_4bit", &k::quantize_4bit, release(), py::arg("x"), py::arg("x_dtype"),
        py::arg("n"), py::arg("blocksize"), py::arg("quant_type"), py::arg("packed"),
        py::arg("packed_len"), py::arg("absmax"), py::arg("absmax_len"), py::arg("stream"));
  m.def("dequantize_4bit", &k::dequantize_4bit, release(), py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("n"), py::arg("blocksize"),
        py::arg("quant_type"), py::arg("out"), py::arg("out_dtype"), py::arg("nested_absmax"),
        py::arg("nested_absmax_len"), py::arg("nested_code"), py::arg("offset"),
        py::arg("nested_blocksize"), py::arg("stream"));
  m.def("quantize_blockwise", &k::quantize_blockwise, release(), py::arg("x"), py::arg("x_dtype"),
        py::arg("n"), py::arg("blocksize"), py::arg("code"), py::arg("q"), py::arg("q_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("stream"));
  m.def("dequantize_blockwise", &k::dequantize_blockwise, release(), py::arg("q"), py::arg("q_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("code"), py::arg("n"),
        py::arg("blocksize"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"));
  m.def("gemv_4bit", &k::gemv_4bit, release(), py::arg("x"), py::arg("x_dtype"), py::arg("x_len"),
        py::arg("m"), py::arg("k"), py::arg("packed"), py::arg("packed_len"), py::arg("absmax"),
        py::arg("absmax_len"), py::arg("n"), py::arg("blocksize"), py::arg("quant_type"),
        py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("out"), py::arg("out_len"),
        py::arg("stream"));

#if !defined(QPEFT_CUDA_EMULATION) || defined(QPEFT_EMU_QLORA_GEMM)
  // Fused dequant + LoRA GEMM (csrc/cuda/qlora_gemm.cu, csrc/cuda/qlora_simt.cu). The
  // emulation module has them once CMakeLists.txt compiles both for it (QPEFT_EMU_QLORA_GEMM).
  m.attr("qlora_max_rank") = k::kQloraMaxRank;
  m.attr("qlora_max_split") = k::kQloraMaxSplit;
  m.def("qlora_workspace_len", &k::qlora_workspace_len, py::arg("m"), py::arg("ocols"),
        py::arg("r"), py::arg("split"));
  m.def("qlora_forward", &k::qlora_forward, release(), py::arg("x"), py::arg("x_dtype"),
        py::arg("x_len"), py::arg("m"), py::arg("k"), py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("n"), py::arg("blocksize"),
        py::arg("quant_type"), py::arg("nested_absmax"), py::arg("nested_absmax_len"),
        py::arg("nested_code"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("lora_a"),
        py::arg("lora_a_len"), py::arg("lora_b"), py::arg("lora_b_len"), py::arg("r"),
        py::arg("scaling"), py::arg("rank_scale"), py::arg("rank_scale_len"), py::arg("bias"),
        py::arg("bias_len"), py::arg("out_scale"), py::arg("out_scale_len"), py::arg("y"),
        py::arg("y_len"), py::arg("xa"), py::arg("xa_len"), py::arg("split"), py::arg("workspace"),
        py::arg("workspace_len"), py::arg("stream"));
  m.def("qlora_dx", &k::qlora_dx, release(), py::arg("dy"), py::arg("dy_dtype"), py::arg("dy_len"),
        py::arg("m"), py::arg("k"), py::arg("packed"), py::arg("packed_len"), py::arg("absmax"),
        py::arg("absmax_len"), py::arg("n"), py::arg("blocksize"), py::arg("quant_type"),
        py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("lora_a"), py::arg("lora_a_len"),
        py::arg("lora_b"), py::arg("lora_b_len"), py::arg("r"), py::arg("scaling"),
        py::arg("rank_scale"), py::arg("rank_scale_len"), py::arg("dx"), py::arg("dx_len"),
        py::arg("g"), py::arg("g_len"), py::arg("split"), py::arg("workspace"),
        py::arg("workspace_len"), py::arg("stream"));
  // The SIMT peer (csrc/cuda/qlora_simt.cu): fp32/fp64, and fp16/bf16 below sm_80.
  m.def("qlora_simt_forward", &k::qlora_simt_forward, release(), py::arg("x"), py::arg("x_dtype"),
        py::arg("x_len"), py::arg("m"), py::arg("k"), py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("n"), py::arg("blocksize"),
        py::arg("quant_type"), py::arg("nested_absmax"), py::arg("nested_absmax_len"),
        py::arg("nested_code"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("lora_a"),
        py::arg("lora_a_len"), py::arg("lora_b"), py::arg("lora_b_len"), py::arg("r"),
        py::arg("scaling"), py::arg("rank_scale"), py::arg("rank_scale_len"), py::arg("bias"),
        py::arg("bias_len"), py::arg("out_scale"), py::arg("out_scale_len"), py::arg("y"),
        py::arg("y_len"), py::arg("xa"), py::arg("xa_len"), py::arg("lbuf"), py::arg("lbuf_len"),
        py::arg("stream"));
  m.def("qlora_simt_dx", &k::qlora_simt_dx, release(), py::arg("dy"), py::arg("dy_dtype"),
        py::arg("dy_len"), py::arg("m"), py::arg("k"), py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("n"), py::arg("blocksize"),
        py::arg("quant_type"), py::arg("nested_absmax"), py::arg("nested_absmax_len"),
        py::arg("nested_code"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("lora_a"),
        py::arg("lora_a_len"), py::arg("lora_b"), py::arg("lora_b_len"), py::arg("r"),
        py::arg("scaling"), py::arg("rank_scale"), py::arg("rank_scale_len"), py::arg("dx"),
        py::arg("dx_len"), py::arg("g"), py::arg("g_len"), py::arg("stream"));
#endif

  m.def(
      "compiled_archs", &k::compiled_archs,
      "Architectures compiled in, e.g. [75, 80, 86, 89, 90, 100, 120] (__CUDA_ARCH_LIST__ / 10).");
  m.def("device_count", &k::device_count, release(),
        "cudaGetDeviceCount, evaluated on call; 0 when there is no driver or GPU.");
  m.def("probe", &k::probe, release(),
        "Launch a tiny kernel on every device and wait for it: '' when this module's kernels can "
        "run here, else the CUDA error (e.g. a driver older than the build's toolkit).");

  // ---------------------------------------------------------------------------
  // Optimizer steps (csrc/cuda/optim.cu) and paged state (csrc/cuda/paged.cu).
  m.def(
      "adamw32_step",
      [](std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
         std::uintptr_t exp_avg, std::int64_t exp_avg_len, std::uintptr_t exp_avg_sq,
         std::int64_t exp_avg_sq_len, const std::vector<double>& scalars, std::uintptr_t stream) {
        const auto s = adam_scalars("adamw32_step", scalars);
        py::gil_scoped_release nogil_;
        k::adamw32_step(param, grad, dtype, n, exp_avg, exp_avg_len, exp_avg_sq, exp_avg_sq_len, s,
                        stream);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("exp_avg"),
      py::arg("exp_avg_len"), py::arg("exp_avg_sq"), py::arg("exp_avg_sq_len"), py::arg("scalars"),
      py::arg("stream"));
  m.def(
      "adamw8bit_step",
      [](std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n, std::uintptr_t q1,
         std::int64_t q1_len, std::uintptr_t absmax1, std::int64_t absmax1_len, std::uintptr_t q2,
         std::int64_t q2_len, std::uintptr_t absmax2, std::int64_t absmax2_len,
         std::uintptr_t code1, std::uintptr_t code2, const std::vector<double>& scalars,
         std::uintptr_t stream) {
        const auto s = adam_scalars("adamw8bit_step", scalars);
        py::gil_scoped_release nogil_;
        k::adamw8bit_step(param, grad, dtype, n, q1, q1_len, absmax1, absmax1_len, q2, q2_len,
                          absmax2, absmax2_len, code1, code2, s, stream);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("exp_avg_q"),
      py::arg("exp_avg_q_len"), py::arg("exp_avg_absmax"), py::arg("exp_avg_absmax_len"),
      py::arg("exp_avg_sq_q"), py::arg("exp_avg_sq_q_len"), py::arg("exp_avg_sq_absmax"),
      py::arg("exp_avg_sq_absmax_len"), py::arg("qmap_signed"), py::arg("qmap_unsigned"),
      py::arg("scalars"), py::arg("stream"));
  m.def(
      "lion32_step",
      [](std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n,
         std::uintptr_t exp_avg, std::int64_t exp_avg_len, const std::vector<double>& scalars,
         std::uintptr_t stream) {
        const auto s = lion_scalars("lion32_step", scalars);
        py::gil_scoped_release nogil_;
        k::lion32_step(param, grad, dtype, n, exp_avg, exp_avg_len, s, stream);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("exp_avg"),
      py::arg("exp_avg_len"), py::arg("scalars"), py::arg("stream"));
  m.def(
      "lion8bit_step",
      [](std::uintptr_t param, std::uintptr_t grad, int dtype, std::int64_t n, std::uintptr_t q1,
         std::int64_t q1_len, std::uintptr_t absmax1, std::int64_t absmax1_len,
         std::uintptr_t code1, const std::vector<double>& scalars, std::uintptr_t stream) {
        const auto s = lion_scalars("lion8bit_step", scalars);
        py::gil_scoped_release nogil_;
        k::lion8bit_step(param, grad, dtype, n, q1, q1_len, absmax1, absmax1_len, code1, s, stream);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("exp_avg_q"),
      py::arg("exp_avg_q_len"), py::arg("exp_avg_absmax"), py::arg("exp_avg_absmax_len"),
      py::arg("qmap_signed"), py::arg("scalars"), py::arg("stream"));

#if !defined(QPEFT_CUDA_EMULATION)
  // Paged state needs the CUDA runtime (csrc/cuda/paged.cu): not part of an
  // emulated build of the kernels.
  m.def(
      "managed_dlpack",
      [](std::int64_t numel, int dl_code, int bits, int device) {
        qpeft::dlpack::ManagedTensor* mt;
        {
          py::gil_scoped_release nogil_;
          mt = k::managed_dlpack(numel, dl_code, bits, device);
        }
        return qpeft::bindings::to_dltensor_capsule(mt);
      },
      py::arg("numel"), py::arg("dl_code"), py::arg("bits"), py::arg("device"),
      "cudaMallocManaged memory as a 1-D 'dltensor' capsule (device type CUDA) whose deleter "
      "cudaFree's it.");
  m.def("prefetch", &k::prefetch, release(), py::arg("ptr"), py::arg("nbytes"), py::arg("device"),
        py::arg("stream"),
        "cudaMemPrefetchAsync to a device ordinal, or to the host when device < 0.");
  m.def("prefetch_location", &k::prefetch_location, release(), py::arg("ptr"), py::arg("nbytes"),
        "Last prefetch location of a managed range: device ordinal, -1 host, -2 none or mixed.");
  m.def("concurrent_managed_access", &k::concurrent_managed_access, release(), py::arg("device"),
        "cudaDevAttrConcurrentManagedAccess of a device (prefetch/advice take effect only where "
        "true).");
#endif
}
