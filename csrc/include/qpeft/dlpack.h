// The DLPack (v0.8, "legacy" unversioned) structures qpeft hands to torch, and a
// 1-D buffer whose deleter frees foreign memory (CUDA managed memory for the
// paged optimizers, csrc/cuda/paged.cu; plain host memory in csrc/cpu for the
// tests of the same path). Declared here rather than taken from dlpack.h so the
// build needs no third-party header; the layout is DLPack's C ABI, pinned by the
// static_asserts below (x86-64 / aarch64 LP64).
//
// Ownership: make_buffer returns a ManagedTensor that owns `data`. Whoever
// consumes it (torch.utils.dlpack.from_dlpack, through a "dltensor" capsule)
// calls deleter exactly once, when the last tensor over the memory dies; an
// unconsumed capsule calls it from its destructor. The deleter runs without the
// GIL on whichever thread frees the tensor: it touches no Python state.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qpeft {
namespace dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2 };
enum TypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // nullptr: compact row-major
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

static_assert(sizeof(Device) == 8 && sizeof(DataType) == 4, "DLPack layout");
static_assert(offsetof(Tensor, device) == 8 && offsetof(Tensor, ndim) == 16 &&
                  offsetof(Tensor, dtype) == 20,
              "DLPack layout");
static_assert(offsetof(Tensor, shape) == 24 && offsetof(Tensor, strides) == 32 &&
                  sizeof(Tensor) == 48,
              "DLPack layout");
static_assert(offsetof(ManagedTensor, manager_ctx) == 48 && sizeof(ManagedTensor) == 64,
              "DLPack layout");

constexpr const char* kCapsuleName = "dltensor";  // renamed "used_dltensor" by the consumer

// One allocation behind a 1-D DLPack tensor.
struct Buffer {
  ManagedTensor managed;
  int64_t shape[1];
  void (*free_memory)(void* data);
};

inline void buffer_deleter(ManagedTensor* self) {
  Buffer* b = static_cast<Buffer*>(self->manager_ctx);
  b->free_memory(b->managed.dl_tensor.data);
  delete b;
}

// A ManagedTensor owning `data` (numel elements of dtype on device), freed by
// free_memory(data). Throws std::bad_alloc like new; the caller frees `data`
// itself if this throws.
inline ManagedTensor* make_buffer(void* data, int64_t numel, DataType dtype, Device device,
                                  void (*free_memory)(void*)) {
  Buffer* b = new Buffer;
  b->shape[0] = numel;
  b->free_memory = free_memory;
  b->managed.dl_tensor = Tensor{data, device, 1, dtype, b->shape, nullptr, 0};
  b->managed.manager_ctx = b;
  b->managed.deleter = buffer_deleter;
  return &b->managed;
}

}  // namespace dlpack
}  // namespace qpeft
