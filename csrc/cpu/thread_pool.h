// How the CPU kernels run in parallel: on torch's OpenMP threads when torch's
// libgomp is loaded, else on a tiny persistent pool of our own.
//
// We never link or load an OpenMP runtime: torch ships its own (libgomp or
// libiomp), and a second runtime in the same process oversubscribes cores or
// crashes. The caller passes the thread count (Python gives
// torch.get_num_threads()).
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace qpeft {
namespace cpu {

// Runs fn(t) for t in [0, num_tasks), on up to num_tasks threads of which the
// calling thread is one. Returns when every task has finished. Tasks must not
// throw. If the pool is busy (another Python thread is inside a kernel: the GIL
// is released), or called from inside a task, the tasks run on the calling
// thread instead of waiting. Safe after fork(): a child process starts a fresh
// pool.
void parallel_tasks(int64_t num_tasks, const std::function<void(int64_t)>& fn);

// Which threads run the tasks: "openmp" (a GOMP_parallel region of the libgomp
// torch already loaded: its own worker threads) or "pool" (ours). "auto" picks
// openmp when libgomp is loaded. For tests and A/B measurements.
std::string threading();
void set_threading(const std::string& name);

// Splits [0, total) into `parts` contiguous near-equal ranges and runs
// fn(begin, end) for each as one task.
void parallel_ranges(int64_t total, int64_t parts, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace cpu
}  // namespace qpeft
