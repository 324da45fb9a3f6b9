// Entry points of the AMX 4-bit GEMM (qgemm_amx.h): argument checks, workspace and
// threads. Compiled for the baseline; the tile code lives in qgemm_amx.cpp, entered
// only on a CPU where cpu_info.cpp detected the amx level.
//
// The OS permission. Linux enables AMX tile data per process: cpu_info.cpp's detection
// (run once, before detected_level() can answer kIsaAmx) asks for it with
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) and checks the grant with
// ARCH_GET_XCOMP_PERM. The grant belongs to the process (the thread group), so it covers
// every thread that runs tiles here: the caller, qpeft's own pool and torch's OpenMP
// workers, whether created before or after the request. The entry point checks
// detected_level() >= kIsaAmx before any tile instruction, so the request has always
// been made (and granted) first. Each task loads its tile configuration itself on entry
// and releases the tiles before it returns (amx_gemm_cols), so a pool or OpenMP thread
// that runs other AMX code (oneDNN) between our tasks never sees our configuration, nor
// we its.

#include <qpeft/format.h>
#include <qpeft/host_checks.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#include "api.h"
#include "cpu_info.h"
#include "qgemm_amx.h"
#include "thread_pool.h"

namespace qpeft {
namespace cpu {
namespace {

using host::ceil_div;
using host::check_len;
using host::check_ptr;
using host::fail;

// Rows of a per call at most: the fp32 accumulators of a column block (rows x
// col_block x 4 bytes) stay within about 1 MiB of L2 at the default blocking; a larger
// m runs in chunks, each decoding W once more (at 1024 rows a few percent of the time).
constexpr int64_t kMaxRowsPerPass = 1024;

// Default blocking, measured on the 2-core Sapphire Rapids-class VM (docs/design.md,
// "AMX GEMM"): W panels of 256 columns x 1024 reduction elements (512 KiB of bf16 in L2).
// dx decodes W by row pairs over a column range: longer column blocks keep its runs of
// packed bytes per row long (dx: 1024 x 256; M=16 ran 1.3-1.6x faster than 256 x 512).
constexpr int64_t kDefaultColBlock = 256;
constexpr int64_t kDefaultRedBlock = 1024;
constexpr int64_t kDefaultColBlockDx = 1024;
constexpr int64_t kDefaultRedBlockDx = 256;

// A per-thread workspace reused across calls (no page faults on a fresh buffer each
// call); requests above kKeepBytes get a buffer of their own for the call.
constexpr size_t kKeepBytes = size_t{64} << 20;

struct Buffer {
  void* p = nullptr;
  size_t bytes = 0;
  ~Buffer() { std::free(p); }
};
thread_local Buffer t_kept;

struct CallBuffer {
  void* own = nullptr;
  ~CallBuffer() { std::free(own); }
};

void* alloc64(const char* fn, size_t bytes) {
  const size_t rounded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded == 0 ? 64 : rounded);
  if (p == nullptr) fail(fn, "cannot allocate a workspace of " + std::to_string(bytes) + " bytes");
  return p;
}

void* workspace(const char* fn, size_t bytes, CallBuffer& call) {
  if (bytes > kKeepBytes) {
    call.own = alloc64(fn, bytes);
    return call.own;
  }
  if (t_kept.bytes < bytes) {
    std::free(t_kept.p);
    t_kept.p = nullptr;
    t_kept.bytes = 0;
    t_kept.p = alloc64(fn, bytes);
    t_kept.bytes = bytes;
  }
  return t_kept.p;
}

int64_t block_arg(const char* fn, const char* name, int64_t v, int64_t dflt) {
  if (v == 0) return dflt;
  if (v < 32 || v % 32 != 0 || v > 8192) {
    fail(fn, std::string(name) +
                 " must be 0 (the default) or a multiple of 32 in [32, 8192], got " +
                 std::to_string(v));
  }
  return v;
}

}  // namespace

void qgemm_4bit_amx(bool dx, uintptr_t a, int64_t a_len, int64_t m, int64_t n, int64_t k,
                    uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                    int64_t blocksize, int quant_type, uintptr_t nested_absmax,
                    int64_t nested_absmax_len, uintptr_t nested_code, uintptr_t offset,
                    int64_t nested_blocksize, uintptr_t out, int64_t out_len, int out_dtype,
                    bool accumulate, uintptr_t lora_l, int64_t lora_l_len, uintptr_t lora_r,
                    int64_t lora_r_len, int64_t rank, int64_t col_block, int64_t red_block,
                    int num_threads) {
  const char* fn = dx ? "qgemm_4bit_amx_dx" : "qgemm_4bit_amx";
  host::check_nonneg(fn, "m", m);
  host::check_nonneg(fn, "n", n);
  host::check_nonneg(fn, "k", k);
  host::check_positive(fn, "blocksize", blocksize);
  host::check_quant_type(fn, quant_type);
  if (out_dtype != kF32 && out_dtype != kBF16)
    fail(fn, "out_dtype must be 0 (float32) or 2 (bfloat16), got " + std::to_string(out_dtype));
  if (accumulate && out_dtype != kF32) fail(fn, "accumulate needs a float32 out");
  col_block = block_arg(fn, "col_block", col_block, dx ? kDefaultColBlockDx : kDefaultColBlock);
  red_block = block_arg(fn, "red_block", red_block, dx ? kDefaultRedBlockDx : kDefaultRedBlock);
  const int64_t numel = host::checked_mul(fn, "n", n, "k", k);
  const int64_t red = dx ? n : k, cols = dx ? k : n;
  check_len(fn, "a", a_len, host::checked_mul(fn, "m", m, dx ? "n" : "k", red));
  check_len(fn, "out", out_len, host::checked_mul(fn, "m", m, dx ? "k" : "n", cols));
  check_len(fn, "packed", packed_len, host::packed4_len(numel));
  host::check_nonneg(fn, "rank", rank);
  if (rank > 0) {
    check_len(fn, "lora_l", lora_l_len, host::checked_mul(fn, "m", m, "rank", rank));
    check_len(fn, "lora_r", lora_r_len, host::checked_mul(fn, "rank", rank, "cols", cols));
  }
  const int64_t blocks = ceil_div(numel, blocksize);
  check_len(fn, "absmax", absmax_len, blocks);
  const bool nested = nested_absmax != 0;
  if (nested) {
    host::check_positive(fn, "nested_blocksize", nested_blocksize);
    check_len(fn, "nested_absmax", nested_absmax_len, ceil_div(blocks, nested_blocksize));
  }
  if (detected_level() < kIsaAmx) {
    fail(fn,
         std::string("needs AMX-BF16 tiles; this CPU (or OS) lacks ") + missing_features(kIsaAmx));
  }
#if !QPEFT_HAVE_AMX_TU
  fail(fn, "this build has no AMX kernels (the compiler rejected the amx level's flags)");
#else
  if (m == 0 || cols == 0) return;
  check_ptr(fn, "out", out);
  if (rank > 0) {
    check_ptr(fn, "lora_l", lora_l);
    check_ptr(fn, "lora_r", lora_r);
  }
  if (red == 0) {  // an empty sum: zeros (or out unchanged when accumulating), + the LoRA term
    if (rank > 0) {
      const float* l = reinterpret_cast<const float*>(lora_l);
      const float* r = reinterpret_cast<const float*>(lora_r);
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t c = 0; c < cols; ++c) {
          float lo = l[i * rank] * r[c];  // the epilogue's order: q ascending, then the add
          for (int64_t q = 1; q < rank; ++q) lo = std::fma(l[i * rank + q], r[q * cols + c], lo);
          const int64_t o = i * cols + c;
          if (out_dtype == kF32) {
            float* dst = reinterpret_cast<float*>(out) + o;
            *dst = accumulate ? *dst + (0.0f + lo) : 0.0f + lo;
          } else {
            reinterpret_cast<uint16_t*>(out)[o] = f32_to_bf16(0.0f + lo);
          }
        }
      }
    } else if (!accumulate) {
      const int64_t bytes = m * cols * (out_dtype == kF32 ? 4 : 2);
      std::memset(reinterpret_cast<void*>(out), 0, static_cast<size_t>(bytes));
    }
    return;
  }
  check_ptr(fn, "a", a);
  check_ptr(fn, "packed", packed);
  check_ptr(fn, "absmax", absmax);
  float off = 0.0f;
  if (nested) {
    check_ptr(fn, "nested_code", nested_code);
    check_ptr(fn, "offset", offset);
    off = *reinterpret_cast<const float*>(offset);
  }
  AmxGemmArgs g{};
  g.dx = dx;
  g.n = n;
  g.k = k;
  g.packed = reinterpret_cast<const uint8_t*>(packed);
  g.blocksize = blocksize;
  g.quant_type = quant_type;
  g.absmax = nested ? nullptr : reinterpret_cast<const float*>(absmax);
  g.absmax_q = nested ? reinterpret_cast<const uint8_t*>(absmax) : nullptr;
  g.nested_absmax = nested ? reinterpret_cast<const float*>(nested_absmax) : nullptr;
  g.nested_code = nested ? reinterpret_cast<const float*>(nested_code) : nullptr;
  g.offset = off;
  g.nested_blocksize = nested ? nested_blocksize : 1;
  g.out_dtype = out_dtype;
  g.accumulate = accumulate;
  g.rank = rank;
  g.lora_r = rank > 0 ? reinterpret_cast<const float*>(lora_r) : nullptr;
  g.col_block = col_block;
  g.red_block = red_block;

  const int64_t out_elem = out_dtype == kF32 ? 4 : 2;
  const int64_t col_blocks = ceil_div(cols, col_block);
  const int64_t threads = num_threads < 1 ? 1 : num_threads;
  const int64_t tasks = threads < col_blocks ? threads : col_blocks;
  for (int64_t m0 = 0; m0 < m; m0 += kMaxRowsPerPass) {
    g.m = m - m0 < kMaxRowsPerPass ? m - m0 : kMaxRowsPerPass;
    g.a = reinterpret_cast<const uint16_t*>(a) + m0 * red;
    g.out = reinterpret_cast<char*>(out) + m0 * cols * out_elem;
    g.lora_l = rank > 0 ? reinterpret_cast<const float*>(lora_l) + m0 * rank : nullptr;
    const int64_t ap_bytes = (amx_ap_elems(g) * 2 + 63) / 64 * 64;
    const int64_t ws_bytes = amx_workspace_bytes(g);
    CallBuffer call;
    char* base = static_cast<char*>(workspace(
        fn,
        static_cast<size_t>(host::checked_bytes(fn, "workspace", ap_bytes + tasks * ws_bytes, 1)),
        call));
    g.ap = reinterpret_cast<uint16_t*>(base);
    const int64_t mt_n = ceil_div(g.m, 16);
    parallel_ranges(mt_n, tasks, [&](int64_t t0, int64_t t1) { amx_repack_a(g, t0, t1); });
    // Column blocks are handed out one at a time (an atomic counter), not as one fixed
    // range per thread: on a shared machine a thread that loses its core for a while no
    // longer holds back the whole call, the others take its blocks. Each block is still
    // computed by one task in one order: the results do not depend on who takes it.
    std::atomic<int64_t> next{0};
    parallel_tasks(tasks, [&](int64_t t) {
      for (int64_t cb = next.fetch_add(1); cb < col_blocks; cb = next.fetch_add(1))
        amx_gemm_cols(g, cb, cb + 1, base + ap_bytes + t * ws_bytes);
    });
  }
#endif
}

void lora_grad_amx(uintptr_t l, int64_t l_len, int64_t rank, uintptr_t x, int64_t x_len, int64_t m,
                   int64_t cols, uintptr_t out, int64_t out_len, bool transpose, int num_threads) {
  const char* fn = "lora_grad_amx";
  host::check_nonneg(fn, "rank", rank);
  host::check_nonneg(fn, "m", m);
  host::check_nonneg(fn, "cols", cols);
  check_len(fn, "l", l_len, host::checked_mul(fn, "m", m, "rank", rank));
  check_len(fn, "x", x_len, host::checked_mul(fn, "m", m, "cols", cols));
  check_len(fn, "out", out_len, host::checked_mul(fn, "rank", rank, "cols", cols));
  if (detected_level() < kIsaAmx) {
    fail(fn,
         std::string("needs the amx level; this CPU (or OS) lacks ") + missing_features(kIsaAmx));
  }
#if !QPEFT_HAVE_AMX_TU
  fail(fn, "this build has no AMX kernels (the compiler rejected the amx level's flags)");
#else
  if (rank == 0 || cols == 0) return;
  check_ptr(fn, "out", out);
  if (m == 0) {  // an empty sum
    std::memset(reinterpret_cast<void*>(out), 0, static_cast<size_t>(rank * cols * 4));
    return;
  }
  check_ptr(fn, "l", l);
  check_ptr(fn, "x", x);
  // l with its rows padded to a multiple of 16 ranks (zeros): every pass holds 16 ranks;
  // then each task's accumulators (lda x its columns rounded up to 16), 64-byte aligned
  const int64_t lda = ceil_div(rank, 16) * 16;
  const int64_t chunks = ceil_div(cols, 16);
  const int64_t threads = num_threads < 1 ? 1 : num_threads;
  const int64_t tasks = threads < chunks ? threads : chunks;
  const int64_t per_task = host::checked_mul(fn, "rank", lda, "cols", 16 * ceil_div(chunks, tasks));
  const int64_t lp_elems = ceil_div(host::checked_mul(fn, "m", m, "rank", lda), 16) * 16;
  CallBuffer call;
  float* lp = static_cast<float*>(
      workspace(fn, host::checked_bytes(fn, "workspace", lp_elems + tasks * per_task, 4), call));
  const float* ls = reinterpret_cast<const float*>(l);
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(lp + i * lda, ls + i * rank, static_cast<size_t>(rank) * 4);
    std::memset(lp + i * lda + rank, 0, static_cast<size_t>(lda - rank) * 4);
  }
  parallel_tasks(tasks, [&](int64_t t) {
    const int64_t per = chunks / tasks, extra = chunks % tasks;
    const int64_t b0 = t * per + (t < extra ? t : extra);
    const int64_t b1 = b0 + per + (t < extra ? 1 : 0);
    amx_lora_grad_cols(lp, lda, rank, reinterpret_cast<const uint16_t*>(x), m, cols, 16 * b0,
                       16 * b1 < cols ? 16 * b1 : cols, reinterpret_cast<float*>(out), transpose,
                       lp + lp_elems + t * per_task);
  });
#endif
}

}  // namespace cpu
}  // namespace qpeft
