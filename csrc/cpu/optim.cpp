// qpeft._C optimizer entry points: argument checks, the cached 8-bit state
// encoders, ISA choice and the split of the work over threads. The kernels are
// in optim_scalar.cpp / optim_avx2.cpp / optim_avx512.cpp; the per-element math in qpeft/optim.h.

#include <qpeft/format.h>
#include <qpeft/host_checks.h>
#include <qpeft/optim.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"
#include "isa_tables.h"
#include "optim_kernels.h"
#include "thread_pool.h"

namespace qpeft {
namespace cpu {
namespace {

// A thread takes at least 64K elements: an AdamW step moves 28 bytes per fp32
// element, so 64K elements are ~1.8 MB (~50 us at the ~37 GB/s torch's fused
// AdamW reaches here), well above a worker's ~10-20 us wake-up.
constexpr int64_t kMinElemsPerThread = 1 << 16;
constexpr int kMaxThreads = 256;

int64_t thread_count(int num_threads, int64_t n) {
  int64_t t = num_threads < 1 ? 1 : (num_threads > kMaxThreads ? kMaxThreads : num_threads);
  const int64_t by_work = n / kMinElemsPerThread + 1;
  return t < by_work ? t : by_work;
}

// The kernels of the active ISA level (isa_tables.h; chosen once, see cpu_info.h).
const OptimKernelTable& kernels() {
  return isa_kernels().optim;
}

// Argument checks: qpeft/host_checks.h (which builds a message only on failure).
// Optimizer state must have exactly the size the parameter implies.
using host::ceil_div;
using host::check_ptr;
using host::fail;

// ---------------------------------------------------------------------------
// 8-bit state encoders, keyed by the 256 map values. Building one takes ~1 ms
// (65536 binary searches); an optimizer uses the same two maps every step.

struct Codec {
  StateCodec c;
  std::vector<uint32_t> table;  // empty when the key table is not exact for this map
};

// The floats whose top 16 bits are `key`, as [lo, hi] in value order.
void key_range(uint32_t key, float& lo, float& hi) {
  const float a = bits_f32(key << 16), b = bits_f32((key << 16) | 0xffffu);
  const bool negative = (key & 0x8000u) != 0;
  lo = negative ? b : a;
  hi = negative ? a : b;
}

std::shared_ptr<const Codec> build_codec(const char* fn, const float* code) {
  auto codec = std::make_shared<Codec>();
  StateCodec& c = codec->c;
  std::memcpy(c.code, code, sizeof(c.code));
  for (int k = 0; k < kNumCodes8; ++k) {
    if (!std::isfinite(c.code[k])) fail(fn, "the state map must be finite");
    if (k > 0 && !(c.code[k - 1] <= c.code[k])) fail(fn, "the state map must be sorted ascending");
  }
  for (int k = 0; k < kNumCodes8 - 1; ++k)
    c.mid[k] = state_zero_mid(c.code, k) ? 0.0f : midpoint(c.code[k], c.code[k + 1]);
  c.mid[kNumCodes8 - 1] = std::numeric_limits<float>::infinity();

  // Exact when the count rises by at most one across every key range that a
  // clamped value can hit. Ranges holding NaN (exponent all ones) only ever see
  // NaN after the clamp to [-1, 1]: entry 0 (count 0; NaN compares false).
  codec->table.assign(kLutBins, 0);
  bool exact = true;
  for (uint32_t key = 0; key < static_cast<uint32_t>(kLutBins); ++key) {
    if ((key & 0x7f80u) == 0x7f80u) continue;
    float lo, hi;
    key_range(key, lo, hi);
    const int base = state_count_below(lo, c.mid);
    const int top = state_count_below(hi, c.mid);
    if (top - base > 1) exact = false;
    // the midpoint inside the range, else the range's largest value (never below x)
    const uint32_t m = top > base ? f32_bits(c.mid[base]) : f32_bits(hi);
    codec->table[key] = static_cast<uint32_t>(base) | ((m & 0xffffu) << 8);
  }
  if (!exact) codec->table.clear();
  c.table = exact ? codec->table.data() : nullptr;
  return codec;
}

std::shared_ptr<const Codec> get_codec(const char* fn, uintptr_t code_ptr) {
  static std::mutex mu;
  static std::deque<std::shared_ptr<const Codec>> cache;  // most recent first
  constexpr size_t kCacheSize = 8;
  const float* code = reinterpret_cast<const float*>(code_ptr);
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (std::memcmp((*it)->c.code, code, sizeof((*it)->c.code)) == 0) {
        auto hit = *it;
        cache.erase(it);
        cache.push_front(hit);
        return hit;
      }
    }
  }
  auto codec = build_codec(fn, code);
  std::lock_guard<std::mutex> lock(mu);
  cache.push_front(codec);
  if (cache.size() > kCacheSize) cache.pop_back();
  return codec;
}

// Work is handed out in chunks of 64 state blocks (16K elements, ~460 KB of
// AdamW traffic) from a shared counter, each of the `threads` tasks taking the
// next chunk when done with its last: a thread slowed down by a competitor for
// its core simply does fewer chunks. Measured on the 2-core dev box with qpeft's
// own thread pool: right after a torch op, torch's OpenMP worker spins on the
// second core for milliseconds, and with one fixed half per thread a
// 16.8M-element AdamW step took 0.89 ns per element instead of 0.66 (torch's
// fused AdamW: 0.68). On torch's OpenMP team (thread_pool.cpp) the two splits
// measure the same.
constexpr int64_t kChunkBlocks = 64;

// Runs fn(u0, u1) over [0, units) in chunks, on up to `threads` threads.
template <class Fn>
void run_chunks(int64_t units, int64_t threads, const Fn& fn) {
  if (units <= 0) return;
  const int64_t chunks = ceil_div(units, kChunkBlocks);
  if (threads > chunks) threads = chunks;
  std::atomic<int64_t> next{0};
  parallel_tasks(threads, [&](int64_t) {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      const int64_t u0 = c * kChunkBlocks, u1 = u0 + kChunkBlocks;
      fn(u0, u1 < units ? u1 : units);
    }
  });
}

// Runs kernel(args, e0, e1) over [0, n) in ranges of whole state blocks.
template <class Args, class Kernel>
void run_elements(Kernel kernel, const Args& args, int64_t n, int num_threads) {
  run_chunks(ceil_div(n, kStateBlock), thread_count(num_threads, n), [&](int64_t u0, int64_t u1) {
    const int64_t e1 = u1 * kStateBlock;
    kernel(args, u0 * kStateBlock, e1 < n ? e1 : n);
  });
}

template <class Args, class Kernel>
void run_blocks(Kernel kernel, const Args& args, int64_t n, int num_threads) {
  run_chunks(ceil_div(n, kStateBlock), thread_count(num_threads, n),
             [&](int64_t b0, int64_t b1) { kernel(args, b0, b1); });
}

// A list of tensors as one parallel region: chunks of the concatenation of
// their state blocks, each chunk walking the tensors it overlaps. An optimizer
// step over many LoRA-sized tensors then wakes the pool once, not once per
// tensor (a wake-up, ~10-50 us, costs as much as a 64K-element update).
template <class Args, class Kernel>
void run_list(Kernel kernel, const std::vector<Args>& list, bool element_ranges, int num_threads) {
  std::vector<int64_t> start(list.size() + 1, 0);
  int64_t elems = 0;
  for (size_t i = 0; i < list.size(); ++i) {
    start[i + 1] = start[i] + ceil_div(list[i].n, kStateBlock);
    elems += list[i].n;
  }
  run_chunks(start.back(), thread_count(num_threads, elems), [&](int64_t u0, int64_t u1) {
    size_t i =
        static_cast<size_t>(std::upper_bound(start.begin(), start.end(), u0) - start.begin()) - 1;
    for (; i < list.size() && start[i] < u1; ++i) {
      const int64_t a = (u0 > start[i] ? u0 : start[i]) - start[i];
      const int64_t b = (u1 < start[i + 1] ? u1 : start[i + 1]) - start[i];
      if (a >= b) continue;
      if (element_ranges) {
        const int64_t e1 = b * kStateBlock;
        kernel(list[i], a * kStateBlock, e1 < list[i].n ? e1 : list[i].n);
      } else {
        kernel(list[i], a, b);
      }
    }
  });
}

// --- argument checks, shared by the single- and multi-tensor entry points ------

Adam32Args adam32_args(const char* fn, uintptr_t param, uintptr_t grad, int dtype, int64_t n,
                       uintptr_t exp_avg, int64_t exp_avg_len, uintptr_t exp_avg_sq,
                       int64_t exp_avg_sq_len, const AdamScalars& s) {
  host::check_n_dtype(fn, dtype, n);
  host::check_adam_scalars(fn, s);
  host::check_len_exact(fn, "exp_avg", exp_avg_len, n);
  host::check_len_exact(fn, "exp_avg_sq", exp_avg_sq_len, n);
  if (n > 0) {
    check_ptr(fn, "param", param);
    check_ptr(fn, "grad", grad);
    check_ptr(fn, "exp_avg", exp_avg);
    check_ptr(fn, "exp_avg_sq", exp_avg_sq);
  }
  return Adam32Args{
      reinterpret_cast<void*>(param),    reinterpret_cast<const void*>(grad),  dtype, n,
      reinterpret_cast<float*>(exp_avg), reinterpret_cast<float*>(exp_avg_sq), s};
}

Adam8Args adam8_args(const char* fn, uintptr_t param, uintptr_t grad, int dtype, int64_t n,
                     uintptr_t q1, int64_t q1_len, uintptr_t absmax1, int64_t absmax1_len,
                     uintptr_t q2, int64_t q2_len, uintptr_t absmax2, int64_t absmax2_len,
                     const StateCodec* c1, const StateCodec* c2, const AdamScalars& s) {
  host::check_n_dtype(fn, dtype, n);
  host::check_adam_scalars(fn, s);
  host::check_len_exact(fn, "exp_avg_q", q1_len, n);
  host::check_len_exact(fn, "exp_avg_absmax", absmax1_len, ceil_div(n, kStateBlock));
  host::check_len_exact(fn, "exp_avg_sq_q", q2_len, n);
  host::check_len_exact(fn, "exp_avg_sq_absmax", absmax2_len, ceil_div(n, kStateBlock));
  if (n > 0) {
    check_ptr(fn, "param", param);
    check_ptr(fn, "grad", grad);
    check_ptr(fn, "exp_avg_q", q1);
    check_ptr(fn, "exp_avg_absmax", absmax1);
    check_ptr(fn, "exp_avg_sq_q", q2);
    check_ptr(fn, "exp_avg_sq_absmax", absmax2);
  }
  return Adam8Args{reinterpret_cast<void*>(param),
                   reinterpret_cast<const void*>(grad),
                   dtype,
                   n,
                   reinterpret_cast<uint8_t*>(q1),
                   reinterpret_cast<float*>(absmax1),
                   reinterpret_cast<uint8_t*>(q2),
                   reinterpret_cast<float*>(absmax2),
                   c1,
                   c2,
                   s};
}

Lion32Args lion32_args(const char* fn, uintptr_t param, uintptr_t grad, int dtype, int64_t n,
                       uintptr_t exp_avg, int64_t exp_avg_len, const LionScalars& s) {
  host::check_n_dtype(fn, dtype, n);
  host::check_lion_scalars(fn, s);
  host::check_len_exact(fn, "exp_avg", exp_avg_len, n);
  if (n > 0) {
    check_ptr(fn, "param", param);
    check_ptr(fn, "grad", grad);
    check_ptr(fn, "exp_avg", exp_avg);
  }
  return Lion32Args{reinterpret_cast<void*>(param),
                    reinterpret_cast<const void*>(grad),
                    dtype,
                    n,
                    reinterpret_cast<float*>(exp_avg),
                    s};
}

Lion8Args lion8_args(const char* fn, uintptr_t param, uintptr_t grad, int dtype, int64_t n,
                     uintptr_t q1, int64_t q1_len, uintptr_t absmax1, int64_t absmax1_len,
                     const StateCodec* c1, const LionScalars& s) {
  host::check_n_dtype(fn, dtype, n);
  host::check_lion_scalars(fn, s);
  host::check_len_exact(fn, "exp_avg_q", q1_len, n);
  host::check_len_exact(fn, "exp_avg_absmax", absmax1_len, ceil_div(n, kStateBlock));
  if (n > 0) {
    check_ptr(fn, "param", param);
    check_ptr(fn, "grad", grad);
    check_ptr(fn, "exp_avg_q", q1);
    check_ptr(fn, "exp_avg_absmax", absmax1);
  }
  return Lion8Args{reinterpret_cast<void*>(param), reinterpret_cast<const void*>(grad), dtype, n,
                   reinterpret_cast<uint8_t*>(q1), reinterpret_cast<float*>(absmax1),   c1,    s};
}

// Row i of a multi-tensor call: `width` integers in the single call's order,
// then the index of the row's scalar set, checked against `sets`.
template <class S>
const int64_t* row(const char* fn, Rows rows, int64_t i, int64_t width, const std::vector<S>& sets,
                   const S** scalars) {
  const int64_t* r = rows.data + i * (width + 1);
  const int64_t k = r[width];
  if (k < 0 || k >= static_cast<int64_t>(sets.size())) {
    fail(fn, "row " + std::to_string(i) + " names scalar set " + std::to_string(k) + " of " +
                 std::to_string(sets.size()));
  }
  *scalars = &sets[static_cast<size_t>(k)];
  return r;
}

uintptr_t up(int64_t v) {
  return static_cast<uintptr_t>(v);
}

}  // namespace

// ---------------------------------------------------------------------------

void adamw32_step(uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t exp_avg,
                  int64_t exp_avg_len, uintptr_t exp_avg_sq, int64_t exp_avg_sq_len,
                  const AdamScalars& s, int num_threads) {
  const Adam32Args args = adam32_args("adamw32_step", param, grad, dtype, n, exp_avg, exp_avg_len,
                                      exp_avg_sq, exp_avg_sq_len, s);
  if (n > 0) run_elements(kernels().adam32, args, n, num_threads);
}

void adamw8bit_step(uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t q1,
                    int64_t q1_len, uintptr_t absmax1, int64_t absmax1_len, uintptr_t q2,
                    int64_t q2_len, uintptr_t absmax2, int64_t absmax2_len, uintptr_t code1,
                    uintptr_t code2, const AdamScalars& s, int num_threads) {
  const char* fn = "adamw8bit_step";
  check_ptr(fn, "qmap_signed", code1);
  check_ptr(fn, "qmap_unsigned", code2);
  const auto c1 = get_codec(fn, code1);
  const auto c2 = get_codec(fn, code2);
  const Adam8Args args = adam8_args(fn, param, grad, dtype, n, q1, q1_len, absmax1, absmax1_len, q2,
                                    q2_len, absmax2, absmax2_len, &c1->c, &c2->c, s);
  if (n > 0) run_blocks(kernels().adam8, args, n, num_threads);
}

void lion32_step(uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t exp_avg,
                 int64_t exp_avg_len, const LionScalars& s, int num_threads) {
  const Lion32Args args =
      lion32_args("lion32_step", param, grad, dtype, n, exp_avg, exp_avg_len, s);
  if (n > 0) run_elements(kernels().lion32, args, n, num_threads);
}

void lion8bit_step(uintptr_t param, uintptr_t grad, int dtype, int64_t n, uintptr_t q1,
                   int64_t q1_len, uintptr_t absmax1, int64_t absmax1_len, uintptr_t code1,
                   const LionScalars& s, int num_threads) {
  const char* fn = "lion8bit_step";
  check_ptr(fn, "qmap_signed", code1);
  const auto c1 = get_codec(fn, code1);
  const Lion8Args args =
      lion8_args(fn, param, grad, dtype, n, q1, q1_len, absmax1, absmax1_len, &c1->c, s);
  if (n > 0) run_blocks(kernels().lion8, args, n, num_threads);
}

void adamw32_multi_step(Rows rows, const std::vector<AdamScalars>& sets, int num_threads) {
  const char* fn = "adamw32_multi_step";
  std::vector<Adam32Args> list;
  list.reserve(static_cast<size_t>(rows.count));
  for (int64_t i = 0; i < rows.count; ++i) {
    const AdamScalars* s;
    const int64_t* r = row(fn, rows, i, 8, sets, &s);
    list.push_back(adam32_args(fn, up(r[0]), up(r[1]), static_cast<int>(r[2]), r[3], up(r[4]), r[5],
                               up(r[6]), r[7], *s));
  }
  run_list(kernels().adam32, list, true, num_threads);
}

void adamw8bit_multi_step(Rows rows, uintptr_t code1, uintptr_t code2,
                          const std::vector<AdamScalars>& sets, int num_threads) {
  const char* fn = "adamw8bit_multi_step";
  check_ptr(fn, "qmap_signed", code1);
  check_ptr(fn, "qmap_unsigned", code2);
  const auto c1 = get_codec(fn, code1);
  const auto c2 = get_codec(fn, code2);
  std::vector<Adam8Args> list;
  list.reserve(static_cast<size_t>(rows.count));
  for (int64_t i = 0; i < rows.count; ++i) {
    const AdamScalars* s;
    const int64_t* r = row(fn, rows, i, 12, sets, &s);
    list.push_back(adam8_args(fn, up(r[0]), up(r[1]), static_cast<int>(r[2]), r[3], up(r[4]), r[5],
                              up(r[6]), r[7], up(r[8]), r[9], up(r[10]), r[11], &c1->c, &c2->c,
                              *s));
  }
  run_list(kernels().adam8, list, false, num_threads);
}

void lion32_multi_step(Rows rows, const std::vector<LionScalars>& sets, int num_threads) {
  const char* fn = "lion32_multi_step";
  std::vector<Lion32Args> list;
  list.reserve(static_cast<size_t>(rows.count));
  for (int64_t i = 0; i < rows.count; ++i) {
    const LionScalars* s;
    const int64_t* r = row(fn, rows, i, 6, sets, &s);
    list.push_back(
        lion32_args(fn, up(r[0]), up(r[1]), static_cast<int>(r[2]), r[3], up(r[4]), r[5], *s));
  }
  run_list(kernels().lion32, list, true, num_threads);
}

void lion8bit_multi_step(Rows rows, uintptr_t code1, const std::vector<LionScalars>& sets,
                         int num_threads) {
  const char* fn = "lion8bit_multi_step";
  check_ptr(fn, "qmap_signed", code1);
  const auto c1 = get_codec(fn, code1);
  std::vector<Lion8Args> list;
  list.reserve(static_cast<size_t>(rows.count));
  for (int64_t i = 0; i < rows.count; ++i) {
    const LionScalars* s;
    const int64_t* r = row(fn, rows, i, 8, sets, &s);
    list.push_back(lion8_args(fn, up(r[0]), up(r[1]), static_cast<int>(r[2]), r[3], up(r[4]), r[5],
                              up(r[6]), r[7], &c1->c, *s));
  }
  run_list(kernels().lion8, list, false, num_threads);
}

bool state_table_exact(uintptr_t code) {
  check_ptr("state_table_exact", "code", code);
  return get_codec("state_table_exact", code)->c.table != nullptr;
}

}  // namespace cpu
}  // namespace qpeft
