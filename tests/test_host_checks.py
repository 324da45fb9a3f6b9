"""The host-side checks of the native entry points (csrc/include/qpeft/host_checks.h):
sizes are checked with overflow-safe 64-bit arithmetic before any memory is touched,
and a failure is a ValueError naming the module, the entry point and the argument.

The calls below pass fake pointers on purpose: each must be refused before it is
dereferenced, so a missing check shows up as a crash or a wrong result, not a pass.
"""

from __future__ import annotations

import pytest
import torch

from qpeft._native import cpu_module

from .emu_support import emu_module

FAKE = 0x1000  # a non-null pointer that must never be dereferenced


def _cpu_gemv(m, n, k, x_len, packed_len, absmax_len, out_len, x=FAKE, out=FAKE):
    return cpu_module().gemv_4bit(
        x, x_len, m, n, k, FAKE, packed_len, FAKE, absmax_len, 64, 2, 0, 0, 0, 0, 256, out, out_len, 1
    )


def _emu_gemv(m, n, k, x_len, packed_len, absmax_len, out_len):
    return emu_module().gemv_4bit(
        FAKE,
        0,
        x_len,
        m,
        k,
        FAKE,
        packed_len,
        FAKE,
        absmax_len,
        n,
        4096,
        2,
        0,
        0,
        0,
        0,
        256,
        FAKE,
        out_len,
        0,
    )


def test_host_buffer_byte_count_cannot_wrap():
    """numel * 4 for numel = 2^62 wraps to 0 in 64 bits: the allocation must be refused,
    not made 64 bytes long for a tensor that claims 2^62 elements."""
    with pytest.raises(ValueError, match=r"qpeft\._C\.host_buffer_dlpack: numel = 4611686018427387904"):
        cpu_module().host_buffer_dlpack(2**62, 2, 32)
    with pytest.raises(ValueError, match="numel must be >= 0, got -1"):
        cpu_module().host_buffer_dlpack(-1, 2, 32)


def test_cpu_gemv_checks_x_and_out():
    """qpeft._C.gemv_4bit takes the element counts of x and out and refuses buffers too
    small for m x k and m x n (it used to trust Python for both)."""
    m, n, k = 2, 16, 64
    packed_len, absmax_len = n * k // 2, n * k // 64
    with pytest.raises(ValueError, match=r"qpeft\._C\.gemv_4bit: x holds 127 elements, needs at least 128"):
        _cpu_gemv(m, n, k, m * k - 1, packed_len, absmax_len, m * n)
    with pytest.raises(ValueError, match=r"qpeft\._C\.gemv_4bit: out holds 31 elements, needs at least 32"):
        _cpu_gemv(m, n, k, m * k, packed_len, absmax_len, m * n - 1)
    with pytest.raises(ValueError, match=r"qpeft\._C\.gemv_4bit: takes 1 to 8 rows of x, got m=9"):
        _cpu_gemv(9, n, k, 9 * k, packed_len, absmax_len, 9 * n)
    # a well-formed call on real buffers still runs: W all code 7 (NF4 zero) -> zeros
    x, out = torch.randn(m, k), torch.full((m, n), float("nan"))
    packed = torch.full((packed_len,), 0x77, dtype=torch.uint8)
    absmax = torch.ones(absmax_len)
    cpu_module().gemv_4bit(
        x.data_ptr(),
        x.numel(),
        m,
        n,
        k,
        packed.data_ptr(),
        packed_len,
        absmax.data_ptr(),
        absmax_len,
        64,
        2,
        0,
        0,
        0,
        0,
        256,
        out.data_ptr(),
        out.numel(),
        1,
    )
    assert bool((out == 0).all())


@pytest.mark.parametrize("gemv", [_cpu_gemv, _emu_gemv], ids=["cpu", "cuda_emu"])
def test_gemv_size_products_cannot_wrap(gemv):
    """m * k with m = 8, k = 2^61 wraps to 0 in 64 bits, which an empty x buffer would
    pass; the product must be checked, not wrapped."""
    n, k = 1, 2**61
    with pytest.raises(ValueError, match=r"gemv_4bit: m \* k = 8 \* 2305843009213693952 overflows 64 bits"):
        gemv(8, n, k, 0, k // 2, k // 64, 8)
    with pytest.raises(ValueError, match=r"gemv_4bit: n \* k = .* overflows 64 bits"):
        gemv(1, 2**32, 2**32, 2**32, 2**63 - 1, 2**63 - 1, 2**32)


def test_messages_name_module_and_entry_point():
    """The same check reads the same in every module, prefixed with the module that
    raised it: the emulation module no longer claims to be qpeft._C_cuda, and the CUDA
    quantization launchers name their entry point."""
    emu = emu_module()
    x = torch.randn(128)
    packed, absmax = torch.empty(64, dtype=torch.uint8), torch.empty(2)
    for mod, name in ((cpu_module(), "qpeft._C"), (emu, "qpeft._C_cuda_emu")):
        last = (1,) if name == "qpeft._C" else (0,)  # num_threads / stream
        with pytest.raises(
            ValueError, match=rf"^{name}\.quantize_4bit: packed holds 63 elements, needs at least 64$"
        ):
            mod.quantize_4bit(x.data_ptr(), 0, 128, 64, 2, packed.data_ptr(), 63, absmax.data_ptr(), 2, *last)
        with pytest.raises(ValueError, match=rf"^{name}\.dequantize_4bit: quant_type must be 1 \(fp4\) or 2"):
            mod.dequantize_4bit(FAKE, 64, FAKE, 2, 128, 64, 3, FAKE, 0, 0, 0, 0, 0, 256, *last)
        with pytest.raises(
            ValueError, match=rf"^{name}\.adamw32_step: exp_avg_sq holds 9 elements, expected 10$"
        ):
            mod.adamw32_step(FAKE, FAKE, 0, 10, FAKE, 10, FAKE, 9, (1.0,) * 8, *last)
        with pytest.raises(ValueError, match=rf"^{name}\.lion32_step: neg_lr must be finite, got inf$"):
            mod.lion32_step(FAKE, FAKE, 0, 10, FAKE, 10, (1.0,) * 5 + (float("inf"),), *last)
        with pytest.raises(ValueError, match=rf"^{name}\.adamw32_step: scalars must hold 8 values, got 1$"):
            mod.adamw32_step(FAKE, FAKE, 0, 10, FAKE, 10, FAKE, 10, (1.0,), *last)
    # a larger-than-needed output buffer is fine for quantization ("at least"), while
    # optimizer state must match its parameter exactly: check_len vs check_len_exact
    big_packed = torch.empty(65, dtype=torch.uint8)
    cpu_module().quantize_4bit(
        x.data_ptr(), 0, 128, 64, 2, big_packed.data_ptr(), 65, absmax.data_ptr(), 2, 1
    )
    emu.quantize_4bit(x.data_ptr(), 0, 128, 64, 2, big_packed.data_ptr(), 65, absmax.data_ptr(), 2, 0)
    with pytest.raises(ValueError, match="exp_avg holds 11 elements, expected 10"):
        cpu_module().lion32_step(FAKE, FAKE, 0, 10, FAKE, 11, (1.0,) * 6, 1)


def test_cuda_blocksize_list_is_the_formats():
    """The CUDA 4-bit launchers take exactly format.h's blocksizes (32..4096, powers of two);
    the 8-bit ones any blocksize > 0, as bitsandbytes' CPU path does."""
    emu = emu_module()
    x = torch.randn(64)
    packed, q, absmax = (
        torch.empty(32, dtype=torch.uint8),
        torch.empty(64, dtype=torch.uint8),
        torch.empty(64),
    )
    code = torch.linspace(-1, 1, 256)
    for bs in (16, 48, 8192):
        with pytest.raises(ValueError, match=rf"blocksize must be a power of two in \[32, 4096\], got {bs}"):
            emu.quantize_4bit(x.data_ptr(), 0, 64, bs, 2, packed.data_ptr(), 32, absmax.data_ptr(), 64, 0)
    emu.quantize_4bit(x.data_ptr(), 0, 64, 32, 2, packed.data_ptr(), 32, absmax.data_ptr(), 64, 0)
    for bs in (0, -64):
        with pytest.raises(ValueError, match="blocksize"):
            emu.quantize_blockwise(
                x.data_ptr(), 0, 64, bs, code.data_ptr(), q.data_ptr(), 64, absmax.data_ptr(), 64, 0
            )
    for bs in (16, 48, 32):
        emu.quantize_blockwise(
            x.data_ptr(), 0, 64, bs, code.data_ptr(), q.data_ptr(), 64, absmax.data_ptr(), 64, 0
        )
