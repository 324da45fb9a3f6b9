"""The bounds of the CPU QLoRA layer's bf16 compute mode now live, with their derivation, in
qpeft/testing.py (shared with ``python -m qpeft selftest``); re-exported for the tests."""

from qpeft.testing import U_BF16, U_CAST, bf16_oracle, gamma, rho  # noqa: F401
