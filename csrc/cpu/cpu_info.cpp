// CPU feature detection and the choice of the kernel level (see cpu_info.h and
// docs/design.md, "CPU ISA dispatch"). Compiled without any ISA flag: cpuid and
// xgetbv are issued as inline assembly, so this file runs on any x86-64 CPU.

#include "cpu_info.h"

#include <qpeft/host_checks.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define QPEFT_X86 1
#else
#define QPEFT_X86 0
#endif

#if QPEFT_X86 && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qpeft {
namespace cpu {
namespace {

const char* const kLevelNames[kNumIsaLevels] = {"scalar", "avx2", "avx512", "avx512_bf16", "amx"};

#if QPEFT_X86
struct Regs {
  unsigned a = 0, b = 0, c = 0, d = 0;
};

Regs cpuid(unsigned leaf, unsigned sub) {
  Regs r;
  if (!__get_cpuid_count(leaf, sub, &r.a, &r.b, &r.c, &r.d)) r = Regs{};
  return r;
}

// XCR0 (which register state the OS saves on a context switch). Only valid when
// CPUID.1:ECX.OSXSAVE is set; xgetbv as bytes would need no -mxsave either.
uint64_t xgetbv0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}

bool bit(unsigned v, int i) {
  return ((v >> i) & 1u) != 0;
}

// Linux keeps AMX tile data (XCR0 bit 18) disabled per process until the process
// asks for it (arch_prctl ARCH_REQ_XCOMP_PERM, Linux >= 5.16); without the grant the
// first tile instruction faults. The request can be refused (an old kernel, a
// sigaltstack too small for the larger signal frame, seccomp): then no AMX.
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
  constexpr unsigned long kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long bitmask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0) return false;
  return ((bitmask >> kXfeatureXtiledata) & 1ul) != 0;
#else
  return false;
#endif
}
#endif  // QPEFT_X86

CpuFeatures detect() {
  CpuFeatures f;
  std::memset(&f, 0, sizeof f);
#if QPEFT_X86
  const unsigned max_leaf = cpuid(0, 0).a;
  const Regs l1 = cpuid(1, 0);
  const Regs l7 = max_leaf >= 7 ? cpuid(7, 0) : Regs{};
  const Regs l7s1 = (max_leaf >= 7 && l7.a >= 1) ? cpuid(7, 1) : Regs{};
  const bool osxsave = bit(l1.c, 27), avx = bit(l1.c, 28);
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  f.os_ymm = (xcr0 & 0x6) == 0x6;                      // SSE + AVX state
  f.os_zmm = f.os_ymm && (xcr0 & 0xe0) == 0xe0;        // opmask, ZMM_Hi256, Hi16_ZMM
  f.os_amx = f.os_zmm && (xcr0 & 0x60000) == 0x60000;  // XTILECFG, XTILEDATA
  const bool ymm = avx && f.os_ymm;
  f.avx2 = ymm && bit(l7.b, 5);
  f.fma = ymm && bit(l1.c, 12);
  f.f16c = ymm && bit(l1.c, 29);
  f.avx512f = f.os_zmm && bit(l7.b, 16);
  f.avx512dq = f.avx512f && bit(l7.b, 17);
  f.avx512bw = f.avx512f && bit(l7.b, 30);
  f.avx512vl = f.avx512f && bit(l7.b, 31);
  f.avx512vbmi = f.avx512f && bit(l7.c, 1);
  f.avx512_vnni = f.avx512f && bit(l7.c, 11);
  f.avx512_bf16 = f.avx512f && bit(l7s1.a, 5);
  f.amx_bf16 = f.os_amx && bit(l7.d, 22);
  f.amx_tile = f.os_amx && bit(l7.d, 24);
  // Asked once, and only of a CPU that has tiles: the grant is for the whole process.
  f.amx_permitted = f.amx_tile && request_amx_permission();
#endif
  return f;
}

std::string detect_model() {
  std::string s;
#if QPEFT_X86
  if (cpuid(0x80000000u, 0).a < 0x80000004u) return s;
  char brand[49] = {};
  for (unsigned i = 0; i < 3; ++i) {
    const Regs r = cpuid(0x80000002u + i, 0);
    std::memcpy(brand + 16 * i, &r.a, 4);
    std::memcpy(brand + 16 * i + 4, &r.b, 4);
    std::memcpy(brand + 16 * i + 8, &r.c, 4);
    std::memcpy(brand + 16 * i + 12, &r.d, 4);
  }
  s = brand;
  const size_t b = s.find_first_not_of(' '), e = s.find_last_not_of(' ');
  s = b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
#endif
  return s;
}

// The requirements of each level beyond the one below, as (name, present) pairs.
struct Req {
  const char* name;
  bool ok;
};

int requirements(int level, const CpuFeatures& f, Req* out) {
  int n = 0;
  switch (level) {
    case kIsaAvx2:
      out[n++] = {"avx2", f.avx2};
      out[n++] = {"fma", f.fma};
      out[n++] = {"f16c", f.f16c};
      break;
    case kIsaAvx512:
      out[n++] = {"avx512f", f.avx512f};
      out[n++] = {"avx512bw", f.avx512bw};
      out[n++] = {"avx512vl", f.avx512vl};
      out[n++] = {"avx512dq", f.avx512dq};
      break;
    case kIsaAvx512Bf16:
      out[n++] = {"avx512_bf16", f.avx512_bf16};
      break;
    case kIsaAmx:
      out[n++] = {"amx_tile", f.amx_tile};
      out[n++] = {"amx_bf16", f.amx_bf16};
      // only worth naming when the CPU has tiles but Linux refused them
      if (f.amx_tile)
        out[n++] = {"amx_permission (arch_prctl ARCH_REQ_XCOMP_PERM)", f.amx_permitted};
      break;
    default:
      break;
  }
  return n;
}

bool level_ok(int level, const CpuFeatures& f) {
  Req r[8];
  const int n = requirements(level, f, r);
  for (int i = 0; i < n; ++i)
    if (!r[i].ok) return false;
  return true;
}

IsaChoice make_choice() {
  IsaChoice c;
  c.detected = detected_level();
  c.cap = -1;
  c.chosen = c.detected;
  const char* env = std::getenv("QPEFT_CPU_ISA");
  c.env = env != nullptr ? env : "";
  if (c.env.empty()) return c;
  c.cap = parse_isa_level(c.env);
  if (c.cap < 0) {
    throw std::invalid_argument(
        std::string(QPEFT_MODULE_NAME) + ": QPEFT_CPU_ISA='" + c.env +
        "' is not a CPU ISA level; expected one of scalar, avx2, avx512, avx512_bf16, amx "
        "(or unset it to use the best level this CPU supports)");
  }
  if (c.cap > c.detected) {
    c.note = "QPEFT_CPU_ISA=" + c.env +
             " is above what this CPU supports (missing: " + missing_features(c.cap) +
             "); clamped to " + kLevelNames[c.detected];
  } else {
    c.chosen = c.cap;
  }
  return c;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const std::string& cpu_model() {
  static const std::string m = detect_model();
  return m;
}

int detected_level() {
  static const int level = [] {
    const CpuFeatures& f = cpu_features();
    int l = kIsaScalar;
    while (l + 1 < kNumIsaLevels && level_ok(l + 1, f)) ++l;
    return l;
  }();
  return level;
}

std::string missing_features(int level) {
  const CpuFeatures& f = cpu_features();
  std::string s;
  for (int l = kIsaAvx2; l <= level && l < kNumIsaLevels; ++l) {
    Req r[8];
    const int n = requirements(l, f, r);
    for (int i = 0; i < n; ++i) {
      if (r[i].ok) continue;
      if (!s.empty()) s += ", ";
      s += r[i].name;
    }
  }
  return s;
}

const char* isa_level_name(int level) {
  return level >= 0 && level < kNumIsaLevels ? kLevelNames[level] : "?";
}

int parse_isa_level(const std::string& name) {
  for (int l = 0; l < kNumIsaLevels; ++l)
    if (name == kLevelNames[l]) return l;
  return -1;
}

const IsaChoice& isa_choice() {
  // An invalid QPEFT_CPU_ISA throws out of the initializer, which leaves the static
  // uninitialized: the next call throws the same error again.
  static const IsaChoice c = make_choice();
  return c;
}

}  // namespace cpu
}  // namespace qpeft
