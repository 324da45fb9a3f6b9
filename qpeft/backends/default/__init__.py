from . import gemv, ops, qlora  # noqa: F401
