// Run-time ISA detection and the level the CPU kernels run at (docs/design.md,
// "CPU ISA dispatch").
//
// The CPU is probed once (cpuid, plus xgetbv for the register state the OS saves, plus
// the Linux permission request AMX tile data needs) and mapped to one level:
//
//   scalar < avx2 < avx512 < avx512_bf16 < amx
//
// Each level implies the ones below. The kernels of a level live in translation units
// compiled with that level's target flags only (CMakeLists.txt: qpeft_isa_sources);
// nothing here is compiled with them. QPEFT_CPU_ISA caps the level (read once);
// set_isa (tests, A/B runs) overrides it.
#pragma once

#include <cstdint>
#include <string>

namespace qpeft {
namespace cpu {

enum IsaLevel : int {
  kIsaScalar = 0,
  kIsaAvx2 = 1,
  kIsaAvx512 = 2,
  kIsaAvx512Bf16 = 3,
  kIsaAmx = 4,
};
constexpr int kNumIsaLevels = 5;

// What cpuid and the OS report. A feature bit counts only with the OS saving its
// register state (os_ymm / os_zmm / os_amx from XCR0), so e.g. avx512f is false on
// a kernel that does not enable ZMM state.
struct CpuFeatures {
  bool avx2, fma, f16c;
  bool avx512f, avx512bw, avx512vl, avx512dq, avx512vbmi;
  bool avx512_bf16, avx512_vnni;
  bool amx_tile, amx_bf16;
  bool os_ymm, os_zmm, os_amx;  // XCR0: YMM, opmask+ZMM, XTILECFG+XTILEDATA state enabled
  bool amx_permitted;           // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) granted
};

// Detected once (thread-safe), never throws.
const CpuFeatures& cpu_features();
// cpuid's brand string ("" when the CPU has none).
const std::string& cpu_model();
// The highest level whose every requirement holds.
int detected_level();
// Features `level` needs that this CPU (or OS) lacks, comma-separated ("" if none).
std::string missing_features(int level);

// "scalar", "avx2", ... (level in range).
const char* isa_level_name(int level);
// -1 for an unknown name.
int parse_isa_level(const std::string& name);

// The QPEFT_CPU_ISA cap and the level chosen from it, decided on first use.
struct IsaChoice {
  int detected;
  int cap;           // -1: no cap set
  int chosen;        // min(detected, cap)
  std::string env;   // the variable's value ("" when unset)
  std::string note;  // why chosen differs from the cap, if it does
};
// Throws std::invalid_argument (Python ValueError) naming the variable and the valid
// values when QPEFT_CPU_ISA holds anything else; every call then throws again.
const IsaChoice& isa_choice();

// The level the kernels use now: isa_choice().chosen unless set_isa overrode it.
// Throws like isa_choice() on an invalid QPEFT_CPU_ISA.
int active_level();

}  // namespace cpu
}  // namespace qpeft
