"""The bounds of the CPU QLoRA layer's bf16 compute mode now live, with their derivation, in
qpeft/testing.py (shared with ``python -m qpeft selftest``); re-exported for the tests."""

from qpeft.testing import U_BF16, U_CAST, amx_gemm_bound, bf16_oracle, flush_bound, gamma, rho  # noqa: F401
