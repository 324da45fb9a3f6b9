// The emulation-only part of qpeft._C_cuda_emu: scheduling settings, counters
// and the test-only kernels (module `testing`). Included by
// csrc/bindings/cuda_module.cpp when it is compiled as the emulation module, so
// the kernel entry points themselves are bound by the very same code as in
// qpeft._C_cuda.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "emu_runtime.h"
#include "test_kernels.h"

namespace qpeft {
namespace emu {

inline void bind(pybind11::module_& m) {
  namespace py = pybind11;
  using release = py::call_guard<py::gil_scoped_release>;

  m.def("set_seed", &set_seed, py::arg("seed"),
        "Scheduling seed: 0 runs ready CUDA threads in order, 1 in reverse, >= 2 at random (per "
        "block, "
        "reproducibly). Default 2.");
  m.def("seed", &get_seed);
  m.def("set_workers", &set_workers, py::arg("n"),
        "OS threads running blocks in parallel; 0 restores the default ($QPEFT_EMU_WORKERS, else "
        "min(hardware threads, 4)).");
  m.def("workers", &get_workers);
  m.def(
      "stats",
      []() {
        const Stats s = get_stats();
        py::dict d;
        d["launches"] = s.launches;
        d["blocks"] = s.blocks;
        d["switches"] = s.switches;
        return d;
      },
      "Counters since import: kernel launches, blocks run, fiber context switches.");

  py::module_ t =
      m.def_submodule("testing", "Test-only kernels: emulation probes and planted bugs");
  namespace k = qpeft::emu_tests;
  t.def("probe_indices", &k::probe_indices, release());
  t.def("probe_barrier", &k::probe_barrier, release());
  t.def("probe_shuffle", &k::probe_shuffle, release());
  t.def("probe_shuffle_pairs", &k::probe_shuffle_pairs, release());
  t.def("probe_vote", &k::probe_vote, release());
  t.def("probe_atomics", &k::probe_atomics, release());
  t.def("probe_dynamic_smem", &k::probe_dynamic_smem, release());
  t.def("probe_order", &k::probe_order, release());
  t.def("probe_activemask", &k::probe_activemask, release());
  t.def("probe_mma", &k::probe_mma, release());
  t.def("probe_ldmatrix", &k::probe_ldmatrix, release());
  t.def("probe_cp_async", &k::probe_cp_async, release());
  t.def("probe_bitops", &k::probe_bitops, release());
  t.def("bug_block_index", &k::bug_block_index, release());
  t.def("bug_divergent_barrier", &k::bug_divergent_barrier, release());
  t.def("bug_missing_barrier", &k::bug_missing_barrier, release());
  t.def("bug_shuffle_lane", &k::bug_shuffle_lane, release());
  t.def("bug_shuffle_missing_lanes", &k::bug_shuffle_missing_lanes, release());
  t.def("bug_deadlock", &k::bug_deadlock, release());
  t.def("bug_spin_wait", &k::bug_spin_wait, release());
  t.def("bug_warp_sync", &k::bug_warp_sync, release());
  t.def("bug_smem_oob", &k::bug_smem_oob, release());
  t.def("bug_dynamic_smem_oob", &k::bug_dynamic_smem_oob, release());
  t.def("bug_mma_layout", &k::bug_mma_layout, release());
  t.def("bug_cp_async_pipeline", &k::bug_cp_async_pipeline, release());
}

}  // namespace emu
}  // namespace qpeft
