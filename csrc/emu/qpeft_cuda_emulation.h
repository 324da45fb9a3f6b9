// CPU emulation of the CUDA subset qpeft's kernels use (csrc/cuda/*.cu).
//
// csrc/cuda/launch.h includes this header instead of the CUDA launch when
// QPEFT_CUDA_EMULATION is defined: the host C++ compiler then builds the very
// same kernel sources into qpeft._C_cuda_emu, whose kernels run on CPU memory.
// The types come from the CUDA toolkit's own headers in host mode (dim3, uint4,
// float4, make_*, __half, __nv_bfloat16 and their host conversions): nothing
// here re-declares them, so their layout and rounding are NVIDIA's.
//
// Execution model (csrc/emu/runtime.cpp):
//  * every CUDA thread is a ucontext fiber; a block runs on one OS thread, blocks
//    are spread over a few worker threads;
//  * fibers switch only at __syncthreads(), warp collectives (shuffles, votes,
//    __syncwarp, __activemask) and __nanosleep: code between two such points runs
//    without interleaving, so a missing barrier shows up as a stale read;
//  * which ready fiber runs next is decided by a seed (set_seed): 0 runs threads
//    in order, 1 in reverse, >= 2 picks at random (per block, reproducibly), so
//    code that relies on lockstep warps or on an order between warps fails for
//    some seed;
//  * __syncthreads() must be reached by every thread of the block from the same
//    source line, a warp collective by every lane of its mask with the same mask
//    and kind, and a shuffle may only read a lane of its mask; anything else,
//    and any deadlock, raises std::runtime_error from qpeft::launch (a Python
//    RuntimeError) naming the block, threads and source lines. Never a hang;
//  * __shared__ is thread_local storage: one copy per worker thread, i.e. per
//    running block, never zeroed (like the hardware). Indexing a __shared__ (or
//    local) array out of its bounds is caught by -fsanitize=bounds, whose handler
//    the runtime provides; dynamic shared memory (qpeft::dynamic_smem<T>()) is
//    poisoned with 0xff bytes at block start and followed by a canary that is
//    checked after every barrier and at block end.
//
// PTX instructions: those of csrc/cuda/ptx.h (mma.m16n8k16 with bf16/fp16 inputs
// and fp32 accumulation, ldmatrix .x1/.x2/.x4 [.trans], cp.async 4/8/16 bytes with
// commit_group / wait_group, lop3, prmt, the shared-window address) are emulated
// from the PTX ISA's definitions by csrc/emu/emu_ptx.h, which ptx.h includes in
// this build: mma and ldmatrix as warp exchanges (all 32 lanes, one line), cp.async
// as a per-thread queue of groups landing at the wait that retires them, with the
// destination poisoned and ldmatrix of bytes in flight reported (see emu_ptx.h for
// what is and is not checked).
//
// Not emulated (kernels must keep these behind __CUDA_ARCH__, whose host branch
// the emulation runs): any other inline PTX (wgmma, TMA / cp.async.bulk,
// mbarriers, ...), textures, cooperative groups, clusters, memory spin-waits
// between threads (a spin loop without __nanosleep never yields), `extern
// __shared__` arrays (use qpeft::dynamic_smem<T>()). The approximate intrinsics
// (__expf, __fdividef, rsqrtf, ...) compute the exact host function here, so
// kernels that must match bit for bit avoid them. Shared-memory bank conflicts
// and all timing are beyond the model.
#pragma once

#if defined(__CUDACC__)
#error "qpeft_cuda_emulation.h is for the host C++ build of the CUDA kernels"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <device_launch_parameters.h>  // declares threadIdx & co. before the macros below

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

namespace qpeft {
namespace emu {

// What the running CUDA thread sees; the scheduler rewrites it on every switch.
struct Current {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern thread_local Current t_current;

// Warp collectives, in PTX's terms (shfl.sync modes, vote.sync modes).
enum WarpOp : int {
  kShflIdx = 0,
  kShflUp,
  kShflDown,
  kShflBfly,
  kVoteBallot,
  kVoteAll,
  kVoteAny,
  kSyncWarp,
  kExchange,  // warp_exchange below (mma, ldmatrix)
};
enum BarrierOp : int { kBarSync = 0, kBarCount, kBarAnd, kBarOr };

// b: lane / delta / lane mask (shuffles) or the predicate (votes); c: PTX's
// clamp|segment operand, ((32 - width) << 8) | 0x1f (0 for up: the clamp is the
// segment start). Returns the value read (shuffles) or the vote.
std::uint64_t warp_collective(int op, unsigned mask, std::uint64_t value, unsigned b, unsigned c,
                              const char* file, int line);
unsigned active_mask(const char* file, int line);
int syncthreads(int op, int pred, const char* file, int line);
void yield(const char* file, int line);
[[noreturn]] void trap(const char* what, const char* file, int line);
void* dynamic_smem_base();

// A warp exchange (csrc/emu/emu_ptx.h's warp-collective instructions): every lane
// of a complete warp calls it from the same source line with a payload of
// `bytes` (<= 64); the last lane to arrive runs complete(slots, bytes, arg, file,
// line) over the 32 slots (lane l's at slots + l * bytes), which overwrites them
// with the lanes' results; then every lane returns with the slots, readable until
// its next exchange. Anything else (a missing or exited lane, another line, an
// incomplete warp) raises, like the other collectives.
using ExchangeFn = void (*)(unsigned char* slots, std::size_t bytes, int arg, const char* file,
                            int line);
struct WarpExchange {
  const unsigned char* slots;
  int lane;
};
WarpExchange warp_exchange(const char* name, const void* payload, std::size_t bytes,
                           ExchangeFn complete, int arg, const char* file, int line);
// Raises unless [p, p + bytes) is the launch's dynamic shared memory or a
// __shared__ variable.
void check_shared(const void* p, std::size_t bytes, const char* what, const char* file, int line);
// Raises if a cp.async of any thread of the block still writes [p, p + bytes).
void check_shared_read(const void* p, std::size_t bytes, const char* what, const char* file,
                       int line);
std::uint32_t shared_address(const void* p, const char* file, int line);
// cp.async per thread: a queue of copies grouped by commit, landing at the wait
// that retires their group (runtime.cpp).
void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* file, int line);
void cp_async_commit(const char* file, int line);
void cp_async_wait(int n, const char* file, int line);
int lane_id();

// Runs body(arg) as every thread of every block of the grid (see runtime.cpp).
void launch_grid(const char* name, dim3 grid, dim3 block, std::size_t smem, void (*body)(void*),
                 void* arg);

// Shuffle payloads travel as raw bytes; integers narrower than int are promoted
// first, as CUDA's int overload would take them.
template <typename T>
using ShflType = std::conditional_t<std::is_integral<T>::value && (sizeof(T) < 4), int, T>;

template <typename T>
inline ShflType<T> shuffle(int op, unsigned mask, T var, unsigned b, int width, const char* file,
                           int line) {
  using U = ShflType<T>;
  // __half2 and __nv_bfloat162 declare their own copy operations (not trivially
  // copyable) but are plain 4-byte structs: CUDA shuffles them too.
  static_assert((std::is_trivially_copyable<U>::value ||
                 (std::is_standard_layout<U>::value && std::is_trivially_destructible<U>::value)) &&
                    (sizeof(U) == 2 || sizeof(U) == 4 || sizeof(U) == 8),
                "shuffled values are 2, 4 or 8 bytes");
  const U u = static_cast<U>(var);
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    trap("shuffle width must be a power of two in [1, 32]", file, line);
  }
  std::uint64_t bits = 0;
  std::memcpy(&bits, static_cast<const void*>(&u), sizeof(U));
  const unsigned seg = static_cast<unsigned>(32 - width) << 8;
  bits = warp_collective(op, mask, bits, b, op == kShflUp ? seg : (seg | 0x1fu), file, line);
  U out = u;
  std::memcpy(static_cast<void*>(&out), &bits, sizeof(U));
  return out;
}

template <typename T>
inline T atomic_cas_update(T* address, T (*f)(T, T), T val) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(address, &old, f(old, val), true, __ATOMIC_SEQ_CST,
                                      __ATOMIC_RELAXED)) {
  }
  return old;
}

// Floats go through their bit patterns (the builtins take integers).
template <typename F, typename I>
inline F atomic_float_update(F* address, F (*f)(F, F), F val) {
  static_assert(sizeof(F) == sizeof(I), "same width");
  I* p = reinterpret_cast<I*>(address);
  I old = __atomic_load_n(p, __ATOMIC_RELAXED);
  for (;;) {
    F fold;
    std::memcpy(&fold, &old, sizeof(F));
    const F fnew = f(fold, val);
    I inew;
    std::memcpy(&inew, &fnew, sizeof(F));
    if (__atomic_compare_exchange_n(p, &old, inew, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
      return fold;
    }
  }
}

}  // namespace emu

// launch("name", kernel, grid, block, smem_bytes, stream, args...): as the CUDA
// build's, but runs the grid to completion before returning (the stream is
// ignored) and throws std::runtime_error for a bad configuration or any fault
// the emulation detects. Each CUDA thread receives its own copy of the
// arguments, converted once to the kernel's parameter types.
template <typename... Params, typename... Args>
inline void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block,
                   std::size_t smem, cudaStream_t /*stream*/, Args... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count");
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  Call call{kernel, std::tuple<std::decay_t<Params>...>(static_cast<Params>(args)...)};
  emu::launch_grid(
      name, grid, block, smem,
      [](void* p) {
        Call* c = static_cast<Call*>(p);
        std::apply(c->kernel, c->params);  // by value: a private copy per thread
      },
      &call);
}

// The block's dynamic shared memory (the `smem` bytes of the launch), 16-byte
// aligned at least. launch.h defines the CUDA twin.
template <typename T>
inline T* dynamic_smem() {
  return static_cast<T*>(emu::dynamic_smem_base());
}

}  // namespace qpeft

// ----------------------------------------------------------------------------
// The CUDA builtins. threadIdx & co. are read-only views of the running thread.
#define threadIdx (static_cast<const uint3&>(::qpeft::emu::t_current.thread_idx))
#define blockIdx (static_cast<const uint3&>(::qpeft::emu::t_current.block_idx))
#define blockDim (static_cast<const dim3&>(::qpeft::emu::t_current.block_dim))
#define gridDim (static_cast<const dim3&>(::qpeft::emu::t_current.grid_dim))
#define warpSize 32

// One copy per OS thread = per running block (block-scope thread_local is static).
#undef __shared__
#define __shared__ thread_local
#define __launch_bounds__(...)

// Sites are recorded through __builtin_FILE/__builtin_LINE default arguments: they
// name the caller's source line, whatever the compiler inlines or duplicates.
#define QPEFT_EMU_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

inline void __syncthreads(QPEFT_EMU_SITE) {
  ::qpeft::emu::syncthreads(::qpeft::emu::kBarSync, 0, file, line);
}
inline int __syncthreads_count(int pred, QPEFT_EMU_SITE) {
  return ::qpeft::emu::syncthreads(::qpeft::emu::kBarCount, pred, file, line);
}
inline int __syncthreads_and(int pred, QPEFT_EMU_SITE) {
  return ::qpeft::emu::syncthreads(::qpeft::emu::kBarAnd, pred, file, line);
}
inline int __syncthreads_or(int pred, QPEFT_EMU_SITE) {
  return ::qpeft::emu::syncthreads(::qpeft::emu::kBarOr, pred, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, QPEFT_EMU_SITE) {
  ::qpeft::emu::warp_collective(::qpeft::emu::kSyncWarp, mask, 0, 0, 0, file, line);
}
inline unsigned __activemask(QPEFT_EMU_SITE) {
  return ::qpeft::emu::active_mask(file, line);
}

template <typename T>
inline ::qpeft::emu::ShflType<T> __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
                                             QPEFT_EMU_SITE) {
  return ::qpeft::emu::shuffle(::qpeft::emu::kShflIdx, mask, var, static_cast<unsigned>(src_lane),
                               width, file, line);
}
template <typename T>
inline ::qpeft::emu::ShflType<T> __shfl_up_sync(unsigned mask, T var, unsigned delta,
                                                int width = 32, QPEFT_EMU_SITE) {
  return ::qpeft::emu::shuffle(::qpeft::emu::kShflUp, mask, var, delta, width, file, line);
}
template <typename T>
inline ::qpeft::emu::ShflType<T> __shfl_down_sync(unsigned mask, T var, unsigned delta,
                                                  int width = 32, QPEFT_EMU_SITE) {
  return ::qpeft::emu::shuffle(::qpeft::emu::kShflDown, mask, var, delta, width, file, line);
}
template <typename T>
inline ::qpeft::emu::ShflType<T> __shfl_xor_sync(unsigned mask, T var, int lane_mask,
                                                 int width = 32, QPEFT_EMU_SITE) {
  return ::qpeft::emu::shuffle(::qpeft::emu::kShflBfly, mask, var, static_cast<unsigned>(lane_mask),
                               width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, QPEFT_EMU_SITE) {
  return static_cast<unsigned>(
      ::qpeft::emu::warp_collective(::qpeft::emu::kVoteBallot, mask, pred != 0, 0, 0, file, line));
}
inline int __all_sync(unsigned mask, int pred, QPEFT_EMU_SITE) {
  return static_cast<int>(
      ::qpeft::emu::warp_collective(::qpeft::emu::kVoteAll, mask, pred != 0, 0, 0, file, line));
}
inline int __any_sync(unsigned mask, int pred, QPEFT_EMU_SITE) {
  return static_cast<int>(
      ::qpeft::emu::warp_collective(::qpeft::emu::kVoteAny, mask, pred != 0, 0, 0, file, line));
}
inline void __nanosleep(unsigned /*ns*/, QPEFT_EMU_SITE) {
  ::qpeft::emu::yield(file, line);
}
[[noreturn]] inline void __trap(QPEFT_EMU_SITE) {
  ::qpeft::emu::trap("__trap()", file, line);
}

#undef QPEFT_EMU_SITE

inline void __threadfence_block() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
inline void __threadfence() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
inline void __threadfence_system() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

// Cache-hinted loads and stores are plain accesses.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}
template <typename T>
inline T __ldca(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline T __ldlu(const T* p) {
  return *p;
}
template <typename T>
inline T __ldcv(const T* p) {
  return *p;
}
template <typename T>
inline void __stcg(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stwb(T* p, T v) {
  *p = v;
}
template <typename T>
inline void __stwt(T* p, T v) {
  *p = v;
}

// ----------------------------------------------------------------------------
// Atomics (relaxed on the device; sequentially consistent here, which is a
// strengthening any correct kernel tolerates). Fibers of one block never
// interleave inside an atomic; blocks on other worker threads may.
#define QPEFT_EMU_ATOMIC_INT(T)                                                              \
  inline T atomicAdd(T* a, T v) {                                                            \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  inline T atomicSub(T* a, T v) {                                                            \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  inline T atomicExch(T* a, T v) {                                                           \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                      \
  }                                                                                          \
  inline T atomicAnd(T* a, T v) {                                                            \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  inline T atomicOr(T* a, T v) {                                                             \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                        \
  }                                                                                          \
  inline T atomicXor(T* a, T v) {                                                            \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                       \
  }                                                                                          \
  inline T atomicMin(T* a, T v) {                                                            \
    return ::qpeft::emu::atomic_cas_update<T>(a, [](T x, T y) { return y < x ? y : x; }, v); \
  }                                                                                          \
  inline T atomicMax(T* a, T v) {                                                            \
    return ::qpeft::emu::atomic_cas_update<T>(a, [](T x, T y) { return y > x ? y : x; }, v); \
  }                                                                                          \
  inline T atomicCAS(T* a, T compare, T v) {                                                 \
    __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
    return compare;                                                                          \
  }
QPEFT_EMU_ATOMIC_INT(int)
QPEFT_EMU_ATOMIC_INT(unsigned int)
QPEFT_EMU_ATOMIC_INT(unsigned long long)
QPEFT_EMU_ATOMIC_INT(long long)
#undef QPEFT_EMU_ATOMIC_INT

inline unsigned short atomicCAS(unsigned short* a, unsigned short compare, unsigned short v) {
  __atomic_compare_exchange_n(a, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
inline unsigned atomicInc(unsigned* a, unsigned limit) {  // ((old >= limit) ? 0 : old + 1)
  return ::qpeft::emu::atomic_cas_update<unsigned>(
      a, [](unsigned old, unsigned lim) { return old >= lim ? 0u : old + 1u; }, limit);
}
inline unsigned atomicDec(unsigned* a,
                          unsigned limit) {  // ((old == 0 || old > limit) ? limit : old - 1)
  return ::qpeft::emu::atomic_cas_update<unsigned>(
      a, [](unsigned old, unsigned lim) { return (old == 0u || old > lim) ? lim : old - 1u; },
      limit);
}
inline float atomicAdd(float* a, float v) {
  return ::qpeft::emu::atomic_float_update<float, std::uint32_t>(
      a, [](float x, float y) { return x + y; }, v);
}
inline double atomicAdd(double* a, double v) {
  return ::qpeft::emu::atomic_float_update<double, std::uint64_t>(
      a, [](double x, double y) { return x + y; }, v);
}
inline float atomicExch(float* a, float v) {
  return ::qpeft::emu::atomic_float_update<float, std::uint32_t>(
      a, [](float, float y) { return y; }, v);
}

// ----------------------------------------------------------------------------
// Integer and bit intrinsics (exact on both sides).
inline int __popc(unsigned x) {
  return __builtin_popcount(x);
}
inline int __popcll(unsigned long long x) {
  return __builtin_popcountll(x);
}
inline int __clz(int x) {
  return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x));
}
inline int __clzll(long long x) {
  return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x));
}
inline int __ffs(int x) {
  return __builtin_ffs(x);
}
inline int __ffsll(long long x) {
  return __builtin_ffsll(x);
}
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i)
    r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (s & 31u)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (s & 31u));
}
inline int min(int a, int b) {
  return a < b ? a : b;
}
inline int max(int a, int b) {
  return a > b ? a : b;
}
inline unsigned min(unsigned a, unsigned b) {
  return a < b ? a : b;
}
inline unsigned max(unsigned a, unsigned b) {
  return a > b ? a : b;
}
inline long long min(long long a, long long b) {
  return a < b ? a : b;
}
inline long long max(long long a, long long b) {
  return a > b ? a : b;
}
inline unsigned long long min(unsigned long long a, unsigned long long b) {
  return a < b ? a : b;
}
inline unsigned long long max(unsigned long long a, unsigned long long b) {
  return a > b ? a : b;
}
inline float min(float a, float b) {
  return fminf(a, b);
}
inline float max(float a, float b) {
  return fmaxf(a, b);
}
inline double min(double a, double b) {
  return fmin(a, b);
}
inline double max(double a, double b) {
  return fmax(a, b);
}

// ----------------------------------------------------------------------------
// Float reinterpretation and IEEE-rounded arithmetic (bit-exact with the device).
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline long long __double_as_longlong(double d) {
  long long i;
  std::memcpy(&i, &d, 8);
  return i;
}
inline double __longlong_as_double(long long i) {
  double d;
  std::memcpy(&d, &i, 8);
  return d;
}
inline float __fadd_rn(float a, float b) {
  return a + b;
}
inline float __fsub_rn(float a, float b) {
  return a - b;
}
inline float __fmul_rn(float a, float b) {
  return a * b;
}
inline float __fdiv_rn(float a, float b) {
  return a / b;
}
inline float __frcp_rn(float a) {
  return 1.0f / a;
}
inline float __fsqrt_rn(float a) {
  return std::sqrt(a);
}
inline float __fmaf_rn(float a, float b, float c) {
  return std::fma(a, b, c);
}
inline float __saturatef(float a) {
  return a >= 1.0f ? 1.0f : (a > 0.0f ? a : 0.0f);
}  // NaN -> 0
// Approximate on the device (a few ulp, or flush-to-zero); exact here.
inline float rsqrtf(float a) {
  return 1.0f / std::sqrt(a);
}
inline float __fdividef(float a, float b) {
  return a / b;
}
inline float __expf(float a) {
  return std::exp(a);
}
inline float __logf(float a) {
  return std::log(a);
}
inline float __powf(float a, float b) {
  return std::pow(a, b);
}
inline float __sinf(float a) {
  return std::sin(a);
}
inline float __cosf(float a) {
  return std::cos(a);
}
