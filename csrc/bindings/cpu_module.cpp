// qpeft._C: the CPU kernels as a pybind11 module over raw pointers (ABI in
// csrc/README.md). No libtorch: Python passes tensor.data_ptr() values and
// validates dtype/contiguity; C++ re-checks sizes (std::invalid_argument ->
// ValueError). The GIL is released while a kernel runs.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <qpeft/format.h>
#include <qpeft/small_layer_abi.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "../cpu/api.h"
#include "../cpu/isa_tables.h"
#include "../cpu/qgemm_amx.h"
#include "../cpu/qgemm_f32.h"
#include "../cpu/qgemm_avx512bf16.h"
#include "../cpu/thread_pool.h"
#include "dlpack_capsule.h"
#include "optim_scalars.h"

namespace py = pybind11;
namespace qc = qpeft::cpu;

// --- optimizer steps: the fp32 scalars arrive as one tuple per step (csrc/README.md).
namespace {

using qpeft::bindings::adam_scalars;
using qpeft::bindings::lion_scalars;

// The rows of a multi-tensor step: a 1-D, contiguous buffer of int64 (Python's
// array("q")) whose length is a multiple of the row width. The caller keeps the
// buffer alive for the call, which reads it with the GIL released.
qc::Rows rows_of(const char* fn, const py::buffer& rows, int64_t width) {
  const py::buffer_info b = rows.request();
  const auto bad = [&](const std::string& what) { qpeft::host::fail(fn, "rows " + what); };
  if (b.itemsize != 8 || (b.format != "q" && b.format != "l"))
    bad("must be a buffer of int64 (array('q'))");
  if (b.ndim != 1) bad("must be one-dimensional, got " + std::to_string(b.ndim) + " dimensions");
  if (b.size > 1 && b.strides[0] != 8) bad("must be contiguous");
  if (b.size % width != 0) {
    bad("holds " + std::to_string(b.size) + " values, not a multiple of the row width " +
        std::to_string(width));
  }
  return qc::Rows{static_cast<const int64_t*>(b.ptr), static_cast<int64_t>(b.size / width)};
}

py::dict features_dict() {
  const qc::CpuFeatures& f = qc::cpu_features();
  py::dict d;
  d["avx2"] = f.avx2;
  d["fma"] = f.fma;
  d["f16c"] = f.f16c;
  d["avx512f"] = f.avx512f;
  d["avx512bw"] = f.avx512bw;
  d["avx512vl"] = f.avx512vl;
  d["avx512dq"] = f.avx512dq;
  d["avx512vbmi"] = f.avx512vbmi;
  d["avx512_bf16"] = f.avx512_bf16;
  d["avx512_vnni"] = f.avx512_vnni;
  d["amx_tile"] = f.amx_tile;
  d["amx_bf16"] = f.amx_bf16;
  d["os_ymm"] = f.os_ymm;
  d["os_zmm"] = f.os_zmm;
  d["os_amx"] = f.os_amx;
  d["amx_permitted"] = f.amx_permitted;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qpeft CPU kernels (scalar, AVX2, AVX-512; chosen at run time); see csrc/README.md";

  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def("quantize_4bit", &qc::quantize_4bit, nogil, py::arg("x"), py::arg("x_dtype"), py::arg("n"),
        py::arg("blocksize"), py::arg("quant_type"), py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("num_threads"),
        "Blockwise 4-bit (NF4/FP4) quantization of n elements of x into packed codes and fp32 "
        "absmax.");

  m.def(
      "dequantize_4bit", &qc::dequantize_4bit, nogil, py::arg("packed"), py::arg("packed_len"),
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
        py::arg("absmax"), py::arg("absmax_len"), py::arg("code"), py::arg("n"),
        py::arg("blocksize"), py::arg("out"), py::arg("out_dtype"), py::arg("num_threads"),
        "Blockwise 8-bit dequantization: out = code[q] * absmax[block].");

  m.def("gemv_4bit", &qc::gemv_4bit, nogil, py::arg("x"), py::arg("x_len"), py::arg("m"),
        py::arg("n"), py::arg("k"), py::arg("packed"), py::arg("packed_len"), py::arg("absmax"),
        py::arg("absmax_len"), py::arg("blocksize"), py::arg("quant_type"),
        py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("out"), py::arg("out_len"),
        py::arg("num_threads"),
        "fp32 out[m, n] = x[m, k] @ W^T with W [n, k] as packed 4-bit codes (decode-sized m).");

  // The AMX-BF16 GEMM on packed 4-bit W (csrc/cpu/qgemm_amx.cpp): internal, called by
  // qpeft/backends/cpu/amx.py, which checks dtypes and contiguity first.
  for (const bool dx : {false, true}) {
    m.def(
        dx ? "qgemm_4bit_amx_dx" : "qgemm_4bit_amx",
        [dx](uintptr_t a, int64_t a_len, int64_t m_, int64_t n, int64_t k, uintptr_t packed,
             int64_t packed_len, uintptr_t absmax, int64_t absmax_len, int64_t blocksize,
             int quant_type, uintptr_t nested_absmax, int64_t nested_absmax_len,
             uintptr_t nested_code, uintptr_t offset, int64_t nested_blocksize, uintptr_t out,
             int64_t out_len, int out_dtype, bool accumulate, uintptr_t lora_l, int64_t lora_l_len,
             uintptr_t lora_r, int64_t lora_r_len, int64_t rank, int64_t col_block,
             int64_t red_block, int num_threads) {
          qc::qgemm_4bit_amx(dx, a, a_len, m_, n, k, packed, packed_len, absmax, absmax_len,
                             blocksize, quant_type, nested_absmax, nested_absmax_len, nested_code,
                             offset, nested_blocksize, out, out_len, out_dtype, accumulate, lora_l,
                             lora_l_len, lora_r, lora_r_len, rank, col_block, red_block,
                             num_threads);
        },
        nogil, py::arg("a"), py::arg("a_len"), py::arg("m"), py::arg("n"), py::arg("k"),
        py::arg("packed"), py::arg("packed_len"), py::arg("absmax"), py::arg("absmax_len"),
        py::arg("blocksize"), py::arg("quant_type"), py::arg("nested_absmax"),
        py::arg("nested_absmax_len"), py::arg("nested_code"), py::arg("offset"),
        py::arg("nested_blocksize"), py::arg("out"), py::arg("out_len"), py::arg("out_dtype"),
        py::arg("accumulate"), py::arg("lora_l"), py::arg("lora_l_len"), py::arg("lora_r"),
        py::arg("lora_r_len"), py::arg("rank"), py::arg("col_block"), py::arg("red_block"),
        py::arg("num_threads"),
        dx ? "AMX-BF16 out[m, k] (+)= a[m, n] @ W (+ lora_l @ lora_r) with W [n, k] as packed "
             "4-bit codes (bf16 a)."
           : "AMX-BF16 out[m, n] (+)= a[m, k] @ W^T (+ lora_l @ lora_r) with W [n, k] as packed "
             "4-bit codes (bf16 a).");
  }
  m.def("lora_grad_amx", &qc::lora_grad_amx, nogil, py::arg("l"), py::arg("l_len"), py::arg("rank"),
        py::arg("x"), py::arg("x_len"), py::arg("m"), py::arg("cols"), py::arg("out"),
        py::arg("out_len"), py::arg("transpose"), py::arg("num_threads"),
        "fp32 out[rank, cols] (or [cols, rank]) = l[m, rank]^T @ x[m, cols] (bf16 x): the LoRA "
        "weight gradients' products at the amx level.");
  // The fused decode + vdpbf16ps GEMM of the avx512_bf16 level (csrc/cpu/qgemm_avx512bf16.cpp):
  // internal, called by qpeft/backends/cpu/dpbf16.py, which checks dtypes and contiguity.
  m.def("qgemm_4bit_dpbf16", &qc::qgemm_4bit_dpbf16, nogil, py::arg("x"), py::arg("x_len"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("blocksize"), py::arg("quant_type"),
        py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("out"), py::arg("out_len"),
        py::arg("num_threads"),
        "AVX512-BF16 fp32 out[m, n] = x[m, k] @ W^T (bf16 x) with W [n, k] as packed 4-bit codes.");
  m.def(
      "qgemm_4bit_dpbf16_dx", &qc::qgemm_4bit_dpbf16_dx, nogil, py::arg("x"), py::arg("x_len"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("packed"), py::arg("packed_len"),
      py::arg("absmax"), py::arg("absmax_len"), py::arg("blocksize"), py::arg("quant_type"),
      py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"),
      py::arg("offset"), py::arg("nested_blocksize"), py::arg("out"), py::arg("out_len"),
      py::arg("num_threads"),
      "AVX512-BF16 fp32 out[m, k] = x[m, n] @ W (bf16 x: dy) with W [n, k] as packed 4-bit codes.");

  // The fused decode + FMA fp32 GEMM of the avx2 level (csrc/cpu/qgemm_f32_avx2.cpp):
  // internal, called by qpeft/backends/cpu/f32gemm.py, which checks dtypes and contiguity.
  m.def("qgemm_4bit_f32", &qc::qgemm_4bit_f32, nogil, py::arg("dx"), py::arg("x"), py::arg("x_len"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("blocksize"), py::arg("quant_type"),
        py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("lora_l"), py::arg("lora_l_len"),
        py::arg("lora_r"), py::arg("lora_r_len"), py::arg("rank"), py::arg("out"),
        py::arg("out_len"), py::arg("accumulate"), py::arg("extra"), py::arg("extra_len"),
        py::arg("extra_cols"), py::arg("out2"), py::arg("out2_len"), py::arg("col_block"),
        py::arg("red_block"), py::arg("num_threads"),
        "fp32 out (+)= x @ (W + L R)^T (forward: x [m, k], out [m, n]) or x @ (W + L R) (dx: x "
        "[m, n], out [m, k]) with W [n, k] as packed 4-bit codes, L [n, rank], R [rank, k]; "
        "with extra_cols e > 0 also out2 [m, e] = x @ extra^T (extra [e, k]) or x @ extra "
        "(extra [n, e]) in the same pass.");
  m.def("lora_grad_f32", &qc::lora_grad_f32, nogil, py::arg("g"), py::arg("g_len"),
        py::arg("g_stride_m"), py::arg("g_stride_r"), py::arg("m"), py::arg("r"),
        py::arg("scaling"), py::arg("q"), py::arg("q_len"), py::arg("cols"), py::arg("out"),
        py::arg("out_len"), py::arg("transpose_out"), py::arg("num_threads"),
        "fp32 out = (s G)^T Q (G [m, r] strided, Q [m, cols]; out [r, cols] or [cols, r]): the "
        "LoRA layer's dA and dB on the avx2 level.");
  m.def("qgemm_4bit_f32_active", &qc::qgemm_4bit_f32_active,
        "Whether the fp32 QLoRA layer takes qgemm_4bit_f32 now: built, and the CPU kernels at "
        "exactly the avx2 level.");

  m.def("set_isa", &qc::set_isa, py::arg("name"),
        "Test/A-B override of the kernel ISA level: 'auto' (QPEFT_CPU_ISA or detection) or one "
        "of 'scalar', 'avx2', 'avx512', 'avx512_bf16', 'amx' (ValueError naming the missing "
        "features if the CPU lacks it). Returns the previous setting.");
  m.def("active_isa", &qc::active_isa,
        "The ISA level the kernels run at now ('scalar', 'avx2', 'avx512', ...).");
  m.def("set_threading", &qc::set_threading, py::arg("name"),
        "Run parallel kernels on 'openmp' (torch's libgomp threads), 'pool' (qpeft's own) or "
        "'auto'.");
  m.def("threading", &qc::threading, "Where parallel kernels run now: 'openmp' or 'pool'.");
  m.def(
      "lut8",
      [](uintptr_t code) {
        const std::string t = qc::lut8(code);
        return std::vector<int>(reinterpret_cast<const uint8_t*>(t.data()),
                                reinterpret_cast<const uint8_t*>(t.data()) + t.size());
      },
      py::arg("code"),
      "The 8-bit encoder lookup table (65536 ints) for a sorted fp32[256] code (pointer).");
  m.def(
      "format_tables",
      [] {
        // Python reads nothing from here at run time (qpeft/_formats.py holds its own
        // copy, importable without the native module); tests/test_formats.py asserts
        // that every entry equals it bit for bit. fp32 values go out as doubles (exact).
        auto list = [](const auto* p, int k) { return std::vector<double>(p, p + k); };
        py::dict d;
        d["nf4"] = list(qpeft::kNF4Values, qpeft::kNumCodes4);
        d["fp4"] = list(qpeft::kFP4Values, qpeft::kNumCodes4);
        d["nf4_mid"] = list(qpeft::kNF4Mid, qpeft::kNumCodes4 - 1);
        d["fp4_mid"] = list(qpeft::kFP4Mid, qpeft::kNumCodes4 - 1);
        d["nf4_order"] = std::vector<int>(qpeft::kNF4Order, qpeft::kNF4Order + qpeft::kNumCodes4);
        d["fp4_order"] = std::vector<int>(qpeft::kFP4Order, qpeft::kFP4Order + qpeft::kNumCodes4);
        d["nf4_zero_code"] = static_cast<int>(qpeft::zero_code4(qpeft::kNF4));
        d["fp4_zero_code"] = static_cast<int>(qpeft::zero_code4(qpeft::kFP4));
        d["lut_bins"] = qpeft::kLutBins;
        d["num_codes8"] = qpeft::kNumCodes8;
        d["absmax_floor"] = static_cast<double>(qpeft::kAbsmaxFloor);
        std::vector<int> blocksizes;
        for (int l = qpeft::kBlocksizeLog2Min; l <= qpeft::kBlocksizeLog2Max; ++l)
          blocksizes.push_back(1 << l);
        d["blocksizes"] = blocksizes;
        d["gemv_max_rows"] = qpeft::kGemvMaxRows;
        py::dict dtypes;
        dtypes["float32"] = static_cast<int>(qpeft::kF32);
        dtypes["float16"] = static_cast<int>(qpeft::kF16);
        dtypes["bfloat16"] = static_cast<int>(qpeft::kBF16);
        d["dtype_ids"] = dtypes;
        py::dict quant_types;
        quant_types["fp4"] = static_cast<int>(qpeft::kFP4);
        quant_types["nf4"] = static_cast<int>(qpeft::kNF4);
        d["quant_type_ids"] = quant_types;
        d["state_block"] = qpeft::kStateBlock;
        d["min_8bit_numel"] = qpeft::kMin8BitNumel;
        return d;
      },
      "format.h's (and optim.h's) tables and constants as Python values, for "
      "tests/test_formats.py.");
  m.def("cpu_features", &features_dict,
        "What cpuid/xgetbv (and the AMX permission request) report, detected once: a dict of "
        "bools (csrc/cpu/cpu_info.h).");
  m.def(
      "cpu_info",
      [] {
        const qc::IsaChoice& c = qc::isa_choice();  // ValueError on an invalid QPEFT_CPU_ISA
        const int active = qc::active_level();
        py::dict d;
        d["model"] = qc::cpu_model();
        d["features"] = features_dict();
        d["detected_level"] = qc::isa_level_name(c.detected);
        d["chosen_level"] = qc::isa_level_name(active);
        d["cap"] =
            c.cap < 0 ? py::object(py::none()) : py::object(py::str(qc::isa_level_name(c.cap)));
        d["note"] = c.note.empty() ? py::object(py::none()) : py::object(py::str(c.note));
        const std::string ov = qc::isa_override();
        d["override"] = ov == "auto" ? py::object(py::none()) : py::object(py::str(ov));
        py::list levels, missing;
        py::dict miss;
        for (int l = 0; l < qc::kNumIsaLevels; ++l) {
          levels.append(qc::isa_level_name(l));
          if (l > c.detected) miss[qc::isa_level_name(l)] = qc::missing_features(l);
        }
        d["levels"] = levels;
        d["missing"] = miss;
        py::list built;
        for (int l = 0; l < qc::kNumIsaLevels; ++l)
          if (qc::isa_level_built(l)) built.append(qc::isa_level_name(l));
        d["built_levels"] = built;
        // The fused bf16 GEMM the QLoRA layer's bf16 mode runs at the chosen level (the
        // level's own, or None: W decoded to panels for oneDNN; docs/design.md "AMX GEMM").
        py::list gemm_built;
        for (int l = 0; l < qc::kNumIsaLevels; ++l)
          if (qc::bf16_gemm_built(l)) gemm_built.append(qc::isa_level_name(l));
        d["gemm_levels"] = gemm_built;
        d["gemm_4bit_bf16"] = qc::bf16_gemm_built(active)
                                  ? py::object(py::str(qc::isa_level_name(active)))
                                  : py::object(py::none());
        // The fused fp32 GEMM the QLoRA layer's fp32 mode runs at the chosen level
        // (qgemm_f32_avx2.cpp, at the avx2 level: backends/cpu/f32gemm.py `active`), or
        // None (W decoded to panels for torch's fp32 GEMM).
        d["gemm_4bit_f32"] = active == qc::kIsaAvx2 && qc::isa_level_built(qc::kIsaAvx2)
                                 ? py::object(py::str(qc::isa_level_name(qc::kIsaAvx2)))
                                 : py::object(py::none());
        py::dict kernels;
        const qc::IsaKernels& t = qc::isa_kernels_at(active);
        for (int i = 0; i < qc::kNumIsaOps; ++i)
          kernels[qc::kIsaOpNames[i]] = qc::isa_level_name(t.source[i]);
        d["kernels"] = kernels;
        return d;
      },
      "The CPU (model, features), the detected ISA level, the QPEFT_CPU_ISA cap, the level "
      "chosen and which ISA's kernel each op runs at it (qpeft.cpu_info()).");

  // ---------------------------------------------------------------------------
  // Optimizer steps (csrc/cpu/optim.cpp) and host DLPack buffers (host_buffer.cpp).
  m.def(
      "adamw32_step",
      [](uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t exp_avg,
         int64_t exp_avg_len, uintptr_t exp_avg_sq, int64_t exp_avg_sq_len,
         const std::vector<double>& scalars, int num_threads) {
        const auto s = adam_scalars("adamw32_step", scalars);
        py::gil_scoped_release nogil_;
        qc::adamw32_step(param, grad, dtype, n, exp_avg, exp_avg_len, exp_avg_sq, exp_avg_sq_len, s,
                         num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("exp_avg"),
      py::arg("exp_avg_len"), py::arg("exp_avg_sq"), py::arg("exp_avg_sq_len"), py::arg("scalars"),
      py::arg("num_threads"),
      "AdamW step with fp32 state, in place. scalars: (decay, lerp_c, lerp_from_grad, beta2, omb2, "
      "bc2_sqrt, eps, neg_step) as qpeft._optim_math.adam_scalars computes them.");

  m.def(
      "adamw8bit_step",
      [](uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t q1, int64_t q1_len,
         uintptr_t absmax1, int64_t absmax1_len, uintptr_t q2, int64_t q2_len, uintptr_t absmax2,
         int64_t absmax2_len, uintptr_t code1, uintptr_t code2, const std::vector<double>& scalars,
         int num_threads) {
        const auto s = adam_scalars("adamw8bit_step", scalars);
        py::gil_scoped_release nogil_;
        qc::adamw8bit_step(param, grad, dtype, n, q1, q1_len, absmax1, absmax1_len, q2, q2_len,
                           absmax2, absmax2_len, code1, code2, s, num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("exp_avg_q"),
      py::arg("exp_avg_q_len"), py::arg("exp_avg_absmax"), py::arg("exp_avg_absmax_len"),
      py::arg("exp_avg_sq_q"), py::arg("exp_avg_sq_q_len"), py::arg("exp_avg_sq_absmax"),
      py::arg("exp_avg_sq_absmax_len"), py::arg("qmap_signed"), py::arg("qmap_unsigned"),
      py::arg("scalars"), py::arg("num_threads"),
      "AdamW step with blockwise 8-bit state (256 per block), in place.");

  m.def(
      "lion32_step",
      [](uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t exp_avg,
         int64_t exp_avg_len, const std::vector<double>& scalars, int num_threads) {
        const auto s = lion_scalars("lion32_step", scalars);
        py::gil_scoped_release nogil_;
        qc::lion32_step(param, grad, dtype, n, exp_avg, exp_avg_len, s, num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("exp_avg"),
      py::arg("exp_avg_len"), py::arg("scalars"), py::arg("num_threads"),
      "Lion step with fp32 state, in place. scalars: (decay, beta1, omb1, beta2, omb2, neg_lr).");

  m.def(
      "lion8bit_step",
      [](uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t q1, int64_t q1_len,
         uintptr_t absmax1, int64_t absmax1_len, uintptr_t code1,
         const std::vector<double>& scalars, int num_threads) {
        const auto s = lion_scalars("lion8bit_step", scalars);
        py::gil_scoped_release nogil_;
        qc::lion8bit_step(param, grad, dtype, n, q1, q1_len, absmax1, absmax1_len, code1, s,
                          num_threads);
      },
      py::arg("param"), py::arg("grad"), py::arg("dtype"), py::arg("n"), py::arg("exp_avg_q"),
      py::arg("exp_avg_q_len"), py::arg("exp_avg_absmax"), py::arg("exp_avg_absmax_len"),
      py::arg("qmap_signed"), py::arg("scalars"), py::arg("num_threads"),
      "Lion step with blockwise 8-bit state, in place.");

  // Multi-tensor steps: a flat int64 buffer of rows (csrc/README.md) and the
  // distinct scalar sets the rows index. The buffer is read in place.
  m.def(
      "adamw32_multi_step",
      [](const py::buffer& rows, const std::vector<std::vector<double>>& scalars, int num_threads) {
        const char* fn = "adamw32_multi_step";
        const qc::Rows r = rows_of(fn, rows, 9);
        std::vector<qpeft::AdamScalars> s;
        for (const auto& v : scalars) s.push_back(adam_scalars(fn, v));
        py::gil_scoped_release nogil_;
        qc::adamw32_multi_step(r, s, num_threads);
      },
      py::arg("rows"), py::arg("scalars"), py::arg("num_threads"),
      "adamw32_step over a list: rows of (param, grad, dtype, n, exp_avg, exp_avg_len, exp_avg_sq, "
      "exp_avg_sq_len, scalar set index) in one int64 buffer; one parallel region.");
  m.def(
      "adamw8bit_multi_step",
      [](const py::buffer& rows, uintptr_t code1, uintptr_t code2,
         const std::vector<std::vector<double>>& scalars, int num_threads) {
        const char* fn = "adamw8bit_multi_step";
        const qc::Rows r = rows_of(fn, rows, 13);
        std::vector<qpeft::AdamScalars> s;
        for (const auto& v : scalars) s.push_back(adam_scalars(fn, v));
        py::gil_scoped_release nogil_;
        qc::adamw8bit_multi_step(r, code1, code2, s, num_threads);
      },
      py::arg("rows"), py::arg("qmap_signed"), py::arg("qmap_unsigned"), py::arg("scalars"),
      py::arg("num_threads"), "adamw8bit_step over a list (rows of 12 values + scalar set index).");
  m.def(
      "lion32_multi_step",
      [](const py::buffer& rows, const std::vector<std::vector<double>>& scalars, int num_threads) {
        const char* fn = "lion32_multi_step";
        const qc::Rows r = rows_of(fn, rows, 7);
        std::vector<qpeft::LionScalars> s;
        for (const auto& v : scalars) s.push_back(lion_scalars(fn, v));
        py::gil_scoped_release nogil_;
        qc::lion32_multi_step(r, s, num_threads);
      },
      py::arg("rows"), py::arg("scalars"), py::arg("num_threads"),
      "lion32_step over a list (rows of 6 values + scalar set index).");
  m.def(
      "lion8bit_multi_step",
      [](const py::buffer& rows, uintptr_t code1, const std::vector<std::vector<double>>& scalars,
         int num_threads) {
        const char* fn = "lion8bit_multi_step";
        const qc::Rows r = rows_of(fn, rows, 9);
        std::vector<qpeft::LionScalars> s;
        for (const auto& v : scalars) s.push_back(lion_scalars(fn, v));
        py::gil_scoped_release nogil_;
        qc::lion8bit_multi_step(r, code1, s, num_threads);
      },
      py::arg("rows"), py::arg("qmap_signed"), py::arg("scalars"), py::arg("num_threads"),
      "lion8bit_step over a list (rows of 8 values + scalar set index).");

  m.def("state_table_exact", &qc::state_table_exact, py::arg("code"),
        "True when the 8-bit state encoder for this fp32[256] map (pointer) uses its one-compare "
        "key table.");

  m.def(
      "host_buffer_dlpack",
      [](int64_t numel, int dl_code, int bits) {
        return qpeft::bindings::to_dltensor_capsule(qc::host_buffer(numel, dl_code, bits));
      },
      py::arg("numel"), py::arg("dl_code"), py::arg("bits"),
      "Zeroed 64-byte-aligned host memory as a 1-D 'dltensor' capsule whose deleter frees it "
      "(the CPU twin of qpeft._C_cuda.managed_dlpack).");
  m.def("host_buffers_live", &qc::host_buffers_live,
        "Host DLPack buffers allocated and not yet freed.");

  // --- per-call overhead of small layers (docs/design.md, "Per-call overhead") ---------
  m.def("qlora_small_forward", &qc::qlora_small_forward, nogil, py::arg("x"), py::arg("x_len"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("packed"), py::arg("packed_len"),
        py::arg("absmax"), py::arg("absmax_len"), py::arg("blocksize"), py::arg("quant_type"),
        py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("lora_a"), py::arg("lora_a_len"),
        py::arg("lora_b"), py::arg("lora_b_len"), py::arg("r"), py::arg("scaling"),
        py::arg("rank_scale"), py::arg("rank_scale_len"), py::arg("bias"), py::arg("bias_len"),
        py::arg("out_scale"), py::arg("out_scale_len"), py::arg("out"), py::arg("out_len"),
        py::arg("xa"), py::arg("xa_len"), py::arg("num_threads"),
        "fp32 QLoRA forward of a small layer in one call: xa = x @ A^T, out = (x @ W^T + "
        "((xa * scaling) * rank_scale) @ B^T + bias) * out_scale (W packed 4-bit).");
  m.def("qlora_small_backward", &qc::qlora_small_backward, nogil, py::arg("grad_y"),
        py::arg("grad_y_len"), py::arg("x"), py::arg("x_len"), py::arg("m"), py::arg("n"),
        py::arg("k"), py::arg("packed"), py::arg("packed_len"), py::arg("absmax"),
        py::arg("absmax_len"), py::arg("blocksize"), py::arg("quant_type"),
        py::arg("nested_absmax"), py::arg("nested_absmax_len"), py::arg("nested_code"),
        py::arg("offset"), py::arg("nested_blocksize"), py::arg("lora_a"), py::arg("lora_a_len"),
        py::arg("lora_b"), py::arg("lora_b_len"), py::arg("xa"), py::arg("xa_len"), py::arg("r"),
        py::arg("scaling"), py::arg("rank_scale"), py::arg("rank_scale_len"), py::arg("out_scale"),
        py::arg("out_scale_len"), py::arg("dx"), py::arg("dx_len"), py::arg("da"),
        py::arg("da_len"), py::arg("db"), py::arg("db_len"),
        "fp32 backward of qlora_small_forward in one call: dx, da, db (0: not computed).");
  // The same kernels (and the fused fp32 GEMM) for qpeft._C_layer, the torch-linked layer
  // call (csrc/include/qpeft/small_layer_abi.h): a static table, alive as long as the process.
  static const qpeft::SmallLayerAbi small_layer_abi{
      qpeft::kSmallLayerAbiVersion, &qc::qlora_small_forward,   &qc::qlora_small_backward,
      &qc::qgemm_4bit_f32,          &qc::qgemm_4bit_f32_active, &qc::gemv_4bit,
      &qc::lora_grad_f32,           &qc::dequantize_4bit};
  m.attr("_small_layer_abi") =
      py::capsule(static_cast<const void*>(&small_layer_abi), qpeft::kSmallLayerAbiName);
}
