// Memory advice for freshly allocated kernel outputs.
//
// A dequantized weight is a large new tensor (4096x4096 bf16: 32 MiB), and on Linux
// its first write costs a page fault per 4 KiB page. On the dev box (2 threads) that is
// 7.4 ms of the 8.1 ms torch.empty(...).fill_() of 32 MiB takes, against 0.66 ms for the
// fill of a reused tensor; with MADV_HUGEPAGE on the buffer first, empty + fill is
// 2.7 ms (512x fewer faults; the kernel still zeroes every page). torch offers the same
// for all its allocations behind THP_MEM_ALLOC_ENABLE=1; here it is applied to the
// outputs of our kernels only, which are written in full right away.
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "api.h"

namespace qpeft {
namespace cpu {

bool advise_hugepages(uintptr_t ptr, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (ptr == 0 || nbytes <= 0) return false;
  // Only the 2 MiB pages lying wholly inside the buffer: memory around it is not ours.
  const uintptr_t begin = (ptr + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (ptr + static_cast<uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (end <= begin) return false;
  // Advice only: an error (no THP in this kernel, memory that is not anonymous) leaves
  // the buffer exactly as it was, so it is reported, not raised.
  return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE) == 0;
#else
  (void)ptr;
  (void)nbytes;
  return false;
#endif
}

}  // namespace cpu
}  // namespace qpeft
