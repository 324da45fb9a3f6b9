from . import ops, qlora  # noqa: F401
