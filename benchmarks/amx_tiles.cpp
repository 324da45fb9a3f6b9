// Tile-unit ceiling of the AMX GEMM's inner loop (csrc/cpu/qgemm_amx.cpp, docs/design.md
// "AMX GEMM"): TDPBF16PS rate of the 2 x 2 C-tile block with no tile loads, with its four
// operand tiles loaded per reduction step from L1, with the W tiles streamed from a buffer
// of `kib` KiB (the decoded panel, in L2), with the fp32 C tiles' round trip every 8, 16
// or 32 steps (the sweep length) to the same 4 KiB (L1) or to the next 32 x 32 block of a
// strided 528-float-row buffer of 256 rows (the kernel's accumulators at M = 512, in L2);
// also the same steps with the four loads issued before the four products. Per-thread CPU
// time, best of `reps` runs of 4096 steps, the modes interleaved within each run (the
// shared VM's tile rate moved 2-4x between runs seconds apart; CPU time does not count the
// time the thread is descheduled, but a busy neighbour still slows the core's caches and
// tile unit). Standalone (Linux, a CPU with AMX-BF16):
//
//   g++ -O2 -mamx-tile -mamx-bf16 benchmarks/amx_tiles.cpp -o /tmp/amx_tiles && /tmp/amx_tiles
//   [kib [reps]]

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>

namespace {

struct alignas(64) TileConfig {
  unsigned char palette_id, start_row, reserved[14];
  unsigned short colsb[16];
  unsigned char rows[16];
};

double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

enum Mode {
  kNoLoads,
  kL1,
  kStreamed,
  kStreamedCTrip8,
  kStreamedCTrip16,
  kStreamedCTrip32,
  kStreamedCL2Trip8,
  kStreamedCL2Trip16,
  kStreamedCL2Trip32,
  kL1LoadsFirst,
  kStreamedLoadsFirst,
  kModes
};
const char* const kNames[kModes] = {"no tile loads (products only)",
                                    "2x2, operands from L1",
                                    "2x2, W streamed from the buffer",
                                    "2x2, W streamed, C (L1) round trip every 8 steps",
                                    "2x2, W streamed, C (L1) round trip every 16 steps",
                                    "2x2, W streamed, C (L1) round trip every 32 steps",
                                    "2x2, W streamed, C (L2, strided) trip every 8",
                                    "2x2, W streamed, C (L2, strided) trip every 16",
                                    "2x2, W streamed, C (L2, strided) trip every 32",
                                    "2x2, operands from L1, loads first",
                                    "2x2, W streamed, loads first"};

}  // namespace

int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) != 0) {
    std::fprintf(stderr, "Linux refused AMX tile data to this process\n");
    return 1;
  }
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
  const long kib = argc > 1 ? std::atol(argv[1]) : 512;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 200;
  const long w_tiles = (kib < 4 ? 4 : kib) / 2 * 2;
  auto* w = static_cast<unsigned short*>(std::aligned_alloc(64, w_tiles * 1024));
  auto* x = static_cast<unsigned short*>(std::aligned_alloc(64, 64 * 1024));  // 32 x 2 tiles
  auto* c = static_cast<float*>(std::aligned_alloc(64, 4096));
  std::memset(w, 0, w_tiles * 1024);
  std::memset(x, 0, 64 * 1024);
  std::memset(c, 0, 4096);
  const long steps = 4096;
  // C in a strided L2 buffer as the kernel's (M=512 forward: 528 floats per row, 256 rows).
  const long ldc = 528, c_rows = 256;
  auto* cbig = static_cast<float*>(std::aligned_alloc(64, ldc * c_rows * 4));
  std::memset(cbig, 0, ldc * c_rows * 4);
  double best[kModes];
  for (double& b : best) b = 1e30;
  // Modes interleaved within each repetition: the VM's tile rate moved 2-4x between runs
  // seconds apart (another tenant on the core's sibling thread), so every mode sees the same
  // conditions and the minima compare.
  for (int rep = 0; rep < reps; ++rep) {
    for (int mode = 0; mode < kModes; ++mode) {
      const double t0 = thread_seconds();
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      _tile_loadd(4, x, 64);
      _tile_loadd(5, x, 64);
      _tile_loadd(6, x, 64);
      _tile_loadd(7, x, 64);
      const bool streamed = mode != kNoLoads && mode != kL1 && mode != kL1LoadsFirst;
      const long trip = mode == kStreamedCTrip8 || mode == kStreamedCL2Trip8     ? 8
                        : mode == kStreamedCTrip16 || mode == kStreamedCL2Trip16 ? 16
                        : mode == kStreamedCTrip32 || mode == kStreamedCL2Trip32 ? 32
                                                                                 : 0;
      const bool c_l2 =
          mode == kStreamedCL2Trip8 || mode == kStreamedCL2Trip16 || mode == kStreamedCL2Trip32;
      const long xr = trip > 8 ? trip : 8;  // a's tiles of one sweep: 2 x xr KiB
      long cpos = 0;
      for (long s = 0; s < steps; ++s) {
        const unsigned short* xs = x + (s % xr) * 1024;
        const unsigned short* ws =
            streamed ? w + (s * 2 % w_tiles) * 512 : x + ((s + 3) % 8) * 1024;
        if (mode == kNoLoads) {
        } else if (mode == kL1LoadsFirst || mode == kStreamedLoadsFirst) {
          _tile_loadd(4, ws, 64);
          _tile_loadd(5, ws + 512, 64);
          _tile_loadd(6, xs, 64);
          _tile_loadd(7, xs + 512, 64);
        } else {  // the order of qgemm_amx.cpp's micro_fwd
          _tile_loadd(6, xs, 64);
          _tile_loadd(4, ws, 64);
          _tile_loadd(5, ws + 512, 64);
        }
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 5, 6);
        if (mode != kNoLoads && mode != kL1LoadsFirst && mode != kStreamedLoadsFirst)
          _tile_loadd(7, xs + 512, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
        if (trip > 0 && s % trip == trip - 1) {
          float* cc = c;
          long ld = 128;
          if (c_l2) {  // the next 32 x 32 block of the strided buffer
            cc = cbig + (cpos / (ldc / 32) % (c_rows / 32)) * 32 * ldc + cpos % (ldc / 32) * 32;
            ld = ldc * 4;
            ++cpos;
          }
          char* c1 = reinterpret_cast<char*>(cc) + 16 * ld;
          _tile_stored(0, cc, ld);
          _tile_stored(1, c1, ld);
          _tile_stored(2, cc + 16, ld);
          _tile_stored(3, c1 + 64, ld);
          if (c_l2) {
            cc = cbig + (cpos / (ldc / 32) % (c_rows / 32)) * 32 * ldc + cpos % (ldc / 32) * 32;
            c1 = reinterpret_cast<char*>(cc) + 16 * ld;
          }
          _tile_loadd(0, cc, ld);
          _tile_loadd(1, c1, ld);
          _tile_loadd(2, cc + 16, ld);
          _tile_loadd(3, c1 + 64, ld);
        }
      }
      _tile_stored(0, c, 64);
      const double dt = thread_seconds() - t0;
      if (dt < best[mode]) best[mode] = dt;
    }
  }
  for (int mode = 0; mode < kModes; ++mode) {
    const double flop = static_cast<double>(steps) * 4 * 16 * 16 * 32 * 2;
    std::printf("%-52s %6.0f GFLOP/s  %5.1f ns per TDPBF16PS\n", kNames[mode],
                flop / best[mode] / 1e9, best[mode] / (steps * 4) * 1e9);
  }
  std::free(cbig);
  _tile_release();
  std::free(w);
  std::free(x);
  std::free(c);
  return 0;
}
