// Settings and counters of the CUDA emulation runtime (csrc/emu/runtime.cpp),
// for the bindings of qpeft._C_cuda_emu. Plain C++: no CUDA headers.
#pragma once

#include <cstdint>
#include <string>

namespace qpeft {
namespace emu {

// Scheduling seed: 0 runs ready threads in order, 1 in reverse, >= 2 picks at
// random (reproducibly per block). Default 2, or $QPEFT_EMU_SEED; tests sweep it.
void set_seed(std::uint64_t seed);
std::uint64_t get_seed();

// OS threads running blocks in parallel (0 = default: $QPEFT_EMU_WORKERS, else
// min(hardware threads, 4)).
void set_workers(int n);
int get_workers();

struct Stats {
  std::uint64_t launches;
  std::uint64_t blocks;
  std::uint64_t switches;  // fiber context switches
};
Stats get_stats();

// Raised by the bounds sanitizer's handlers: fails the running block.
[[noreturn]] void out_of_bounds(const char* msg);

}  // namespace emu
}  // namespace qpeft
