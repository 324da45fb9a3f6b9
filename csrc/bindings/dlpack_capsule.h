// Wraps a qpeft::dlpack::ManagedTensor in the "dltensor" PyCapsule that
// torch.utils.dlpack.from_dlpack consumes (shared by both binding modules).
#pragma once

#include <pybind11/pybind11.h>

#include <qpeft/dlpack.h>

namespace qpeft {
namespace bindings {

// A capsule that torch has not consumed (still named "dltensor") frees the
// memory when it is destroyed; a consumed one ("used_dltensor") belongs to torch.
inline void dltensor_capsule_destructor(PyObject* capsule) {
  if (PyCapsule_IsValid(capsule, dlpack::kCapsuleName)) {
    auto* mt =
        static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(capsule, dlpack::kCapsuleName));
    if (mt != nullptr && mt->deleter != nullptr) mt->deleter(mt);
  }
}

inline pybind11::object to_dltensor_capsule(dlpack::ManagedTensor* mt) {
  PyObject* capsule = PyCapsule_New(mt, dlpack::kCapsuleName, dltensor_capsule_destructor);
  if (capsule == nullptr) {
    mt->deleter(mt);
    throw pybind11::error_already_set();
  }
  return pybind11::reinterpret_steal<pybind11::object>(capsule);
}

}  // namespace bindings
}  // namespace qpeft
