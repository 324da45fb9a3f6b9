#include "thread_pool.h"

#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace qpeft {
namespace cpu {
namespace {

constexpr int64_t kMaxWorkers = 256;

// One parallel call. Shared with the workers through a shared_ptr so that a
// worker waking late (after the call returned) only ever sees an exhausted job.
struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t num_tasks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

thread_local bool t_inside_task = false;

class Pool {
 public:
  // Runs the job; returns false (without running anything) if the pool is busy.
  bool run(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->num_tasks = num_tasks;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const int64_t want = num_tasks - 1 < kMaxWorkers ? num_tasks - 1 : kMaxWorkers;
      while (static_cast<int64_t>(workers_.size()) < want) {
        workers_.emplace_back([this] { worker_loop(); });
      }
      job_ = job;
      ++generation_;
    }
    wake_.notify_all();
    work(*job);
    {
      std::unique_lock<std::mutex> lock(mu_);
      finished_.wait(lock, [&] { return job->done.load() == num_tasks; });
      job_.reset();
    }
    return true;
  }

  pid_t owner_pid() const { return pid_; }

 private:
  void work(Job& job) {
    t_inside_task = true;
    int64_t t;
    while ((t = job.next.fetch_add(1)) < job.num_tasks) {
      (*job.fn)(t);
      if (job.done.fetch_add(1) + 1 == job.num_tasks) {
        std::lock_guard<std::mutex> lock(mu_);  // pairs with the waiter's predicate check
        finished_.notify_all();
      }
    }
    t_inside_task = false;
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
      }
      if (job) work(*job);
    }
  }

  const pid_t pid_ = getpid();
  std::mutex busy_;  // held for the whole of one parallel call
  std::mutex mu_;    // guards workers_, job_, generation_
  std::condition_variable wake_, finished_;
  std::vector<std::thread> workers_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;  // never deleted: workers block forever, and exit must not join them

// Set in a child of fork() (by the handler below): torch's OpenMP team belongs to
// the parent and must not be entered from here.
std::atomic<bool> g_forked_child{false};

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  // After fork() only the forking thread exists in the child: the old pool's
  // workers are gone, so start a new pool (the old object is leaked on purpose:
  // its mutexes may be held by threads that no longer exist). The fork handler
  // below clears g_pool; the pid check also covers a fork by raw syscall, which
  // runs no handlers.
  if (g_pool == nullptr || g_pool->owner_pid() != getpid()) g_pool = new Pool();
  return *g_pool;
}

// fork() handlers. Another thread may hold g_pool_mu at the moment of a fork (it is
// inside pool()); the child's copy would then stay locked forever and its first
// parallel kernel would hang. So the forking thread takes the lock around fork()
// and releases it on both sides, and the child forgets the parent's pool and
// OpenMP team (csrc/README.md, "Threads and fork()").
void before_fork() {
  g_pool_mu.lock();
}
void after_fork_in_parent() {
  g_pool_mu.unlock();
}
void after_fork_in_child() {
  g_pool = nullptr;
  g_forked_child.store(true);
  g_pool_mu.unlock();
}
const int g_fork_handlers = pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);

// --- torch's OpenMP team ----------------------------------------------------------
// torch's CPU wheel runs its parallel regions on libgomp, whose worker threads spin
// for milliseconds after each region before they sleep. A pool of our own on the
// same cores then competes with them: measured on the 2-core VM, a 1M-element AdamW
// step took 0.65 ms on the pool right after a torch op against 0.50 ms for torch's
// fused AdamW, and 0.575 ms when OMP_WAIT_POLICY=passive stopped the spinning. So
// when the process already has libgomp (or libiomp5) loaded (dlopen RTLD_NOLOAD:
// we neither link nor load an OpenMP runtime), the tasks run as a GOMP_parallel
// region of that runtime: on the very threads torch uses, already awake. Not after
// fork(): a child cannot use the parent's team (libgomp has no fork handler; a
// region there can wait forever on threads that were not copied), so it falls back
// to the pool. The fork handler marks the child even when gomp() is first called
// there (its pid would then match), the pid check covers a fork without handlers.

using GompParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct Gomp {
  GompParallelFn parallel = nullptr;
  pid_t pid = 0;
};

const Gomp& gomp() {
  static const Gomp g = [] {
    Gomp r;
    // GNU OpenMP (torch's pip wheels), else Intel's, which exports the same GOMP_ entry
    // points for GCC-compiled code (some conda builds of torch)
    for (const char* lib : {"libgomp.so.1", "libiomp5.so"}) {
      if (void* h = dlopen(lib, RTLD_NOW | RTLD_NOLOAD)) {
        r.parallel = reinterpret_cast<GompParallelFn>(dlsym(h, "GOMP_parallel"));
        if (r.parallel != nullptr) break;
      }
    }
    r.pid = getpid();
    return r;
  }();
  return g;
}

std::atomic<int> g_threading{-1};  // -1: not chosen yet, else a Threading value

enum Threading { kPool = 0, kOpenMP = 1 };

int threading_now() {
  if (g_forked_child.load(std::memory_order_relaxed)) return kPool;
  int t = g_threading.load(std::memory_order_relaxed);
  if (t < 0) {
    t = gomp().parallel != nullptr ? kOpenMP : kPool;
    g_threading.store(t, std::memory_order_relaxed);
  }
  return t;
}

struct GompJob {
  const std::function<void(int64_t)>* fn;
  int64_t num_tasks;
  std::atomic<int64_t> next{0};
};

void gomp_body(void* data) {
  auto* job = static_cast<GompJob*>(data);
  const bool outer = t_inside_task;
  t_inside_task = true;
  for (int64_t t; (t = job->next.fetch_add(1)) < job->num_tasks;) (*job->fn)(t);
  t_inside_task = outer;
}

bool run_on_gomp(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
  const Gomp& g = gomp();
  if (g.parallel == nullptr || g.pid != getpid() || g_forked_child.load()) return false;
  GompJob job;
  job.fn = &fn;
  job.num_tasks = num_tasks;
  const int64_t team = num_tasks < kMaxWorkers ? num_tasks : kMaxWorkers;
  g.parallel(gomp_body, &job, static_cast<unsigned>(team), 0);
  return true;
}

}  // namespace

void parallel_tasks(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
  if (num_tasks <= 0) return;
  if (num_tasks == 1 || t_inside_task) {
    for (int64_t t = 0; t < num_tasks; ++t) fn(t);
    return;
  }
  if (threading_now() == kOpenMP && run_on_gomp(num_tasks, fn)) return;
  if (!pool().run(num_tasks, fn)) {
    for (int64_t t = 0; t < num_tasks; ++t) fn(t);
  }
}

std::string threading() {
  return threading_now() == kOpenMP ? "openmp" : "pool";
}

void set_threading(const std::string& name) {
  if (name == "pool") {
    g_threading.store(kPool);
  } else if (name == "openmp") {
    if (g_forked_child.load()) {
      throw std::invalid_argument(
          "qpeft._C.set_threading: this is a child of fork(); it cannot use its parent's "
          "OpenMP team, so kernels run on qpeft's own pool");
    }
    if (gomp().parallel == nullptr) {
      throw std::invalid_argument(
          "qpeft._C.set_threading: no OpenMP runtime (libgomp or libiomp5) is loaded in this "
          "process");
    }
    g_threading.store(kOpenMP);
  } else if (name == "auto") {
    g_threading.store(-1);
  } else {
    throw std::invalid_argument("qpeft._C.set_threading: unknown threading '" + name +
                                "' (expected 'auto', 'openmp' or 'pool')");
  }
}

void parallel_ranges(int64_t total, int64_t parts,
                     const std::function<void(int64_t, int64_t)>& fn) {
  if (total <= 0) return;
  if (parts > total) parts = total;
  if (parts < 1) parts = 1;
  const int64_t base = total / parts, extra = total % parts;
  parallel_tasks(parts, [&](int64_t t) {
    const int64_t begin = t * base + (t < extra ? t : extra);
    fn(begin, begin + base + (t < extra ? 1 : 0));
  });
}

}  // namespace cpu
}  // namespace qpeft
