// qpeft._C.qgemm_4bit_f32 (qgemm_f32.h): argument checks, workspace and threads.
// Compiled for the baseline; the AVX2/FMA code lives in qgemm_f32_avx2.cpp, entered only
// at the avx2 level or above (the chosen level: QPEFT_CPU_ISA and set_isa move it) and in
// a build whose compiler accepted the level's flags.
#include <qpeft/host_checks.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu_info.h"
#include "qgemm_f32.h"
#include "thread_pool.h"

namespace qpeft {
namespace cpu {

namespace {

// Default blocking (docs/design.md, "fp32 GEMM"): panels of 512 reduction elements x 128
// output columns (256 KiB of fp32, in L2). 512 x 128 took 13.6 ms where 256 x 256 took
// 19.8 at M = 16 (4096x4096, 1 thread: half the row segments, so half the per-segment
// decode overhead) and tied at M = 512; 256 x 512 (a 512 KiB panel) ran 1.7x slower.
constexpr int64_t kDefaultColBlock = 128;
constexpr int64_t kDefaultRedBlock = 512;

int64_t block_arg(const char* fn, const char* name, int64_t v, int64_t dflt, int64_t multiple) {
  if (v == 0) return dflt;
  if (v < multiple || v % multiple != 0 || v > 8192) {
    host::fail(fn, std::string(name) + " must be 0 (the default) or a multiple of " +
                       std::to_string(multiple) + " in [" + std::to_string(multiple) +
                       ", 8192], got " + std::to_string(v));
  }
  return v;
}

// ValueError unless the CPU kernels run at the avx2 level or above now.
void require_avx2(const char* fn) {
  if (active_level() >= kIsaAvx2) return;
  const std::string lacks = missing_features(kIsaAvx2);
  host::fail(fn, std::string("needs the avx2 level; the kernels run at ") +
                     isa_level_name(active_level()) +
                     (lacks.empty() ? " (QPEFT_CPU_ISA or set_isa capped the level)"
                                    : " (this CPU lacks " + lacks + ")"));
}

// log2(v) for a power of two, else -1.
int log2_exact(int64_t v) {
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int s = 0;
  while ((int64_t{1} << s) < v) ++s;
  return s;
}

}  // namespace

void qgemm_4bit_f32(bool dx, uintptr_t x, int64_t x_len, int64_t m, int64_t n, int64_t k,
                    uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                    int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                    int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                    int64_t nested_blocksize, uintptr_t lora_l, int64_t lora_l_len,
                    uintptr_t lora_r, int64_t lora_r_len, int64_t rank, uintptr_t out,
                    int64_t out_len, bool accumulate, uintptr_t extra, int64_t extra_len,
                    int64_t extra_cols, uintptr_t out2, int64_t out2_len, int64_t col_block,
                    int64_t red_block, int num_threads) {
  using namespace host;
  const char* fn = dx ? "qgemm_4bit_f32_dx" : "qgemm_4bit_f32";
  const int64_t red = dx ? n : k, cols = dx ? k : n;  // reduction length, output columns
  check_nonneg(fn, "m", m);
  check_nonneg(fn, "n", n);
  check_nonneg(fn, "k", k);
  check_positive(fn, "blocksize", blocksize);
  check_quant_type(fn, quant_type);
  check_nonneg(fn, "rank", rank);
  col_block = block_arg(fn, "col_block", col_block, kDefaultColBlock, kF32Nr);
  red_block = block_arg(fn, "red_block", red_block, kDefaultRedBlock, 1);
  const int64_t numel = checked_mul(fn, "n", n, "k", k);
  const int64_t blocks = ceil_div(numel, blocksize);
  check_len(fn, "x", x_len, checked_mul(fn, "m", m, dx ? "n" : "k", red));
  check_len(fn, "packed", packed_len, packed4_len(numel));
  check_len(fn, "absmax", absmax_len, blocks);
  check_len(fn, "out", out_len, checked_mul(fn, "m", m, dx ? "k" : "n", cols));
  if (rank > 0) {
    check_len(fn, "lora_l", lora_l_len, checked_mul(fn, "n", n, "rank", rank));
    check_len(fn, "lora_r", lora_r_len, checked_mul(fn, "rank", rank, "k", k));
  }
  check_nonneg(fn, "extra_cols", extra_cols);
  if (extra_cols > 256)
    fail(fn, "extra_cols must be at most 256, got " + std::to_string(extra_cols));
  if (extra_cols > 0) {
    check_len(fn, "extra", extra_len, checked_mul(fn, "extra_cols", extra_cols, "red", red));
    check_len(fn, "out2", out2_len, checked_mul(fn, "m", m, "extra_cols", extra_cols));
  }
  const bool nested = nested_absmax != 0;
  if (nested) {
    check_positive(fn, "nested_blocksize", nested_blocksize);
    check_len(fn, "nested_absmax", nested_absmax_len, ceil_div(blocks, nested_blocksize));
  }
  require_avx2(fn);
#if !QPEFT_HAVE_AVX2_TU
  fail(fn, "this build has no avx2 kernels (the compiler rejected the level's flags)");
#else
  if (m == 0) return;
  if (cols > 0) check_ptr(fn, "out", out);
  if (extra_cols > 0) check_ptr(fn, "out2", out2);
  if (red == 0) {  // empty sums
    if (!accumulate && cols > 0)
      std::memset(reinterpret_cast<void*>(out), 0, static_cast<size_t>(m * cols) * sizeof(float));
    if (extra_cols > 0)
      std::memset(reinterpret_cast<void*>(out2), 0,
                  static_cast<size_t>(m * extra_cols) * sizeof(float));
    return;
  }
  if (extra_cols > 0) check_ptr(fn, "extra", extra);
  check_ptr(fn, "x", x);
  check_ptr(fn, "packed", packed);
  check_ptr(fn, "absmax", absmax);
  if (nested) {
    check_ptr(fn, "nested_absmax", nested_absmax);
    check_ptr(fn, "nested_code", nested_code);
    check_ptr(fn, "offset", offset);
  }
  if (rank > 0) {
    check_ptr(fn, "lora_l", lora_l);
    check_ptr(fn, "lora_r", lora_r);
  }
  F32GemmArgs g{};
  g.dx = dx;
  g.x = reinterpret_cast<const float*>(x);
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
  g.blocksize_shift = log2_exact(blocksize);
  g.nested_shift = log2_exact(g.nested_blocksize);
  g.rank = rank;
  g.lora_l = rank > 0 ? reinterpret_cast<const float*>(lora_l) : nullptr;
  g.lora_r = rank > 0 ? reinterpret_cast<const float*>(lora_r) : nullptr;
  g.out = reinterpret_cast<float*>(out);
  g.accumulate = accumulate;
  g.extra_cols = extra_cols;
  g.extra = extra_cols > 0 ? reinterpret_cast<const float*>(extra) : nullptr;
  g.out2 = extra_cols > 0 ? reinterpret_cast<float*>(out2) : nullptr;
  // as many column blocks as a multiple of the threads (each thread the same share), none
  // wider than col_block, each a multiple of the strip width
  const int64_t threads = num_threads < 1 ? 1 : num_threads;
  const int64_t strips = ceil_div(cols, kF32Nr);
  const int64_t rounds = ceil_div(strips, threads * (col_block / kF32Nr));
  g.col_block = strips == 0 ? kF32Nr : ceil_div(strips, threads * rounds) * kF32Nr;
  if (g.col_block < extra_cols) g.col_block = ceil_div(extra_cols, kF32Nr) * kF32Nr;
  g.red_block = red < red_block ? red : red_block;

  // out's column blocks, then one for the extra columns (handed out last: the narrowest)
  const int64_t col_blocks = ceil_div(cols, g.col_block) + (extra_cols > 0 ? 1 : 0);
  const int64_t tasks = threads < col_blocks ? threads : col_blocks;
  const int64_t ws_bytes = f32gemm_workspace_bytes(g);
  const size_t total =
      checked_bytes(fn, "workspace", checked_mul(fn, "tasks", tasks, "workspace", ws_bytes), 1);
  struct Free {
    void* p;
    ~Free() { std::free(p); }
  } ws{std::aligned_alloc(64, total)};
  if (ws.p == nullptr)
    fail(fn, "cannot allocate a workspace of " + std::to_string(total) + " bytes");
  char* base = static_cast<char*>(ws.p);
  // Column blocks handed out one at a time (as the AMX GEMM, qgemm.cpp): each block is
  // computed by one task in one order, so the result does not depend on who takes it.
  std::atomic<int64_t> next{0};
  parallel_tasks(tasks, [&](int64_t t) {
    for (int64_t b = next.fetch_add(1); b < col_blocks; b = next.fetch_add(1))
      f32gemm_cols(g, b, b + 1, base + t * ws_bytes);
  });
#endif
}

void lora_grad_f32(uintptr_t g, int64_t g_len, int64_t g_stride_m, int64_t g_stride_r, int64_t m,
                   int64_t r, double scaling, uintptr_t q, int64_t q_len, int64_t cols,
                   uintptr_t out, int64_t out_len, bool transpose_out, int num_threads) {
  using namespace host;
  const char* fn = "lora_grad_f32";
  check_nonneg(fn, "m", m);
  check_nonneg(fn, "r", r);
  check_nonneg(fn, "cols", cols);
  check_nonneg(fn, "g_stride_m", g_stride_m);
  check_nonneg(fn, "g_stride_r", g_stride_r);
  check_len(fn, "q", q_len, checked_mul(fn, "m", m, "cols", cols));
  check_len(fn, "out", out_len, checked_mul(fn, "r", r, "cols", cols));
  if (m > 0 && r > 0) {  // the last element of G: (m - 1) g_stride_m + (r - 1) g_stride_r
    const int64_t last = checked_mul(fn, "m - 1", m - 1, "g_stride_m", g_stride_m) +
                         checked_mul(fn, "r - 1", r - 1, "g_stride_r", g_stride_r);
    if (last >= g_len || last < 0)
      fail(fn, "g holds " + std::to_string(g_len) + " elements, its strides reach element " +
                   std::to_string(last));
  }
  require_avx2(fn);
#if !QPEFT_HAVE_AVX2_TU
  fail(fn, "this build has no avx2 kernels (the compiler rejected the level's flags)");
#else
  if (r == 0 || cols == 0) return;
  check_ptr(fn, "out", out);
  float* o = reinterpret_cast<float*>(out);
  if (m == 0) {
    std::memset(o, 0, static_cast<size_t>(r * cols) * sizeof(float));
    return;
  }
  check_ptr(fn, "g", g);
  check_ptr(fn, "q", q);
  // gs [r, m] = fl(G^T s): s rounded to fp32 first, as torch multiplies an fp32 tensor by
  // a Python float
  const size_t gs_bytes = checked_bytes(fn, "scaled g", checked_mul(fn, "r", r, "m", m), 4);
  struct Free {
    void* p;
    ~Free() { std::free(p); }
  } gs{std::malloc(gs_bytes)};
  if (gs.p == nullptr) fail(fn, "cannot allocate " + std::to_string(gs_bytes) + " bytes");
  float* gsp = static_cast<float*>(gs.p);
  const float* gp = reinterpret_cast<const float*>(g);
  const float s = static_cast<float>(scaling);
  for (int64_t j = 0; j < r; ++j)
    for (int64_t i = 0; i < m; ++i) gsp[j * m + i] = gp[i * g_stride_m + j * g_stride_r] * s;
  const LoraGradArgs a{gsp, reinterpret_cast<const float*>(q), o, m, r, cols, transpose_out};
  // near-equal runs of 16-column strips per thread; each output is the same sum whoever
  // computes it
  const int64_t strips = ceil_div(cols, kF32Nr);
  const int64_t threads = num_threads < 1 ? 1 : num_threads;
  const int64_t tasks = threads < strips ? threads : strips;
  parallel_tasks(tasks, [&](int64_t t) {
    const int64_t s0 = strips * t / tasks, s1 = strips * (t + 1) / tasks;
    lora_grad_cols(a, s0 * kF32Nr, std::min(cols, s1 * kF32Nr));
  });
#endif
}

bool qgemm_4bit_f32_active() {
#if QPEFT_HAVE_AVX2_TU
  return active_level() == kIsaAvx2;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace qpeft
