// Host memory handed to torch through the same DLPack path as the paged
// optimizer's CUDA managed memory (csrc/cuda/paged.cu): a capsule whose deleter
// frees the allocation. Lets the tests exercise that ownership protocol (consumed
// capsule, unconsumed capsule, tensor freed) on a machine without a GPU.

#include <qpeft/dlpack.h>
#include <qpeft/host_checks.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "api.h"

namespace qpeft {
namespace cpu {
namespace {

std::atomic<int64_t> g_live{0};

void free_host(void* p) {
  std::free(p);
  g_live.fetch_sub(1);
}

}  // namespace

dlpack::ManagedTensor* host_buffer(int64_t numel, int dl_code, int bits) {
  const char* fn = "host_buffer_dlpack";
  const bool ok = (dl_code == dlpack::kFloat && (bits == 16 || bits == 32)) ||
                  (dl_code == dlpack::kUInt && bits == 8) ||
                  (dl_code == dlpack::kBfloat && bits == 16);
  if (!ok) {
    host::fail(fn, "unsupported DLPack dtype code " + std::to_string(dl_code) + " with " +
                       std::to_string(bits) + " bits");
  }
  // 64-byte aligned (a cache line), at least one line so numel == 0 is a valid pointer.
  // Checked: an unchecked numel * 4 wraps for numel >= 2^62 and would hand torch a
  // tensor of numel elements over a 64-byte allocation.
  const size_t bytes = host::checked_bytes(fn, "numel", numel, bits / 8);
  const size_t rounded = (bytes + 63) / 64 * 64 + (bytes == 0 ? 64 : 0);
  void* data = std::aligned_alloc(64, rounded);
  if (data == nullptr) throw std::bad_alloc();
  std::memset(data, 0, rounded);
  g_live.fetch_add(1);
  try {
    return dlpack::make_buffer(
        data, numel, dlpack::DataType{static_cast<uint8_t>(dl_code), static_cast<uint8_t>(bits), 1},
        dlpack::Device{dlpack::kCPU, 0}, free_host);
  } catch (...) {
    free_host(data);
    throw;
  }
}

int64_t host_buffers_live() {
  return g_live.load();
}

}  // namespace cpu
}  // namespace qpeft
