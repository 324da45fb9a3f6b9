// Tile-unit ceiling of the AMX GEMM's inner loop (csrc/cpu/qgemm_amx.cpp, docs/design.md
// "AMX GEMM"): TDPBF16PS rate of the 2 x 2 C-tile block with no tile loads, with its four
// operand tiles loaded per reduction step from L1, with the W tiles streamed from a buffer
// of `kib` KiB (the decoded panel, in L2), and with the fp32 C tiles' round trip every 8
// steps (the sweep length); also the same steps with the four loads issued before the four
// products. Per-thread CPU time, best of 30 runs of 4096 steps (the shared VM's wall
// clock moves 2x with other load; CPU time does not count the time the thread is
// descheduled). Standalone (Linux, a CPU with AMX-BF16):
//
//   g++ -O2 -mamx-tile -mamx-bf16 benchmarks/amx_tiles.cpp -o /tmp/amx_tiles && /tmp/amx_tiles
//   [kib]

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

enum Mode { kNoLoads, kL1, kStreamed, kStreamedCTrip, kL1LoadsFirst, kStreamedLoadsFirst, kModes };
const char* const kNames[kModes] = {
    "no tile loads (products only)",      "2x2, operands from L1",
    "2x2, W streamed from the buffer",    "2x2, W streamed, C round trip every 8 steps",
    "2x2, operands from L1, loads first", "2x2, W streamed, loads first"};

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
  const long w_tiles = (kib < 4 ? 4 : kib) / 2 * 2;
  auto* w = static_cast<unsigned short*>(std::aligned_alloc(64, w_tiles * 1024));
  auto* x = static_cast<unsigned short*>(std::aligned_alloc(64, 64 * 1024));
  auto* c = static_cast<float*>(std::aligned_alloc(64, 4096));
  std::memset(w, 0, w_tiles * 1024);
  std::memset(x, 0, 64 * 1024);
  std::memset(c, 0, 4096);
  const long steps = 4096;
  for (int mode = 0; mode < kModes; ++mode) {
    double best = 1e30;
    for (int rep = 0; rep < 30; ++rep) {
      const double t0 = thread_seconds();
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      _tile_loadd(4, x, 64);
      _tile_loadd(5, x, 64);
      _tile_loadd(6, x, 64);
      _tile_loadd(7, x, 64);
      for (long s = 0; s < steps; ++s) {
        const unsigned short* xs = x + (s % 8) * 1024;  // a's tiles: 16 KiB, in L1
        const bool streamed =
            mode == kStreamed || mode == kStreamedCTrip || mode == kStreamedLoadsFirst;
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
        if (mode == kL1 || mode == kStreamed || mode == kStreamedCTrip)
          _tile_loadd(7, xs + 512, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
        if (mode == kStreamedCTrip && s % 8 == 7) {
          _tile_stored(0, c, 128);
          _tile_stored(1, c + 512, 128);
          _tile_stored(2, c + 16, 128);
          _tile_stored(3, c + 528, 128);
          _tile_loadd(0, c, 128);
          _tile_loadd(1, c + 512, 128);
          _tile_loadd(2, c + 16, 128);
          _tile_loadd(3, c + 528, 128);
        }
      }
      _tile_stored(0, c, 64);
      const double dt = thread_seconds() - t0;
      if (dt < best) best = dt;
    }
    const double flop = static_cast<double>(steps) * 4 * 16 * 16 * 32 * 2;
    std::printf("%-46s %6.0f GFLOP/s  %5.1f ns per TDPBF16PS\n", kNames[mode], flop / best / 1e9,
                best / (steps * 4) * 1e9);
  }
  _tile_release();
  std::free(w);
  std::free(x);
  std::free(c);
  return 0;
}
