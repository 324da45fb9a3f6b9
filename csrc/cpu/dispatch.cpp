// qpeft._C entry points: argument checks, ISA selection, the 8-bit lookup-table
// cache and the split of blocks over threads. The kernels themselves are in
// kernels_scalar.cpp / kernels_avx2.cpp.

#include "api.h"

#include <qpeft/format.h>
#include <qpeft/host_checks.h>

#include <atomic>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "kernels.h"
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
// ISA selection.
enum Isa : int { kAuto = 0, kScalar = 1, kAvx2 = 2 };
std::atomic<int> g_isa{kAuto};

bool has_avx2() {
  const CpuFeatures f = cpu_features();
  return f.avx2 && f.fma && f.f16c;
}

const KernelTable& kernels() {
#if QPEFT_HAVE_AVX2_TU
  const int isa = g_isa.load();
  if (isa == kScalar) return kScalarKernels;
  if (isa == kAvx2) return kAvx2Kernels;  // set_isa checked support
  static const bool avx2 = has_avx2();
  return avx2 ? kAvx2Kernels : kScalarKernels;
#else
  return kScalarKernels;
#endif
}

const char* isa_name(int isa) {
  return isa == kScalar ? "scalar" : (isa == kAvx2 ? "avx2" : "auto");
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

std::shared_ptr<const Lut8> get_lut8(const float* code) {
  static std::mutex mu;
  static std::deque<std::shared_ptr<const Lut8>> cache;  // most recent first
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

CpuFeatures cpu_features() {
#if QPEFT_HAVE_AVX2_TU
  __builtin_cpu_init();  // libgcc runs it from a constructor, but order across .so inits is not
                         // guaranteed
  return {__builtin_cpu_supports("avx2") != 0, __builtin_cpu_supports("fma") != 0,
          __builtin_cpu_supports("f16c") != 0};
#else
  return {false, false, false};  // not x86: no AVX2 kernels were built
#endif
}

std::string set_isa(const std::string& name) {
  int isa;
  if (name == "auto")
    isa = kAuto;
  else if (name == "scalar")
    isa = kScalar;
  else if (name == "avx2")
    isa = kAvx2;
  else
    fail("set_isa", "unknown ISA '" + name + "' (expected 'auto', 'scalar' or 'avx2')");
  if (isa == kAvx2 && !has_avx2()) fail("set_isa", "this CPU lacks AVX2/FMA/F16C");
  return isa_name(g_isa.exchange(isa));
}

std::string active_isa() {
  return kernels().name;
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
  // The AVX2 kernel needs blocks that start on a byte boundary.
  const KernelTable& k = blocksize % 2 == 0 ? kernels() : kScalarKernels;
  run_blocks(k.dequantize_4bit, args, blocks, thread_count(num_threads, n));
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
