#include "thread_pool.h"

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
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

Pool& pool() {
  std::lock_guard<std::mutex> lock(g_pool_mu);
  // After fork() only the forking thread exists in the child: the old pool's
  // workers are gone, so start a new pool (the old object is leaked on purpose:
  // its mutexes may be held by threads that no longer exist).
  if (g_pool == nullptr || g_pool->owner_pid() != getpid()) g_pool = new Pool();
  return *g_pool;
}

}  // namespace

void parallel_tasks(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
  if (num_tasks <= 0) return;
  if (num_tasks == 1 || t_inside_task || !pool().run(num_tasks, fn)) {
    for (int64_t t = 0; t < num_tasks; ++t) fn(t);
  }
}

void parallel_ranges(int64_t total, int64_t parts, const std::function<void(int64_t, int64_t)>& fn) {
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
