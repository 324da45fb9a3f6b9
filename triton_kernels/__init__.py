"""Triton kernels of qpeft, installed as ``qpeft.triton_kernels``.

Plain launchers only: no op registration and no autograd here (that is
``qpeft.backends.triton``). The directory is mapped into the ``qpeft`` namespace
by setup.py (``package_dir={"qpeft.triton_kernels": "triton_kernels"}``) because a
top-level ``triton_kernels`` module would collide with the one Triton itself ships.
Importing this package imports no kernel module (and so not triton).

Modules:
  quant  4-bit (NF4/FP4) and 8-bit blockwise quantize/dequantize
  qlora  the fused dequant + LoRA GEMMs (forward, input gradient)

Ahead-of-time configurations
----------------------------
Each kernel module exports ``AOT_CONFIGS``: the kernel configurations its launchers
run, which ``benchmarks/triton_aot_report.py`` compiles for sm_80 and sm_90 without a
GPU (registers, stack, local and shared memory per config, read from the cubin).
Each entry is a dict:

  name        str, unique in the module, e.g. "quantize_4bit_bs64_bf16"
  fn          the @triton.jit kernel
  signature   {arg name: type} for every argument of ``fn`` in order: "*fp32",
              "*bf16", "*u8", "*i32", "i32", "i64", "fp32", ...; "constexpr" for
              constexpr arguments and for integer arguments the JIT specializes as
              constants (e.g. a unit stride)
  constexprs  {arg name: value} for every "constexpr" entry of the signature
  num_warps   int
  num_stages  int
  attrs       optional: ASTSource attrs, {(arg index,): [["tt.divisibility", 16]], ...},
              the specializations the JIT makes at a typical launch (e.g. 16-byte
              aligned pointers); absent means none
  options     optional: further compile options, as passed to the launch
              (e.g. {"enable_fp_fusion": False}); absent means Triton's defaults
  archs       optional tuple of ints, e.g. (90,): the entry is that arch's default
              config only (the launchers pick tiles by compute capability) and is
              compiled for those archs alone; absent means every arch
  default     optional bool, True when absent: a config the launchers pick in
              common cases. tests/test_triton_aot.py requires zero spills (no
              local memory, no stack) for every default config.

That is ``triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", arch, 32), options={"num_warps": ..., "num_stages": ..., **options})``.
"""
