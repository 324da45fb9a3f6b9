"""Python wrappers of the raw-pointer ABI that ``qpeft._C`` (CPU), ``qpeft._C_cuda`` (CUDA)
and ``qpeft._C_cuda_emu`` (the CUDA kernels emulated on CPU) share (csrc/README.md).

Each module here builds a backend's kernels for one native module: ``kernels(module,
extra_args)`` returns ``{op name: kernel}``, where ``module()`` loads the native module on
first use and ``extra_args(device)`` gives the trailing arguments of every native call
(CPU: the thread count; CUDA: torch's current stream). The wrappers make inputs
contiguous, allocate outputs and pass pointers and element counts; the arguments were
validated at the public boundary, and the native code re-checks every size before it
touches memory. Registration happens in each backend's ``ops.py``, not here.
"""
