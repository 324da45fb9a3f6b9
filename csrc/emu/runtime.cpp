// The CUDA emulation runtime: runs a grid of CUDA threads as fibers on CPU
// threads (see qpeft_cuda_emulation.h for the model and its guarantees).
//
// A Worker owns the fibers of the block it is running: one ucontext fiber per
// CUDA thread, each on its own 128 KiB stack (reserved once per worker and
// reused; only the touched pages become memory) with a PROT_NONE guard page
// below it. Fibers switch directly to the next ready fiber (one swapcontext,
// about 0.25 us here) and back to the worker's main context only when none is
// ready: then either every thread has exited, or the block is deadlocked, or a
// fiber recorded an error. An abandoned block's fibers hold no resources (their
// frames are kernel code and these functions, which keep no heap objects live
// across a switch), so they are simply re-made for the next block.
#include "qpeft_cuda_emulation.h"
#include "emu_runtime.h"

#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qpeft {
namespace emu {

thread_local Current t_current;

namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;  // CUDA's limit per block
constexpr std::size_t kStackBytes = 128 * 1024;
constexpr std::size_t kMaxDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr std::size_t kCanaryBytes = 1024;          // checked after every barrier
constexpr unsigned char kPoison = 0xff;             // NaN as float, -1 as int
constexpr unsigned char kCanary = 0xa5;
// Yields in a row without progress before a spin-wait is declared hopeless: with
// N threads ready, a random pick misses the one that would end the wait 256*N
// times in a row with probability (1 - 1/N)^(256 N) < e^-256.
constexpr std::uint64_t kMinSpins = 1u << 16;
constexpr std::uint64_t kSpinsPerThread = 256;
// Warp exchanges (mma, ldmatrix): the largest payload per lane.
constexpr std::size_t kMaxExchangeSlot = 64;
// cp.async copies (and committed groups) one thread may have in flight: a
// pipeline holds a few stages of a few copies each; more is a missing wait.
constexpr std::size_t kMaxPendingCopies = 1024;

// Default seed 2 (random interleavings); $QPEFT_EMU_SEED overrides it, so a CI
// run can sweep seeds over the whole test suite.
std::uint64_t initial_seed() {
  if (const char* env = std::getenv("QPEFT_EMU_SEED")) {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(env, &end, 10);
    if (end != env && *end == '\0') return v;
  }
  return 2;
}
std::atomic<std::uint64_t> g_seed{initial_seed()};
std::atomic<int> g_workers{0};  // 0: not set yet (env or hardware)
std::atomic<std::uint64_t> g_launches{0}, g_blocks{0}, g_switches{0};

std::string basename_of(const char* path) {
  if (path == nullptr) return "?";
  const char* slash = std::strrchr(path, '/');
  return slash ? slash + 1 : path;
}

std::string site(const char* file, int line) {
  return basename_of(file) + ":" + std::to_string(line);
}

bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || (f1 && f2 && std::strcmp(f1, f2) == 0));
}

std::string hex32(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// "0-15, 17, 20-21"
std::string ranges(const std::vector<int>& ids) {
  std::string out;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(ids[i]);
    if (j > i) out += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}

std::string lanes_of(unsigned mask) {
  std::vector<int> ids;
  for (int l = 0; l < kWarp; ++l) {
    if ((mask >> l) & 1u) ids.push_back(l);
  }
  return ranges(ids);
}

const char* op_name(int op) {
  switch (op) {
    case kShflIdx:
      return "__shfl_sync";
    case kShflUp:
      return "__shfl_up_sync";
    case kShflDown:
      return "__shfl_down_sync";
    case kShflBfly:
      return "__shfl_xor_sync";
    case kVoteBallot:
      return "__ballot_sync";
    case kVoteAll:
      return "__all_sync";
    case kVoteAny:
      return "__any_sync";
    case kSyncWarp:
      return "__syncwarp";
    case kExchange:
      return "warp exchange";
    default:
      return "warp collective";
  }
}

const char* bar_name(int op) {
  switch (op) {
    case kBarCount:
      return "__syncthreads_count()";
    case kBarAnd:
      return "__syncthreads_and()";
    case kBarOr:
      return "__syncthreads_or()";
    default:
      return "__syncthreads()";
  }
}

std::uint64_t splitmix64(std::uint64_t& s) {
  std::uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// An error detected by the harness inside a fiber (unwinds to fiber_entry).
struct KernelFault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class State : std::uint8_t { Ready, Running, AtBarrier, AtWarp, AtActiveMask, Exited };

struct Fiber {
  ucontext_t ctx;
  State state = State::Exited;
  uint3 tid{};
  // The collective it waits in (warp ops and barriers).
  int op = 0;
  const char* file = nullptr;
  int line = 0;
  std::uint64_t value = 0;
  unsigned b = 0, c = 0;
  std::uint64_t result = 0;
  unsigned exchanges = 0;  // warp exchanges joined: selects the double buffer
  // cp.async copies issued and not yet retired, in issue order; the first
  // `committed` of them belong to the committed groups, whose sizes are `groups`.
  struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    int bytes, src_bytes;
    const char* file;
    int line;
  };
  std::vector<Copy> copies;
  std::vector<std::size_t> groups;
  std::size_t committed = 0;
};

struct WarpGroup {
  int op;
  unsigned mask;
  unsigned arrived;
  const char* file;
  int line;
  const char* name;  // op_name(op), or the instruction of a warp exchange
};

struct ActiveGroup {
  const char* file;
  int line;
  unsigned arrived;
};

struct WarpState {
  unsigned lanes = 0;  // lanes that exist (a last partial warp has fewer)
  unsigned exited = 0;
  int runnable = 0;  // lanes Ready or Running
  std::vector<WarpGroup> groups;
  std::vector<ActiveGroup> active;
};

// --- Shared memory ranges ------------------------------------------------------
// The launch's dynamic shared memory is the worker's buffer; __shared__ variables
// are thread_local, i.e. this module's TLS block of the OS thread running the
// block, which dl_iterate_phdr reports (dlpi_tls_data: the calling thread's copy).
struct TlsRange {
  std::uintptr_t lo = 0, hi = 0;
  bool looked = false;
};
thread_local TlsRange t_tls;

int find_tls_block(dl_phdr_info* info, std::size_t size, void* data) {
  auto* out = static_cast<TlsRange*>(data);
  if (size < offsetof(dl_phdr_info, dlpi_tls_data) + sizeof(info->dlpi_tls_data)) return 0;
  if (info->dlpi_tls_data == nullptr) return 0;
  const auto probe = reinterpret_cast<std::uintptr_t>(&t_tls);  // a thread_local of this module
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type != PT_TLS) continue;
    const auto lo = reinterpret_cast<std::uintptr_t>(info->dlpi_tls_data);
    const std::uintptr_t hi = lo + info->dlpi_phdr[i].p_memsz;
    if (probe >= lo && probe < hi) {
      out->lo = lo;
      out->hi = hi;
      return 1;
    }
  }
  return 0;
}

const TlsRange& static_shared_range() {
  if (!t_tls.looked) {
    TlsRange r;
    dl_iterate_phdr(find_tls_block, &r);
    r.looked = true;
    t_tls = r;
  }
  return t_tls;
}

std::string hex_ptr(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx",
                static_cast<unsigned long long>(reinterpret_cast<std::uintptr_t>(p)));
  return buf;
}

void fiber_entry();

class Worker {
 public:
  Worker() {
    const long page = sysconf(_SC_PAGESIZE);
    page_ = static_cast<std::size_t>(page > 0 ? page : 4096);
    slot_ = kStackBytes + page_;
    const std::size_t bytes = slot_ * kMaxThreads;
    void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
      throw std::runtime_error("qpeft: CUDA emulation could not reserve fiber stacks");
    stacks_ = static_cast<char*>(mem);
    for (int i = 0; i < kMaxThreads; ++i) {
      // The lowest page of each slot is the guard: a stack overflow faults there.
      if (mprotect(stacks_ + slot_ * i, page_, PROT_NONE) != 0) {
        munmap(stacks_, bytes);
        throw std::runtime_error("qpeft: CUDA emulation could not protect fiber stack guards");
      }
    }
    fibers_.resize(kMaxThreads);
    smem_.resize(kMaxDynamicSmem + kCanaryBytes + 128);
    xbuf_.resize(static_cast<std::size_t>(kMaxThreads / kWarp) * 2 * kWarp * kMaxExchangeSlot);
    pending_dyn_.assign(kMaxDynamicSmem / 4, 0);
  }
  ~Worker() { munmap(stacks_, slot_ * kMaxThreads); }
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Runs one block; returns "" or the error.
  std::string run_block(dim3 grid, dim3 block, std::uint64_t linear_block, std::size_t smem,
                        void (*body)(void*), void* arg, std::uint64_t seed);

  // --- called from fibers ---
  std::uint64_t collective(int op, unsigned mask, std::uint64_t value, unsigned b, unsigned c,
                           const char* file, int line);
  unsigned active_mask(const char* file, int line);
  int barrier(int op, int pred, const char* file, int line);
  void yield_now();
  [[noreturn]] void fault_and_leave(const char* msg);  // no unwinding (sanitizer handler)
  void on_exit();
  void run_body() { body_(arg_); }
  bool in_fiber() const { return current_ >= 0; }
  std::string where() const;
  void record_error(std::string msg) {
    if (error_.empty()) error_ = std::move(msg);
  }
  [[noreturn]] void leave_to_main();
  WarpExchange exchange(const char* name, const void* payload, std::size_t bytes,
                        ExchangeFn complete, int arg, const char* file, int line);
  void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* file, int line);
  void cp_async_commit(const char* file, int line);
  void cp_async_wait(int n, const char* file, int line);
  void check_shared(const void* p, std::size_t bytes, const char* what, const char* file, int line);
  void check_shared_read(const void* p, std::size_t bytes, const char* what, const char* file,
                         int line);
  std::uint32_t shared_address(const void* p, const char* file, int line);
  int lane() const { return current_ % kWarp; }

 private:
  void make_ready(int t);
  void set_blocked(int t, State s);
  int pick_ready();
  void switch_away(int self);  // the caller has set its own state already
  void set_current(int t);
  void check_canary(std::size_t span, const char* when);
  std::string deadlock_report();
  std::string thread_name(int t) const;
  void resolve_active(int warp);
  void retire_copies(Fiber& f, std::size_t n);
  void mark_pending(const unsigned char* p, int bytes, int delta);
  bool is_pending(const unsigned char* p, std::size_t bytes, const unsigned char** hit);
  std::string pending_writer(const unsigned char* p);
  void reset_copies();
  unsigned char* smem_base() {
    auto p = reinterpret_cast<std::uintptr_t>(smem_.data());
    return reinterpret_cast<unsigned char*>((p + 127) & ~std::uintptr_t{127});
  }

  std::size_t page_ = 4096, slot_ = 0;
  char* stacks_ = nullptr;
  std::vector<Fiber> fibers_;
  std::vector<unsigned char> smem_;
  ucontext_t main_ctx_;

  // Block state.
  int nthreads_ = 0;
  int current_ = -1;
  int exited_ = 0;
  int first_exited_ = -1;
  int policy_ = 0;  // 0 FIFO, 1 LIFO, 2 random
  std::uint64_t rng_ = 0;
  std::deque<int> ready_;
  int bar_arrived_ = 0;
  int bar_op_ = 0;
  int bar_acc_ = 0;
  int bar_first_ = -1;
  const char* bar_file_ = nullptr;
  int bar_line_ = 0;
  std::vector<WarpState> warps_;
  std::size_t smem_bytes_ = 0;
  void (*body_)(void*) = nullptr;
  void* arg_ = nullptr;
  std::string error_;
  std::uint64_t switches_ = 0;
  std::uint64_t spins_ = 0;
  uint3 block_idx_{};
  // Warp exchanges: two buffers per warp, used alternately, so a lane that runs
  // ahead into its next exchange never overwrites slots others still read.
  std::vector<unsigned char> xbuf_;
  // Shared-memory words (4 bytes) written by cp.async copies not yet retired:
  // a count per word of dynamic shared memory, a map for __shared__ variables.
  std::vector<std::uint32_t> pending_dyn_;
  std::unordered_map<std::uintptr_t, std::uint32_t> pending_static_;
  std::size_t pending_copies_ = 0;  // in the whole block
  bool dyn_dirty_ = false;          // pending_dyn_ may hold non-zero counts

 public:
  void* dynamic_smem() { return smem_base(); }
};

thread_local Worker* t_worker = nullptr;

Worker& worker_or_throw(const char* what) {
  if (t_worker == nullptr || !t_worker->in_fiber()) {
    throw std::logic_error(std::string("qpeft: ") + what + " called outside an emulated kernel");
  }
  return *t_worker;
}

std::string Worker::thread_name(int t) const {
  const uint3 i = fibers_[t].tid;
  return "thread (" + std::to_string(i.x) + "," + std::to_string(i.y) + "," + std::to_string(i.z) +
         ")";
}

std::string Worker::where() const {
  std::string s = "block (" + std::to_string(block_idx_.x) + "," + std::to_string(block_idx_.y) +
                  "," + std::to_string(block_idx_.z) + ")";
  if (current_ >= 0)
    s += " " + thread_name(current_) + " [warp " + std::to_string(current_ / kWarp) + " lane " +
         std::to_string(current_ % kWarp) + "]";
  return s;
}

void Worker::set_current(int t) {
  current_ = t;
  fibers_[t].state = State::Running;
  t_current.thread_idx = fibers_[t].tid;
}

void Worker::set_blocked(int t, State s) {
  spins_ = 0;  // progress: a thread blocks or exits
  Fiber& f = fibers_[t];
  if (f.state == State::Ready || f.state == State::Running) --warps_[t / kWarp].runnable;
  f.state = s;
}

void Worker::make_ready(int t) {
  Fiber& f = fibers_[t];
  if (f.state != State::Ready && f.state != State::Running) ++warps_[t / kWarp].runnable;
  f.state = State::Ready;
  ready_.push_back(t);
}

int Worker::pick_ready() {
  if (ready_.empty()) return -1;
  int t;
  if (policy_ == 0) {
    t = ready_.front();
    ready_.pop_front();
  } else if (policy_ == 1) {
    t = ready_.back();
    ready_.pop_back();
  } else {
    const std::size_t i = static_cast<std::size_t>(splitmix64(rng_) % ready_.size());
    t = ready_[i];
    ready_[i] = ready_.back();
    ready_.pop_back();
  }
  return t;
}

// The current fiber has recorded why it stops (its state); run someone else.
void Worker::switch_away(int self) {
  Fiber& me = fibers_[self];
  // A warp whose lanes are all blocked resolves its pending __activemask() calls.
  resolve_active(self / kWarp);
  const int next = pick_ready();
  ++switches_;
  if (next == self) {
    set_current(self);
    return;
  }
  if (next < 0) {
    current_ = -1;
    swapcontext(&me.ctx, &main_ctx_);
  } else {
    set_current(next);
    swapcontext(&me.ctx, &fibers_[next].ctx);
  }
  // Resumed: whoever switched here has already made this fiber current.
}

[[noreturn]] void Worker::leave_to_main() {
  current_ = -1;
  setcontext(&main_ctx_);
  std::abort();  // setcontext does not return
}

// The strings are built into error_ (owned by the worker): the abandoned frames
// between here and the kernel hold no heap memory that would leak.
[[noreturn]] void Worker::fault_and_leave(const char* msg) {
  if (error_.empty()) {
    error_ = where();
    error_ += ": ";
    error_ += msg;
  }
  leave_to_main();
}

void Worker::check_canary(std::size_t span, const char* when) {
  const unsigned char* p = smem_base() + smem_bytes_;
  for (std::size_t i = 0; i < span; ++i) {
    if (p[i] != kCanary) {
      throw KernelFault("out-of-bounds write to dynamic shared memory: byte " +
                        std::to_string(smem_bytes_ + i) + " of a " + std::to_string(smem_bytes_) +
                        "-byte allocation was written (found " + when + ")");
    }
  }
}

void Worker::resolve_active(int warp) {
  WarpState& ws = warps_[warp];
  if (ws.active.empty() || ws.runnable > 0) return;
  // Every live lane of the warp is blocked: the lanes in one __activemask() call
  // are the ones that got there together, which is what the hardware reports.
  for (const ActiveGroup& g : ws.active) {
    for (int l = 0; l < kWarp; ++l) {
      if ((g.arrived >> l) & 1u) {
        const int t = warp * kWarp + l;
        fibers_[t].result = g.arrived;
        make_ready(t);
      }
    }
  }
  ws.active.clear();
}

unsigned Worker::active_mask(const char* file, int line) {
  const int self = current_;
  const int warp = self / kWarp, lane = self % kWarp;
  WarpState& ws = warps_[warp];
  ActiveGroup* g = nullptr;
  for (ActiveGroup& a : ws.active) {
    if (same_site(a.file, a.line, file, line)) g = &a;
  }
  if (g == nullptr) {
    ws.active.push_back({file, line, 0u});
    g = &ws.active.back();
  }
  g->arrived |= 1u << lane;
  Fiber& me = fibers_[self];
  set_blocked(self, State::AtActiveMask);
  me.file = file;
  me.line = line;
  switch_away(self);
  return static_cast<unsigned>(me.result);
}

std::uint64_t Worker::collective(int op, unsigned mask, std::uint64_t value, unsigned b, unsigned c,
                                 const char* file, int line) {
  const int self = current_;
  const int warp = self / kWarp, lane = self % kWarp;
  WarpState& ws = warps_[warp];
  // Built only on the error paths: no heap object may live across the switch
  // below (an abandoned fiber's frames are never unwound).
  auto what = [&]() {
    return std::string(op_name(op)) + "(mask=" + hex32(mask) + ") at " + site(file, line);
  };
  if (!((mask >> lane) & 1u)) {
    throw KernelFault(what() + ": the calling lane " + std::to_string(lane) +
                      " is not in its own mask");
  }
  if (mask & ~ws.lanes) {
    throw KernelFault(what() + " names lanes " + lanes_of(mask & ~ws.lanes) +
                      " that do not exist (warp " + std::to_string(warp) + " of a block of " +
                      std::to_string(nthreads_) + " threads has lanes " + lanes_of(ws.lanes) + ")");
  }
  if (mask & ws.exited) {
    throw KernelFault(what() + " names lanes " + lanes_of(mask & ws.exited) +
                      " that have exited (non-participating lanes: they never arrive)");
  }
  WarpGroup* g = nullptr;
  for (WarpGroup& x : ws.groups) {
    if (x.mask & mask) {
      if (x.mask != mask || x.op != op) {
        throw KernelFault(
            what() + " meets lanes " + lanes_of(x.arrived) + " waiting in " + x.name +
            "(mask=" + hex32(x.mask) + ") at " + site(x.file, x.line) +
            ": the lanes of one collective must call the same kind with the same mask");
      }
      g = &x;
    }
  }
  if (g == nullptr) {
    ws.groups.push_back({op, mask, 0u, file, line, op_name(op)});
    g = &ws.groups.back();
  }
  Fiber& me = fibers_[self];
  me.op = op;
  me.file = file;
  me.line = line;
  me.value = value;
  me.b = b;
  me.c = c;
  g->arrived |= 1u << lane;
  set_blocked(self, State::AtWarp);
  if (g->arrived == mask) {
    // Complete: every lane of the mask is here. PTX shfl.sync semantics.
    unsigned ballot = 0;
    for (int l = 0; l < kWarp; ++l) {
      if (((mask >> l) & 1u) && fibers_[warp * kWarp + l].value != 0) ballot |= 1u << l;
    }
    for (int l = 0; l < kWarp; ++l) {
      if (!((mask >> l) & 1u)) continue;
      Fiber& f = fibers_[warp * kWarp + l];
      switch (op) {
        case kShflIdx:
        case kShflUp:
        case kShflDown:
        case kShflBfly: {
          const long long segmask = (f.c >> 8) & 0x1f, cval = f.c & 0x1f;
          const long long max_lane = (l & segmask) | (cval & ~segmask);
          const long long min_lane = l & segmask;
          long long j;
          bool pval;
          if (op == kShflUp) {
            j = l - static_cast<long long>(f.b);
            pval = j >= max_lane;
          } else if (op == kShflDown) {
            j = l + static_cast<long long>(f.b);
            pval = j <= max_lane;
          } else if (op == kShflBfly) {
            j = l ^ static_cast<long long>(f.b);
            pval = j <= max_lane;
          } else {
            j = min_lane | (static_cast<long long>(f.b & 0x1fu) & ~segmask);
            pval = j <= max_lane;
          }
          if (!pval) j = l;
          if (!((mask >> j) & 1u)) {
            throw KernelFault(
                std::string(op_name(op)) + "(mask=" + hex32(mask) + ") at " + site(f.file, f.line) +
                ": lane " + std::to_string(l) + " reads lane " + std::to_string(j) +
                ", which is not in the mask (a non-participating lane: undefined value)");
          }
          f.result = fibers_[warp * kWarp + static_cast<int>(j)].value;
          break;
        }
        case kVoteBallot:
          f.result = ballot;
          break;
        case kVoteAll:
          f.result = ballot == mask;
          break;
        case kVoteAny:
          f.result = ballot != 0;
          break;
        default:
          f.result = 0;
          break;
      }
    }
    ws.groups.erase(ws.groups.begin() + (g - ws.groups.data()));
    for (int l = 0; l < kWarp; ++l) {
      if ((mask >> l) & 1u) make_ready(warp * kWarp + l);
    }
  }
  switch_away(self);
  return me.result;
}

// --- Warp exchange (mma, ldmatrix) ------------------------------------------------
// Every lane of the (complete) warp deposits `bytes` into its slot; the last to
// arrive runs complete() over the 32 slots, which turns them into the lanes'
// results in place; each lane then reads its own slot (or any other) until its
// next exchange. Done by the arriving lane, at one instant: no other thread of
// the block runs between the gathering of the operands and the results.
WarpExchange Worker::exchange(const char* name, const void* payload, std::size_t bytes,
                              ExchangeFn complete, int arg, const char* file, int line) {
  const int self = current_;
  const int warp = self / kWarp, lane = self % kWarp;
  WarpState& ws = warps_[warp];
  auto what = [&]() { return std::string(name) + " at " + site(file, line); };
  if (bytes == 0 || bytes > kMaxExchangeSlot) {
    throw KernelFault(what() + ": exchange payload of " + std::to_string(bytes) +
                      " bytes (the harness takes 1.." + std::to_string(kMaxExchangeSlot) + ")");
  }
  if (ws.lanes != 0xffffffffu) {
    throw KernelFault(what() + " is warp-collective over all 32 lanes, but warp " +
                      std::to_string(warp) + " of a block of " + std::to_string(nthreads_) +
                      " threads has only lanes " + lanes_of(ws.lanes) +
                      " (the block size must be a multiple of 32)");
  }
  if (ws.exited != 0u) {
    throw KernelFault(what() + " needs every lane of the warp, but lanes " + lanes_of(ws.exited) +
                      " have exited (they never arrive)");
  }
  WarpGroup* g = nullptr;
  for (WarpGroup& x : ws.groups) {
    if (x.op != kExchange || std::strcmp(x.name, name) != 0 ||
        !same_site(x.file, x.line, file, line)) {
      throw KernelFault(what() + " meets lanes " + lanes_of(x.arrived) + " waiting in " + x.name +
                        " at " + site(x.file, x.line) +
                        ": every lane of the warp must execute the same warp-collective "
                        "instruction at the same source line");
    }
    g = &x;
  }
  if (g == nullptr) {
    ws.groups.push_back({kExchange, 0xffffffffu, 0u, file, line, name});
    g = &ws.groups.back();
  }
  Fiber& me = fibers_[self];
  unsigned char* slots =
      xbuf_.data() +
      ((static_cast<std::size_t>(warp) * 2 + (me.exchanges & 1u)) * kWarp) * kMaxExchangeSlot;
  ++me.exchanges;
  std::memcpy(slots + static_cast<std::size_t>(lane) * bytes, payload, bytes);
  me.op = kExchange;
  me.file = file;
  me.line = line;
  g->arrived |= 1u << lane;
  set_blocked(self, State::AtWarp);
  if (g->arrived == 0xffffffffu) {
    ws.groups.erase(ws.groups.begin() + (g - ws.groups.data()));
    complete(slots, bytes, arg, file, line);
    for (int l = 0; l < kWarp; ++l) make_ready(warp * kWarp + l);
  }
  switch_away(self);
  return WarpExchange{slots, lane};
}

// --- Shared memory checks --------------------------------------------------------
void Worker::check_shared(const void* p, std::size_t bytes, const char* what, const char* file,
                          int line) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  const auto dyn = reinterpret_cast<std::uintptr_t>(smem_base());
  if (a >= dyn && a < dyn + kMaxDynamicSmem + kCanaryBytes) {
    if (a + bytes <= dyn + smem_bytes_) return;
    throw KernelFault(std::string(what) + " at " + site(file, line) + ": bytes " +
                      std::to_string(a - dyn) + ".." + std::to_string(a - dyn + bytes - 1) +
                      " of dynamic shared memory lie past the launch's " +
                      std::to_string(smem_bytes_) + " bytes");
  }
  const TlsRange& tls = static_shared_range();
  if (tls.lo != 0 && a >= tls.lo && a + bytes <= tls.hi) return;
  throw KernelFault(std::string(what) + " at " + site(file, line) + ": address " + hex_ptr(p) +
                    " is not shared memory (neither the launch's dynamic shared memory nor a "
                    "__shared__ variable)");
}

void Worker::mark_pending(const unsigned char* p, int bytes, int delta) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  const auto dyn = reinterpret_cast<std::uintptr_t>(smem_base());
  for (std::uintptr_t w = a / 4; w < (a + static_cast<std::uintptr_t>(bytes) + 3) / 4; ++w) {
    if (w * 4 >= dyn && w * 4 < dyn + kMaxDynamicSmem) {
      pending_dyn_[w - dyn / 4] += static_cast<std::uint32_t>(delta);  // modulo 2^32: -1 undoes +1
      dyn_dirty_ = true;
    } else if (delta > 0) {
      pending_static_[w] += static_cast<std::uint32_t>(delta);
    } else {
      auto it = pending_static_.find(w);
      if (it != pending_static_.end() && --it->second == 0) pending_static_.erase(it);
    }
  }
}

bool Worker::is_pending(const unsigned char* p, std::size_t bytes, const unsigned char** hit) {
  if (pending_copies_ == 0) return false;
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  const auto dyn = reinterpret_cast<std::uintptr_t>(smem_base());
  for (std::uintptr_t w = a / 4; w < (a + bytes + 3) / 4; ++w) {
    bool pend;
    if (w * 4 >= dyn && w * 4 < dyn + kMaxDynamicSmem) {
      pend = pending_dyn_[w - dyn / 4] != 0;
    } else {
      pend = !pending_static_.empty() && pending_static_.count(w) != 0;
    }
    if (pend) {
      *hit = reinterpret_cast<const unsigned char*>(std::max(w * 4, a));
      return true;
    }
  }
  return false;
}

// Who issued the pending copy that writes byte p (only on the error path).
std::string Worker::pending_writer(const unsigned char* p) {
  for (int t = 0; t < nthreads_; ++t) {
    for (const Fiber::Copy& c : fibers_[t].copies) {
      if (p >= c.dst && p < c.dst + c.bytes) {
        return "a cp.async issued at " + site(c.file, c.line) + " by " + thread_name(t);
      }
    }
  }
  return "a cp.async";
}

void Worker::check_shared_read(const void* p, std::size_t bytes, const char* what, const char* file,
                               int line) {
  const unsigned char* hit = nullptr;
  if (!is_pending(static_cast<const unsigned char*>(p), bytes, &hit)) return;
  throw KernelFault(std::string(what) + " at " + site(file, line) + " reads shared memory at " +
                    hex_ptr(hit) + " that " + pending_writer(hit) +
                    " still writes: the issuing thread has not retired its group with "
                    "cp_async_wait yet (a thread reading its own copies needs that wait; a "
                    "thread reading another's needs a __syncthreads() after the other's wait)");
}

std::uint32_t Worker::shared_address(const void* p, const char* file, int line) {
  check_shared(p, 1, "smem_addr", file, line);
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  const auto dyn = reinterpret_cast<std::uintptr_t>(smem_base());
  if (a >= dyn && a < dyn + kMaxDynamicSmem) return static_cast<std::uint32_t>(a - dyn);
  // __shared__ variables: above any dynamic shared memory (disjoint windows).
  return static_cast<std::uint32_t>(kMaxDynamicSmem + kCanaryBytes +
                                    (a - static_shared_range().lo));
}

// --- cp.async -------------------------------------------------------------------------
// A copy lands at the cp_async_wait that retires its group (PTX allows any time
// between issue and that wait; the latest is the one that exposes reads too
// early). Until then its destination holds 0xff poison and is marked pending, so
// ldmatrix of it traps; a thread may not exit with copies in flight.
void Worker::cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* file,
                      int line) {
  auto what = [&]() { return "cp_async<" + std::to_string(bytes) + "> at " + site(file, line); };
  if (src_bytes < 0 || src_bytes > bytes) {
    throw KernelFault(what() + ": src_bytes " + std::to_string(src_bytes) + " outside 0.." +
                      std::to_string(bytes));
  }
  const auto d = reinterpret_cast<std::uintptr_t>(dst), s = reinterpret_cast<std::uintptr_t>(src);
  if (d % static_cast<std::uintptr_t>(bytes) != 0 || s % static_cast<std::uintptr_t>(bytes) != 0) {
    throw KernelFault(what() + ": destination " + hex_ptr(dst) + " and source " + hex_ptr(src) +
                      " must both be aligned to " + std::to_string(bytes) + " bytes");
  }
  check_shared(dst, static_cast<std::size_t>(bytes), "cp_async destination", file, line);
  if (src_bytes > 0 && src == nullptr) throw KernelFault(what() + ": null source");
  const auto dyn = reinterpret_cast<std::uintptr_t>(smem_base());
  const TlsRange& tls = static_shared_range();
  if ((s >= dyn && s < dyn + kMaxDynamicSmem) || (tls.lo != 0 && s >= tls.lo && s < tls.hi)) {
    throw KernelFault(what() + ": the source " + hex_ptr(src) +
                      " is shared memory; cp.async copies global to shared memory");
  }
  Fiber& me = fibers_[current_];
  if (me.copies.size() >= kMaxPendingCopies) {
    throw KernelFault(what() + ": " + std::to_string(me.copies.size()) +
                      " copies of this thread are already in flight (the harness holds at most " +
                      std::to_string(kMaxPendingCopies) + "): a cp_async_wait is missing");
  }
  auto* dp = static_cast<unsigned char*>(dst);
  std::memset(dp, kPoison, static_cast<std::size_t>(bytes));
  mark_pending(dp, bytes, +1);
  ++pending_copies_;
  me.copies.push_back({dp, static_cast<const unsigned char*>(src), bytes, src_bytes, file, line});
}

void Worker::cp_async_commit(const char* file, int line) {
  Fiber& me = fibers_[current_];
  if (me.groups.size() >= kMaxPendingCopies) {
    throw KernelFault("cp_async_commit at " + site(file, line) + ": " +
                      std::to_string(me.groups.size()) +
                      " committed groups of this thread are still pending: a cp_async_wait is "
                      "missing");
  }
  me.groups.push_back(me.copies.size() - me.committed);  // may be empty, as in PTX
  me.committed = me.copies.size();
}

// Lands the first n copies of f (the oldest).
void Worker::retire_copies(Fiber& f, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const Fiber::Copy& c = f.copies[i];
    mark_pending(c.dst, c.bytes, -1);
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, static_cast<std::size_t>(c.src_bytes));
    std::memset(c.dst + c.src_bytes, 0, static_cast<std::size_t>(c.bytes - c.src_bytes));
  }
  f.copies.erase(f.copies.begin(), f.copies.begin() + static_cast<std::ptrdiff_t>(n));
  f.committed -= n;
  pending_copies_ -= n;
}

// cp.async.wait_group n: all but the n most recent committed groups complete.
// Copies not yet committed are in no group and stay in flight.
void Worker::cp_async_wait(int n, const char* /*file*/, int /*line*/) {
  Fiber& me = fibers_[current_];
  const std::size_t keep = static_cast<std::size_t>(n < 0 ? 0 : n);
  if (me.groups.size() <= keep) return;
  const std::size_t retire = me.groups.size() - keep;
  std::size_t copies = 0;
  for (std::size_t i = 0; i < retire; ++i) copies += me.groups[i];
  me.groups.erase(me.groups.begin(), me.groups.begin() + static_cast<std::ptrdiff_t>(retire));
  retire_copies(me, copies);
}

void Worker::reset_copies() {
  for (int t = 0; t < nthreads_; ++t) {
    fibers_[t].copies.clear();
    fibers_[t].groups.clear();
    fibers_[t].committed = 0;
  }
  pending_static_.clear();
  pending_copies_ = 0;
  if (dyn_dirty_) std::fill(pending_dyn_.begin(), pending_dyn_.end(), 0u);
  dyn_dirty_ = false;
}

int Worker::barrier(int op, int pred, const char* file, int line) {
  const int self = current_;
  if (exited_ > 0) {
    throw KernelFault(std::string(bar_name(op)) + " at " + site(file, line) + " is reached after " +
                      thread_name(first_exited_) + " (and " + std::to_string(exited_ - 1) +
                      " more) exited: not every thread of the block reaches this barrier");
  }
  if (bar_arrived_ == 0) {
    bar_file_ = file;
    bar_line_ = line;
    bar_op_ = op;
    bar_first_ = self;
    bar_acc_ = op == kBarAnd ? 1 : 0;
  } else if (!same_site(bar_file_, bar_line_, file, line) || bar_op_ != op) {
    throw KernelFault("divergent barrier: " + std::string(bar_name(op)) + " at " +
                      site(file, line) + " while " + std::to_string(bar_arrived_) +
                      " threads (first " + thread_name(bar_first_) + ") wait at " +
                      bar_name(bar_op_) + " at " + site(bar_file_, bar_line_));
  }
  switch (op) {
    case kBarCount:
      bar_acc_ += pred != 0;
      break;
    case kBarAnd:
      bar_acc_ = bar_acc_ && pred != 0;
      break;
    case kBarOr:
      bar_acc_ = bar_acc_ || pred != 0;
      break;
    default:
      break;
  }
  Fiber& me = fibers_[self];
  set_blocked(self, State::AtBarrier);
  me.file = file;
  me.line = line;
  if (++bar_arrived_ == nthreads_) {
    check_canary(kCanaryBytes, "at a barrier");
    bar_arrived_ = 0;
    for (int t = 0; t < nthreads_; ++t) {
      fibers_[t].result = static_cast<std::uint64_t>(bar_acc_);
      make_ready(t);
    }
  }
  switch_away(self);
  return static_cast<int>(me.result);
}

// __nanosleep: let every other ready thread run first (in any policy, including
// the reverse one, which would otherwise pick the yielding thread again). Spin
// loops that never end, because they wait for something no thread of the block
// will do (a hang on the device), are cut off after many yields in a row with
// no thread blocking or exiting in between.
void Worker::yield_now() {
  const int self = current_;
  const std::uint64_t limit = std::max<std::uint64_t>(kMinSpins, kSpinsPerThread * nthreads_);
  if (++spins_ > limit) {
    throw KernelFault("spin-wait without progress: " + std::to_string(limit) +
                      " __nanosleep() calls in a row while no thread reached a barrier, a warp "
                      "collective or its end");
  }
  const int next = pick_ready();
  if (next < 0) return;
  make_ready(self);
  if (policy_ == 1) {  // reverse order picks from the back: queue the yielder at the front
    ready_.pop_back();
    ready_.push_front(self);
  }
  ++switches_;
  set_current(next);
  swapcontext(&fibers_[self].ctx, &fibers_[next].ctx);
}

// The current fiber's kernel body returned.
void Worker::on_exit() {
  const int self = current_;
  const int warp = self / kWarp, lane = self % kWarp;
  WarpState& ws = warps_[warp];
  if (bar_arrived_ > 0) {
    throw KernelFault(thread_name(self) + " exits while " + std::to_string(bar_arrived_) +
                      " threads wait at " + bar_name(bar_op_) + " at " +
                      site(bar_file_, bar_line_) +
                      ": not every thread of the block reaches this barrier");
  }
  for (const WarpGroup& g : ws.groups) {
    if ((g.mask >> lane) & 1u) {
      throw KernelFault("lane " + std::to_string(lane) + " exits while lanes " +
                        lanes_of(g.arrived) + " wait in " + g.name + "(mask=" + hex32(g.mask) +
                        ") at " + site(g.file, g.line) +
                        ", whose mask names it (a non-participating lane)");
    }
  }
  const Fiber& me = fibers_[self];
  if (!me.copies.empty()) {
    const Fiber::Copy& c = me.copies.front();
    const std::size_t uncommitted = me.copies.size() - me.committed;
    throw KernelFault(thread_name(self) + " exits with " + std::to_string(me.copies.size()) +
                      " cp.async copies in flight (the first issued at " + site(c.file, c.line) +
                      (uncommitted ? ", " + std::to_string(uncommitted) + " never committed" : "") +
                      "): every copy must be committed with cp_async_commit and retired with "
                      "cp_async_wait before the thread exits");
  }
  set_blocked(self, State::Exited);
  ws.exited |= 1u << lane;
  if (exited_++ == 0) first_exited_ = self;
  switch_away(self);
  std::abort();  // an exited fiber is never resumed
}

std::string Worker::deadlock_report() {
  std::string msg = "deadlock: no thread of the block can make progress.";
  if (bar_arrived_ > 0) {
    msg += " " + std::to_string(bar_arrived_) + " of " + std::to_string(nthreads_) +
           " threads wait at " + bar_name(bar_op_) + " at " + site(bar_file_, bar_line_) + ".";
  }
  for (std::size_t w = 0; w < warps_.size(); ++w) {
    for (const WarpGroup& g : warps_[w].groups) {
      msg += " Warp " + std::to_string(w) + ": lanes " + lanes_of(g.arrived) + " wait in " +
             g.name + "(mask=" + hex32(g.mask) + ") at " + site(g.file, g.line) + " for lanes " +
             lanes_of(g.mask & ~g.arrived) + ", which never arrive (non-participating lanes).";
    }
  }
  std::vector<int> exited;
  for (int t = 0; t < nthreads_; ++t) {
    if (fibers_[t].state == State::Exited) exited.push_back(t);
  }
  if (!exited.empty()) msg += " Exited threads (linear ids): " + ranges(exited) + ".";
  return msg;
}

std::string Worker::run_block(dim3 grid, dim3 block, std::uint64_t linear_block, std::size_t smem,
                              void (*body)(void*), void* arg, std::uint64_t seed) {
  reset_copies();  // of the previous block (a failed one leaves copies behind)
  nthreads_ = static_cast<int>(block.x * block.y * block.z);
  body_ = body;
  arg_ = arg;
  smem_bytes_ = smem;
  error_.clear();
  exited_ = 0;
  first_exited_ = -1;
  bar_arrived_ = 0;
  switches_ = 0;
  spins_ = 0;
  ready_.clear();
  policy_ = seed == 0 ? 0 : (seed == 1 ? 1 : 2);
  rng_ = seed * 0x9e3779b97f4a7c15ull ^ (linear_block + 1) * 0xd1b54a32d192ed03ull;
  block_idx_ =
      uint3{static_cast<unsigned>(linear_block % grid.x),
            static_cast<unsigned>((linear_block / grid.x) % grid.y),
            static_cast<unsigned>(linear_block / (static_cast<std::uint64_t>(grid.x) * grid.y))};
  t_current.block_idx = block_idx_;
  t_current.block_dim = block;
  t_current.grid_dim = grid;

  const int nwarps = (nthreads_ + kWarp - 1) / kWarp;
  warps_.assign(static_cast<std::size_t>(nwarps), WarpState{});
  for (int w = 0; w < nwarps; ++w) {
    const int n = std::min(kWarp, nthreads_ - w * kWarp);
    warps_[w].lanes = n == kWarp ? 0xffffffffu : ((1u << n) - 1u);
  }
  unsigned char* sm = smem_base();
  std::memset(sm, kPoison, smem);
  std::memset(sm + smem, kCanary, kMaxDynamicSmem + kCanaryBytes - smem);

  for (int t = 0; t < nthreads_; ++t) {
    Fiber& f = fibers_[t];
    f.tid =
        uint3{static_cast<unsigned>(t % block.x), static_cast<unsigned>((t / block.x) % block.y),
              static_cast<unsigned>(t / (block.x * block.y))};
    f.state = State::Exited;  // make_ready counts the transition
    f.result = 0;
    f.exchanges = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stacks_ + slot_ * t + page_;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &main_ctx_;
    makecontext(&f.ctx, fiber_entry, 0);
    make_ready(t);
  }

  const int first = pick_ready();
  set_current(first);
  swapcontext(&main_ctx_, &fibers_[first].ctx);
  current_ = -1;
  g_switches.fetch_add(switches_, std::memory_order_relaxed);
  reset_copies();

  if (!error_.empty()) return error_;
  if (exited_ != nthreads_) return where() + ": " + deadlock_report();
  try {
    check_canary(kMaxDynamicSmem + kCanaryBytes - smem, "at block end");
  } catch (const KernelFault& e) {
    return where() + ": " + e.what();
  }
  return {};
}

void fiber_entry() {
  Worker& w = *t_worker;
  std::string err;
  try {
    w.run_body();
    w.on_exit();  // switches away for good unless it throws
  } catch (const std::exception& e) {
    err = w.where() + ": " + e.what();
  } catch (...) {
    err = w.where() + ": unknown C++ exception";
  }
  // Outside the handler (exception state is per OS thread, shared by the fibers);
  // moved out, so this abandoned frame holds no heap memory.
  w.record_error(std::move(err));
  w.leave_to_main();
}

// Pool of workers (each holds 128 MiB of reserved stack address space).
std::mutex g_pool_mu;
std::vector<std::unique_ptr<Worker>> g_pool;

std::unique_ptr<Worker> acquire_worker() {
  {
    std::lock_guard<std::mutex> lock(g_pool_mu);
    if (!g_pool.empty()) {
      std::unique_ptr<Worker> w = std::move(g_pool.back());
      g_pool.pop_back();
      return w;
    }
  }
  return std::make_unique<Worker>();
}

void release_worker(std::unique_ptr<Worker> w) {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  g_pool.push_back(std::move(w));
}

int default_workers() {
  if (const char* env = std::getenv("QPEFT_EMU_WORKERS")) {
    const int n = std::atoi(env);
    if (n >= 1) return std::min(n, 64);
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return static_cast<int>(std::max(1u, std::min(hw, 4u)));
}

[[noreturn]] void launch_error(const char* name, const std::string& what) {
  throw std::runtime_error(std::string("qpeft: CUDA launch of ") + name +
                           " failed (emulated): invalid configuration argument: " + what);
}

}  // namespace

// ----------------------------------------------------------------------------
// Entry points used by the header.

std::uint64_t warp_collective(int op, unsigned mask, std::uint64_t value, unsigned b, unsigned c,
                              const char* file, int line) {
  return worker_or_throw(op_name(op)).collective(op, mask, value, b, c, file, line);
}

unsigned active_mask(const char* file, int line) {
  return worker_or_throw("__activemask()").active_mask(file, line);
}

int syncthreads(int op, int pred, const char* file, int line) {
  return worker_or_throw(bar_name(op)).barrier(op, pred, file, line);
}

void yield(const char* /*file*/, int /*line*/) {
  worker_or_throw("__nanosleep()").yield_now();
}

void trap(const char* what, const char* file, int line) {
  throw KernelFault(std::string(what) + " at " + site(file, line));
}

WarpExchange warp_exchange(const char* name, const void* payload, std::size_t bytes,
                           ExchangeFn complete, int arg, const char* file, int line) {
  return worker_or_throw(name).exchange(name, payload, bytes, complete, arg, file, line);
}

void check_shared(const void* p, std::size_t bytes, const char* what, const char* file, int line) {
  worker_or_throw(what).check_shared(p, bytes, what, file, line);
}

void check_shared_read(const void* p, std::size_t bytes, const char* what, const char* file,
                       int line) {
  worker_or_throw(what).check_shared_read(p, bytes, what, file, line);
}

std::uint32_t shared_address(const void* p, const char* file, int line) {
  return worker_or_throw("smem_addr()").shared_address(p, file, line);
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes, const char* file, int line) {
  worker_or_throw("cp_async()").cp_async(dst, src, bytes, src_bytes, file, line);
}

void cp_async_commit(const char* file, int line) {
  worker_or_throw("cp_async_commit()").cp_async_commit(file, line);
}

void cp_async_wait(int n, const char* file, int line) {
  worker_or_throw("cp_async_wait()").cp_async_wait(n, file, line);
}

int lane_id() {
  return worker_or_throw("the lane id").lane();
}

void* dynamic_smem_base() {
  return worker_or_throw("qpeft::dynamic_smem()").dynamic_smem();
}

void launch_grid(const char* name, dim3 grid, dim3 block, std::size_t smem, void (*body)(void*),
                 void* arg) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 ||
      threads > static_cast<unsigned long long>(kMaxThreads)) {
    launch_error(name, "block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                           std::to_string(block.z) + ") must hold 1..1024 threads");
  }
  if (block.z > 64) launch_error(name, "blockDim.z must be <= 64");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535u ||
      grid.z > 65535u) {
    launch_error(name, "grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                           std::to_string(grid.z) + ") is out of range");
  }
  if (smem > kMaxDynamicSmem) {
    launch_error(name, std::to_string(smem) +
                           " bytes of dynamic shared memory exceed the default limit of " +
                           std::to_string(kMaxDynamicSmem));
  }
  if (t_worker != nullptr) {
    throw std::logic_error(std::string("qpeft: launch of ") + name +
                           " from inside an emulated kernel");
  }
  const std::uint64_t nblocks = 1ull * grid.x * grid.y * grid.z;
  const std::uint64_t seed = g_seed.load();
  int nworkers = g_workers.load();
  if (nworkers <= 0) nworkers = default_workers();
  nworkers =
      static_cast<int>(std::min<std::uint64_t>(static_cast<std::uint64_t>(nworkers), nblocks));

  std::atomic<std::uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex err_mu;
  std::uint64_t err_block = ~0ull;
  std::string err_msg;

  auto work = [&]() {
    std::unique_ptr<Worker> w;
    try {
      w = acquire_worker();
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(err_mu);
      if (err_msg.empty()) err_msg = e.what();
      stop = true;
      return;
    }
    t_worker = w.get();
    std::uint64_t ran = 0;
    for (;;) {
      if (stop.load(std::memory_order_relaxed)) break;
      const std::uint64_t b = next.fetch_add(1);
      if (b >= nblocks) break;
      ++ran;
      std::string e = w->run_block(grid, block, b, smem, body, arg, seed);
      if (!e.empty()) {
        std::lock_guard<std::mutex> lock(err_mu);
        if (b < err_block) {
          err_block = b;
          err_msg = std::move(e);
        }
        stop = true;
      }
    }
    g_blocks.fetch_add(ran, std::memory_order_relaxed);
    t_worker = nullptr;
    release_worker(std::move(w));
  };

  std::vector<std::thread> helpers;
  for (int i = 1; i < nworkers; ++i) helpers.emplace_back(work);
  work();
  for (std::thread& t : helpers) t.join();
  g_launches.fetch_add(1, std::memory_order_relaxed);
  if (!err_msg.empty()) {
    throw std::runtime_error(std::string("qpeft: emulated CUDA kernel ") + name + " failed in " +
                             err_msg);
  }
}

// ----------------------------------------------------------------------------
// Settings (csrc/emu/emu_runtime.h).

void set_seed(std::uint64_t seed) {
  g_seed = seed;
}
std::uint64_t get_seed() {
  return g_seed.load();
}
void set_workers(int n) {
  if (n < 0 || n > 64)
    throw std::invalid_argument("qpeft: emulation workers must be in [0, 64] (0 = default)");
  g_workers = n;
}
int get_workers() {
  const int n = g_workers.load();
  return n > 0 ? n : default_workers();
}
Stats get_stats() {
  return Stats{g_launches.load(), g_blocks.load(), g_switches.load()};
}

// Called by the bounds sanitizer's handler (below) with a ready message.
[[noreturn]] void out_of_bounds(const char* msg) {
  if (t_worker != nullptr && t_worker->in_fiber()) {
    // No unwinding from here: the sanitizer call sites are marked as not throwing.
    t_worker->fault_and_leave(msg);
  }
  std::fprintf(stderr, "qpeft: %s (outside an emulated kernel)\n", msg);
  std::abort();
}

}  // namespace emu
}  // namespace qpeft

// ----------------------------------------------------------------------------
// Handlers of -fsanitize=bounds (the kernel TUs of the emulation build are
// compiled with it; libubsan is not linked: these are the only handlers). The
// data layout is the one GCC and Clang share with compiler-rt's ubsan.
namespace {
struct UbsanLocation {
  const char* file;
  std::uint32_t line;
  std::uint32_t column;
};
struct UbsanType {
  std::uint16_t kind;  // 0: integer
  std::uint16_t info;  // integer: log2(bit width) << 1 | signed
  char name[1];
};
struct UbsanOutOfBounds {
  UbsanLocation loc;
  const UbsanType* array_type;
  const UbsanType* index_type;
};

// Formats the index into buf (no heap: see fault_and_leave).
void ubsan_index(const UbsanType* t, std::uintptr_t v, char* buf, std::size_t size) {
  if (t == nullptr || t->kind != 0 || (t->info >> 1) > 6) {
    std::snprintf(buf, size, "?");
    return;
  }
  const unsigned width = 1u << (t->info >> 1);
  if (t->info & 1u) {
    const unsigned extra = 64 - width;
    const long long s =
        static_cast<long long>(static_cast<unsigned long long>(v) << extra) >> extra;
    std::snprintf(buf, size, "%lld", s);
  } else {
    std::snprintf(buf, size, "%llu", static_cast<unsigned long long>(v));
  }
}

[[noreturn]] void ubsan_out_of_bounds(void* data, void* index) {
  const auto* d = static_cast<const UbsanOutOfBounds*>(data);
  char idx[32];
  ubsan_index(d->index_type, reinterpret_cast<std::uintptr_t>(index), idx, sizeof idx);
  const char* file = d->loc.file ? d->loc.file : "?";
  const char* slash = std::strrchr(file, '/');
  char msg[512];
  std::snprintf(
      msg, sizeof msg,
      "out-of-bounds array access: index %s into %s at %s:%u (a __shared__ or local array)", idx,
      d->array_type ? d->array_type->name : "an array", slash ? slash + 1 : file, d->loc.line);
  qpeft::emu::out_of_bounds(msg);
}
}  // namespace

extern "C" {
__attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds(void* data, void* index) {
  ubsan_out_of_bounds(data, index);
}
__attribute__((visibility("hidden"))) void __ubsan_handle_out_of_bounds_abort(void* data,
                                                                              void* index) {
  ubsan_out_of_bounds(data, index);
}
}
