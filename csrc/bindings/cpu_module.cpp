// qpeft._C: the CPU kernels as a pybind11 module over raw pointers (ABI in
// csrc/README.md). No libtorch: Python passes tensor.data_ptr() values and
// validates dtype/contiguity; C++ re-checks sizes (std::invalid_argument ->
// ValueError). The GIL is released while a kernel runs.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <qpeft/format.h>

#include <vector>

#include "../cpu/api.h"

namespace py = pybind11;
namespace qc = qpeft::cpu;

PYBIND11_MODULE(_C, m) {
  m.doc() = "qpeft CPU kernels (AVX2/FMA/F16C with a scalar fallback); see csrc/README.md";

  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("quantize_4bit", &qc::quantize_4bit, nogil, py::arg("x"), py::arg("x_dtype"), py::arg("n"),
        py::arg("blocksize"), py::arg("quant_type"), py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("num_threads"),
        "Blockwise 4-bit (NF4/FP4) quantization of n elements of x into packed codes and fp32 absmax.");

  m.def("dequantize_4bit", &qc::dequantize_4bit, nogil, py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("n"), py::arg("blocksize"),
        py::arg("quant_type"), py::arg("out"), py::arg("out_dtype"), py::arg("nested_absmax"),
        py::arg("nested_absmax_len"), py::arg("nested_code"), py::arg("offset"),
        py::arg("nested_blocksize"), py::arg("num_threads"),
        "4-bit dequantization; with nested_absmax != 0, absmax holds uint8 double-quantized codes.");

  m.def("quantize_blockwise", &qc::quantize_blockwise, nogil, py::arg("x"), py::arg("x_dtype"),
        py::arg("n"), py::arg("blocksize"), py::arg("code"), py::arg("q"), py::arg("q_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("num_threads"),
        "Blockwise 8-bit quantization with a sorted 256-entry code (65536-bin lookup rule).");

  m.def("dequantize_blockwise", &qc::dequantize_blockwise, nogil, py::arg("q"), py::arg("q_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("code"), py::arg("n"), py::arg("blocksize"),
        py::arg("out"), py::arg("out_dtype"), py::arg("num_threads"),
        "Blockwise 8-bit dequantization: out = code[q] * absmax[block].");

  m.def("gemv_4bit", &qc::gemv_4bit, nogil, py::arg("x"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("packed"), py::arg("packed_len"), py::arg("absmax"), py::arg("absmax_len"),
        py::arg("blocksize"), py::arg("quant_type"), py::arg("nested_absmax"), py::arg("nested_absmax_len"),
        py::arg("nested_code"), py::arg("offset"), py::arg("nested_blocksize"), py::arg("out"),
        py::arg("num_threads"),
        "fp32 out[m, n] = x[m, k] @ W^T with W [n, k] as packed 4-bit codes (decode-sized m).");

  m.def("set_isa", &qc::set_isa, py::arg("name"),
        "Select the kernel ISA: 'auto', 'scalar' or 'avx2' (ValueError if the CPU lacks it). "
        "Returns the previous setting.");
  m.def("active_isa", &qc::active_isa, "The ISA the kernels run with now ('scalar' or 'avx2').");
  m.def("lut8", [](uintptr_t code) {
    const std::string t = qc::lut8(code);
    return std::vector<int>(reinterpret_cast<const uint8_t*>(t.data()),
                            reinterpret_cast<const uint8_t*>(t.data()) + t.size());
  }, py::arg("code"),
        "The 8-bit encoder lookup table (65536 ints) for a sorted fp32[256] code (pointer).");
  m.def("format_tables", [] {
    auto list = [](const auto* p, int k) { return std::vector<double>(p, p + k); };
    py::dict d;
    d["nf4"] = list(qpeft::kNF4Values, qpeft::kNumCodes4);
    d["fp4"] = list(qpeft::kFP4Values, qpeft::kNumCodes4);
    d["nf4_mid"] = list(qpeft::kNF4Mid, qpeft::kNumCodes4 - 1);
    d["fp4_mid"] = list(qpeft::kFP4Mid, qpeft::kNumCodes4 - 1);
    d["nf4_order"] = std::vector<int>(qpeft::kNF4Order, qpeft::kNF4Order + qpeft::kNumCodes4);
    d["fp4_order"] = std::vector<int>(qpeft::kFP4Order, qpeft::kFP4Order + qpeft::kNumCodes4);
    d["lut_bins"] = qpeft::kLutBins;
    return d;
  }, "format.h's tables as Python lists (tests compare them with qpeft/_formats.py).");
  m.def("cpu_features", [] {
    const qc::CpuFeatures f = qc::cpu_features();
    py::dict d;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    return d;
  }, "The CPU features the kernels select on: dict(avx2=..., fma=..., f16c=...).");
}
