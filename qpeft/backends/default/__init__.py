"""Backend "default": the pure-torch reference (registered in ``ops.py``)."""
