// qpeft._C.qgemm_4bit_dpbf16 (qgemm_avx512bf16.h): argument checks, workspace and
// threads. Compiled for the baseline; the vdpbf16ps code lives in qgemm_avx512bf16.cpp,
// entered only on a CPU where cpu_info.cpp detected AVX512-BF16 (with the OS saving ZMM
// state) and in a build whose compiler accepted the level's flags.
#include <qpeft/format.h>
#include <qpeft/host_checks.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_info.h"
#include "qgemm_avx512bf16.h"
#include "thread_pool.h"

namespace qpeft {
namespace cpu {

namespace {

// Both directions: out[m, n] = x[m, k] @ W^T, or with dx out[m, k] = x[m, n] @ W.
void run(bool dx, uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k, uintptr_t packed,
         int64_t packed_len, uintptr_t absmax, int64_t absmax_len, int64_t blocksize,
         int quant_type, uintptr_t nested_absmax, int64_t nested_absmax_len, uintptr_t nested_code,
         uintptr_t offset, int64_t nested_blocksize, uintptr_t out, int64_t out_len,
         int num_threads) {
  using namespace host;
  const char* fn = dx ? "qgemm_4bit_dpbf16_dx" : "qgemm_4bit_dpbf16";
  const int64_t red = dx ? n : k, cols = dx ? k : n;  // reduction length, output columns
  check_nonneg(fn, "m", m);
  check_nonneg(fn, "n", n);
  check_nonneg(fn, "k", k);
  if (blocksize < 2 || blocksize % 2 != 0)
    fail(fn, "blocksize must be an even number >= 2, got " + std::to_string(blocksize));
  check_quant_type(fn, quant_type);
  const int64_t numel = checked_mul(fn, "n", n, "k", k);
  const int64_t blocks = ceil_div(numel, blocksize);
  check_len(fn, "x", x_len, checked_mul(fn, "m", m, dx ? "n" : "k", red));
  check_len(fn, "packed", packed_len, packed4_len(numel));
  check_len(fn, "absmax", absmax_len, blocks);
  check_len(fn, "out", out_len, checked_mul(fn, "m", m, dx ? "k" : "n", cols));
  const bool nested = nested_absmax != 0;
  if (nested) {
    check_positive(fn, "nested_blocksize", nested_blocksize);
    check_len(fn, "nested_absmax", nested_absmax_len, ceil_div(blocks, nested_blocksize));
  }
  if (detected_level() < kIsaAvx512Bf16) {
    fail(fn, std::string("needs AVX512-BF16; this CPU (or OS) lacks ") +
                 missing_features(kIsaAvx512Bf16));
  }
#if !QPEFT_HAVE_AVX512_BF16_TU
  fail(fn, "this build has no avx512_bf16 kernels (the compiler rejected the level's flags)");
#else
  if (m == 0 || cols == 0) return;
  check_ptr(fn, "out", out);
  if (red == 0) {  // empty sums
    std::memset(reinterpret_cast<void*>(out), 0, static_cast<size_t>(m * cols) * sizeof(float));
    return;
  }
  check_ptr(fn, "x", x);
  check_ptr(fn, "packed", packed);
  check_ptr(fn, "absmax", absmax);
  if (nested) {
    check_ptr(fn, "nested_absmax", nested_absmax);
    check_ptr(fn, "nested_code", nested_code);
    check_ptr(fn, "offset", offset);
  }
  DpGemmArgs g{};
  g.x = reinterpret_cast<const uint16_t*>(x);
  g.m = m;
  g.n = n;
  g.k = k;
  g.packed = reinterpret_cast<const uint8_t*>(packed);
  g.blocksize = blocksize;
  g.quant_type = quant_type;
  g.absmax = nested ? nullptr : reinterpret_cast<const float*>(absmax);
  g.absmax_q = nested ? reinterpret_cast<const uint8_t*>(absmax) : nullptr;
  g.nested_absmax = nested ? reinterpret_cast<const float*>(nested_absmax) : nullptr;
  g.nested_code = nested ? reinterpret_cast<const float*>(nested_code) : nullptr;
  g.offset = nested ? *reinterpret_cast<const float*>(offset) : 0.0f;
  g.nested_blocksize = nested ? nested_blocksize : 1;
  g.out = reinterpret_cast<float*>(out);

  // forward: tiles of kDpRowsPerTile rows of W; dx: strips of kDpDxCols columns of W
  const int64_t tiles = dx ? ceil_div(k, kDpDxCols) : ceil_div(n, kDpRowsPerTile);
  int64_t tasks = num_threads < 1 ? 1 : num_threads;
  if (tasks > tiles) tasks = tiles;
  // ~64K weights per task at least (as gemv.cpp): below that a worker's wake-up costs
  // more than its share
  const int64_t by_work = numel / (int64_t{1} << 16) + 1;
  if (tasks > by_work) tasks = by_work;
  const int64_t ws_bytes = dx ? dpbf16_dx_workspace_bytes(g) : dpbf16_workspace_bytes(g);
  const size_t total =
      checked_bytes(fn, "workspace", checked_mul(fn, "tasks", tasks, "workspace", ws_bytes), 1);
  struct Free {
    void* p;
    ~Free() { std::free(p); }
  } ws{std::aligned_alloc(64, total)};
  if (ws.p == nullptr)
    fail(fn, "cannot allocate a workspace of " + std::to_string(total) + " bytes");
  char* base = static_cast<char*>(ws.p);
  // Passes of at most kDpRowsPerPass rows of x, each decoding W once more: the x rows a
  // W tile multiplies (rows x 2048 bf16) stay in L2 (dx: the out strip, rows x 128 fp32).
  for (int64_t m0 = 0; m0 < m; m0 += kDpRowsPerPass) {
    g.m = m - m0 < kDpRowsPerPass ? m - m0 : kDpRowsPerPass;
    g.x = reinterpret_cast<const uint16_t*>(x) + m0 * red;
    g.out = reinterpret_cast<float*>(out) + m0 * cols;
    parallel_tasks(tasks, [&](int64_t t) {
      const int64_t per = tiles / tasks, extra = tiles % tasks;
      const int64_t t0 = t * per + (t < extra ? t : extra);
      const int64_t t1 = t0 + per + (t < extra ? 1 : 0);
      if (dx)
        dpbf16_dx_strips(g, t0, t1, base + t * ws_bytes);
      else
        dpbf16_gemm_tiles(g, t0, t1, base + t * ws_bytes);
    });
  }
#endif
}

}  // namespace

void qgemm_4bit_dpbf16(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                       uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                       int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                       int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                       int64_t nested_blocksize, uintptr_t out, int64_t out_len, int num_threads) {
  run(false, x, x_len, m, n, k, packed, packed_len, absmax, absmax_len, blocksize, quant_type,
      nested_absmax, nested_absmax_len, nested_code, offset, nested_blocksize, out, out_len,
      num_threads);
}

void qgemm_4bit_dpbf16_dx(uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                          uintptr_t packed, int64_t packed_len, uintptr_t absmax,
                          int64_t absmax_len, int64_t blocksize, int quant_type,
                          uintptr_t nested_absmax, int64_t nested_absmax_len, uintptr_t nested_code,
                          uintptr_t offset, int64_t nested_blocksize, uintptr_t out,
                          int64_t out_len, int num_threads) {
  run(true, x, x_len, m, n, k, packed, packed_len, absmax, absmax_len, blocksize, quant_type,
      nested_absmax, nested_absmax_len, nested_code, offset, nested_blocksize, out, out_len,
      num_threads);
}

}  // namespace cpu
}  // namespace qpeft
