// qpeft._C entry points: argument checks, the per-level kernel tables (isa_tables.h),
// the 8-bit lookup-table cache and the split of blocks over threads. The kernels
// themselves are in kernels_scalar.cpp / kernels_avx2.cpp / kernels_avx512.cpp.

#include "api.h"

#include <pthread.h>
#include <qpeft/format.h>
#include <qpeft/host_checks.h>

#include <atomic>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "cpu_info.h"
#include "isa_tables.h"
#include "thread_pool.h"

namespace qpeft {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------
// Threading. Each task takes a contiguous run of whole blocks. Below about 64K
// elements per thread the wake-up of a worker (~10-20 us) costs more than the
// work it takes over, so small tensors stay on fewer threads.
constexpr int64_t kMinElemsPerThread = 1 << 16;
constexpr int kMaxThreads = 256;

int64_t thread_count(int num_threads, int64_t n) {
  int64_t t = num_threads < 1 ? 1 : (num_threads > kMaxThreads ? kMaxThreads : num_threads);
  const int64_t by_work = n / kMinElemsPerThread + 1;
  return t < by_work ? t : by_work;
}

template <class Args, class Kernel>
void run_blocks(Kernel kernel, const Args& args, int64_t num_blocks, int64_t threads) {
  parallel_ranges(num_blocks, threads, [&](int64_t b0, int64_t b1) { kernel(args, b0, b1); });
}

// ---------------------------------------------------------------------------
// ISA selection (cpu_info.h): one IsaKernels per level, built once; set_isa's
// override (tests, A/B runs) replaces the level QPEFT_CPU_ISA and the CPU chose.
std::atomic<int> g_override{-1};  // -1: none

// What the TU of one level exports (nullptr: not built on this architecture).
struct LevelExports {
  const KernelTable* quant;
  const OptimKernelTable* optim;
  Gemv4Fn gemv;
};

LevelExports exports_of(int level) {
  switch (level) {
    case kIsaScalar:
      return {&kScalarKernels, &kOptimScalarKernels, gemv4_scalar};
#if QPEFT_HAVE_AVX2_TU
    case kIsaAvx2:
      return {&kAvx2Kernels, &kOptimAvx2Kernels, gemv4_avx2};
#endif
#if QPEFT_HAVE_AVX512_TU
    case kIsaAvx512:
      return {&kAvx512Kernels, &kOptimAvx512Kernels, gemv4_avx512};
#endif
    default:
      return {nullptr, nullptr, nullptr};
  }
}

// The kernel of one op at `level`: the highest level <= `level` that exports one.
template <class Fn, class Get>
Fn pick(int level, Get get, int* source) {
  for (int l = level; l >= 0; --l) {
    const Fn fn = get(exports_of(l));
    if (fn != nullptr) {
      *source = l;
      return fn;
    }
  }
  return nullptr;  // unreachable: the scalar level exports every op
}

IsaKernels build_level(int level) {
  IsaKernels t{};
  t.level = level;
  int* s = t.source;
  using LE = const LevelExports&;
  t.quant.name = isa_level_name(level);
  t.quant.quantize_4bit = pick<decltype(t.quant.quantize_4bit)>(
      level, [](LE e) { return e.quant ? e.quant->quantize_4bit : nullptr; }, s + 0);
  t.quant.dequantize_4bit = pick<decltype(t.quant.dequantize_4bit)>(
      level, [](LE e) { return e.quant ? e.quant->dequantize_4bit : nullptr; }, s + 1);
  t.quant.quantize_blockwise = pick<decltype(t.quant.quantize_blockwise)>(
      level, [](LE e) { return e.quant ? e.quant->quantize_blockwise : nullptr; }, s + 2);
  t.quant.dequantize_blockwise = pick<decltype(t.quant.dequantize_blockwise)>(
      level, [](LE e) { return e.quant ? e.quant->dequantize_blockwise : nullptr; }, s + 3);
  t.gemv = pick<Gemv4Fn>(level, [](LE e) { return e.gemv; }, s + 4);
  t.optim.name = isa_level_name(level);
  t.optim.adam32 = pick<decltype(t.optim.adam32)>(
      level, [](LE e) { return e.optim ? e.optim->adam32 : nullptr; }, s + 5);
  t.optim.adam8 = pick<decltype(t.optim.adam8)>(
      level, [](LE e) { return e.optim ? e.optim->adam8 : nullptr; }, s + 6);
  t.optim.lion32 = pick<decltype(t.optim.lion32)>(
      level, [](LE e) { return e.optim ? e.optim->lion32 : nullptr; }, s + 7);
  t.optim.lion8 = pick<decltype(t.optim.lion8)>(
      level, [](LE e) { return e.optim ? e.optim->lion8 : nullptr; }, s + 8);
  return t;
}

struct AllLevels {
  IsaKernels at[kNumIsaLevels];
  AllLevels() {
    for (int l = 0; l < kNumIsaLevels; ++l) at[l] = build_level(l);
  }
};

const AllLevels& all_levels() {
  static const AllLevels t;
  return t;
}

const KernelTable& kernels() {
  return isa_kernels().quant;
}

// ---------------------------------------------------------------------------
// Validation (the checks themselves: qpeft/host_checks.h). The CPU kernels take
// any blocksize > 0, not only the formats' powers of two. num_threads < 1 is
// taken as 1 (thread_count clamps it).
using host::ceil_div;
using host::check_dtype;
using host::check_len;
using host::check_ptr;
using host::check_quant_type;
using host::fail;
using host::packed4_len;

void check_n_blocksize(const char* fn, int64_t n, int64_t blocksize) {
  host::check_nonneg(fn, "n", n);
  host::check_positive(fn, "blocksize", blocksize);
}

// ---------------------------------------------------------------------------
// 8-bit lookup tables: lut[bin] = code8_for_grid(lut_grid_value(bin), mid8),
// keyed by the 256 code values. Building one takes ~0.5 ms; optimizers call
// quantize_blockwise with the same two maps over and over, so keep a few.
struct Lut8 {
  float code[kNumCodes8];
  std::vector<uint8_t> table;  // kLutBins + 4 (padding for the AVX2 32-bit gathers)
};

std::mutex g_lut_mu;                                  // guards g_lut_cache
std::deque<std::shared_ptr<const Lut8>> g_lut_cache;  // most recent first

// A fork() while another thread holds g_lut_mu would leave the child's copy locked
// for good (its owner is not copied) and the child's first 8-bit quantize hanging:
// the forking thread takes the lock around fork() and releases it on both sides.
// The cached tables themselves are plain memory and stay valid in the child.
void lut_before_fork() {
  g_lut_mu.lock();
}
void lut_after_fork() {
  g_lut_mu.unlock();
}
const int g_lut_fork_handlers = pthread_atfork(lut_before_fork, lut_after_fork, lut_after_fork);

std::shared_ptr<const Lut8> get_lut8(const float* code) {
  auto& mu = g_lut_mu;
  auto& cache = g_lut_cache;
  constexpr size_t kCacheSize = 8;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (std::memcmp((*it)->code, code, sizeof((*it)->code)) == 0) {
        auto hit = *it;
        cache.erase(it);
        cache.push_front(hit);
        return hit;
      }
    }
  }
  auto lut = std::make_shared<Lut8>();
  std::memcpy(lut->code, code, sizeof(lut->code));
  float mid8[kNumCodes8 - 1];
  for (int k = 0; k < kNumCodes8 - 1; ++k) mid8[k] = midpoint(lut->code[k], lut->code[k + 1]);
  lut->table.assign(kLutBins + 4, 0);
  for (int bin = 0; bin < kLutBins; ++bin)
    lut->table[bin] = static_cast<uint8_t>(code8_for_grid(lut_grid_value(bin), mid8));
  std::lock_guard<std::mutex> lock(mu);
  cache.push_front(lut);
  if (cache.size() > kCacheSize) cache.pop_back();
  return lut;
}

}  // namespace

// ---------------------------------------------------------------------------

const char* const kIsaOpNames[kNumIsaOps] = {
    "quantize_4bit", "dequantize_4bit", "quantize_blockwise", "dequantize_blockwise", "gemv_4bit",
    "adamw32_step",  "adamw8bit_step",  "lion32_step",        "lion8bit_step"};

const IsaKernels& isa_kernels_at(int level) {
  return all_levels().at[level];
}

const IsaKernels& isa_kernels() {
  return all_levels().at[active_level()];
}

bool isa_level_built(int level) {
  return exports_of(level).quant != nullptr;
}

bool bf16_gemm_built(int level) {
  switch (level) {
#if QPEFT_HAVE_AVX512_BF16_TU
    case kIsaAvx512Bf16:
      return true;
#endif
#if QPEFT_HAVE_AMX_TU
    case kIsaAmx:
      return true;
#endif
    default:
      return false;
  }
}

int active_level() {
  const int o = g_override.load(std::memory_order_relaxed);
  return o >= 0 ? o : isa_choice().chosen;
}

std::string set_isa(const std::string& name) {
  int level = -1;
  if (name != "auto") {
    level = parse_isa_level(name);
    if (level < 0) {
      fail("set_isa",
           "unknown ISA '" + name +
               "' (expected 'auto', 'scalar', 'avx2', 'avx512', 'avx512_bf16' or 'amx')");
    }
    if (level > detected_level()) fail("set_isa", "this CPU lacks " + missing_features(level));
  }
  const int prev = g_override.exchange(level);
  return prev < 0 ? "auto" : isa_level_name(prev);
}

std::string isa_override() {
  const int o = g_override.load();
  return o < 0 ? "auto" : isa_level_name(o);
}

std::string active_isa() {
  return isa_level_name(active_level());
}

std::string lut8(uintptr_t code) {
  check_ptr("lut8", "code", code);
  const auto lut = get_lut8(reinterpret_cast<const float*>(code));
  return std::string(reinterpret_cast<const char*>(lut->table.data()), kLutBins);
}

void quantize_4bit(uintptr_t x, int x_dtype, int64_t n, int64_t blocksize, int quant_type,
                   uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                   int num_threads) {
  const char* fn = "quantize_4bit";
  check_n_blocksize(fn, n, blocksize);
  check_dtype(fn, "x_dtype", x_dtype);
  check_quant_type(fn, quant_type);
  const int64_t blocks = ceil_div(n, blocksize);
  check_len(fn, "packed", packed_len, packed4_len(n));
  check_len(fn, "absmax", absmax_len, blocks);
  if (n == 0) return;
  check_ptr(fn, "x", x);
  check_ptr(fn, "packed", packed);
  check_ptr(fn, "absmax", absmax);
  const Quant4Args args{reinterpret_cast<const void*>(x),
                        x_dtype,
                        n,
                        blocksize,
                        quant_type,
                        reinterpret_cast<uint8_t*>(packed),
                        reinterpret_cast<float*>(absmax)};
  if (blocksize % 2 != 0) {
    // Blocks share bytes: the scalar kernel on one thread (no format uses this).
    kScalarKernels.quantize_4bit(args, 0, blocks);
    return;
  }
  run_blocks(kernels().quantize_4bit, args, blocks, thread_count(num_threads, n));
}

void dequantize_4bit(uintptr_t packed, int64_t packed_len, uintptr_t absmax, int64_t absmax_len,
                     int64_t n, int64_t blocksize, int quant_type, uintptr_t out, int out_dtype,
                     uintptr_t nested_absmax, int64_t nested_absmax_len, uintptr_t nested_code,
                     uintptr_t offset, int64_t nested_blocksize, int num_threads) {
  const char* fn = "dequantize_4bit";
  check_n_blocksize(fn, n, blocksize);
  check_dtype(fn, "out_dtype", out_dtype);
  check_quant_type(fn, quant_type);
  const int64_t blocks = ceil_div(n, blocksize);
  check_len(fn, "packed", packed_len, packed4_len(n));
  check_len(fn, "absmax", absmax_len, blocks);
  const bool nested = nested_absmax != 0;
  if (nested) {
    host::check_positive(fn, "nested_blocksize", nested_blocksize);
    check_len(fn, "nested_absmax", nested_absmax_len, ceil_div(blocks, nested_blocksize));
  }
  if (n == 0) return;
  check_ptr(fn, "packed", packed);
  check_ptr(fn, "absmax", absmax);
  check_ptr(fn, "out", out);
  float off = 0.0f;
  if (nested) {
    check_ptr(fn, "nested_code", nested_code);
    check_ptr(fn, "offset", offset);
    off = *reinterpret_cast<const float*>(offset);
  }
  const Dequant4Args args{reinterpret_cast<const uint8_t*>(packed),
                          n,
                          blocksize,
                          quant_type,
                          reinterpret_cast<void*>(out),
                          out_dtype,
                          nested ? nullptr : reinterpret_cast<const float*>(absmax),
                          nested ? reinterpret_cast<const uint8_t*>(absmax) : nullptr,
                          nested ? reinterpret_cast<const float*>(nested_absmax) : nullptr,
                          nested ? reinterpret_cast<const float*>(nested_code) : nullptr,
                          off,
                          nested ? nested_blocksize : 1};
  // The SIMD kernels need blocks that start on a byte boundary.
  const KernelTable& k = blocksize % 2 == 0 ? kernels() : kScalarKernels;
  auto kernel = k.dequantize_4bit;
  // An output larger than the caches: the AVX-512 kernel's advantage is arithmetic (2x the
  // AVX2 kernel into an L2-resident buffer), and where the stores go to memory it measured
  // 10-25% slower than the AVX2 kernel (SPR-class VM, 1 and 2 threads, 16-64 MiB of bf16
  // out=; 4 MiB: AVX-512 faster; 8 MiB, the CPU QLoRA layer's panel: even). Both are bit
  // for bit the reference, so the choice by size changes nothing but the time.
  constexpr int64_t kLargeDecodeBytes = int64_t{8} << 20;
  const int64_t out_bytes = n * (out_dtype == kF32 ? 4 : 2);
  if (blocksize % 2 == 0 && out_bytes > kLargeDecodeBytes &&
      isa_kernels().source[1] /* dequantize_4bit, kIsaOpNames */ == kIsaAvx512 &&
      isa_level_built(kIsaAvx2))
    kernel = isa_kernels_at(kIsaAvx2).quant.dequantize_4bit;
  run_blocks(kernel, args, blocks, thread_count(num_threads, n));
}

void quantize_blockwise(uintptr_t x, int x_dtype, int64_t n, int64_t blocksize, uintptr_t code,
                        uintptr_t q, int64_t q_len, uintptr_t absmax, int64_t absmax_len,
                        int num_threads) {
  const char* fn = "quantize_blockwise";
  check_n_blocksize(fn, n, blocksize);
  check_dtype(fn, "x_dtype", x_dtype);
  const int64_t blocks = ceil_div(n, blocksize);
  check_len(fn, "q", q_len, n);
  check_len(fn, "absmax", absmax_len, blocks);
  if (n == 0) return;
  check_ptr(fn, "x", x);
  check_ptr(fn, "code", code);
  check_ptr(fn, "q", q);
  check_ptr(fn, "absmax", absmax);
  const auto lut = get_lut8(reinterpret_cast<const float*>(code));
  const Quant8Args args{reinterpret_cast<const void*>(x),
                        x_dtype,
                        n,
                        blocksize,
                        lut->table.data(),
                        reinterpret_cast<uint8_t*>(q),
                        reinterpret_cast<float*>(absmax)};
  run_blocks(kernels().quantize_blockwise, args, blocks, thread_count(num_threads, n));
}

void dequantize_blockwise(uintptr_t q, int64_t q_len, uintptr_t absmax, int64_t absmax_len,
                          uintptr_t code, int64_t n, int64_t blocksize, uintptr_t out,
                          int out_dtype, int num_threads) {
  const char* fn = "dequantize_blockwise";
  check_n_blocksize(fn, n, blocksize);
  check_dtype(fn, "out_dtype", out_dtype);
  const int64_t blocks = ceil_div(n, blocksize);
  check_len(fn, "q", q_len, n);
  check_len(fn, "absmax", absmax_len, blocks);
  if (n == 0) return;
  check_ptr(fn, "q", q);
  check_ptr(fn, "absmax", absmax);
  check_ptr(fn, "code", code);
  check_ptr(fn, "out", out);
  const Dequant8Args args{reinterpret_cast<const uint8_t*>(q),
                          reinterpret_cast<const float*>(absmax),
                          reinterpret_cast<const float*>(code),
                          n,
                          blocksize,
                          reinterpret_cast<void*>(out),
                          out_dtype};
  run_blocks(kernels().dequantize_blockwise, args, blocks, thread_count(num_threads, n));
}

}  // namespace cpu
}  // namespace qpeft
