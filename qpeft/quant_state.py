"""QuantState: everything needed to decode a quantized tensor, in bitsandbytes' layout.

Field names, nesting (``state2`` holds the double-quantization statistics) and the
serialized form (``as_dict(packed=True)``) follow bitsandbytes, so a state written
by either library loads into the other (DESIGN.md, "Serialization").
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ._formats import BLOCKSIZES_4BIT, QUANT_TYPES

_PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
_VALID_KEYS = {
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state",
    "quant_type",
    "blocksize",
    "dtype",
    "shape",
    "nested_blocksize",
    "nested_dtype",
    "nested_offset",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"quant state entry {key!r} names no torch dtype: {name!r}")
    return dtype


def pack_dict(d: dict[str, Any]) -> torch.Tensor:
    """Non-tensor entries as UTF-8 JSON in a uint8 tensor (safetensors holds only tensors)."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_dict(t: torch.Tensor) -> dict[str, Any]:
    try:
        return json.loads(bytes(t.detach().cpu().to(torch.uint8).numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"packed quant state is not UTF-8 JSON: {exc}") from None


class QuantState:
    """Decoding state of a blockwise-quantized tensor.

    4-bit: ``absmax`` (fp32 per block, or uint8 codes when ``state2`` is set),
    ``shape``/``dtype`` of the original tensor, ``code`` (the 16 code values),
    ``blocksize``, ``quant_type``; with double quantization ``offset`` (0-d fp32)
    and ``state2`` (a QuantState whose ``absmax`` is the fp32 nested absmax and
    whose ``code`` is the 256-value dynamic map). 8-bit blockwise states use
    ``absmax``, ``code``, ``blocksize`` and ``dtype``.
    """

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...] | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | None = None,
        state2: QuantState | None = None,
    ):
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    def __repr__(self) -> str:
        shape = tuple(self.shape) if self.shape is not None else None
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={shape}, dtype={self.dtype}, "
            f"blocksize={self.blocksize}, nested={self.nested})"
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The bitsandbytes state-dict entries (strip-prefixed keys, as bitsandbytes writes them).

        ``packed=True`` returns only tensors: the non-tensor items go into
        ``quant_state.bitsandbytes__<quant_type>`` as UTF-8 JSON.
        """
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": float(self.offset.item()),
                }
            )
        if not packed or self.quant_type is None:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        tensors[_PACKED_KEY_PREFIX + self.quant_type] = pack_dict(
            {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        )
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str) -> QuantState:
        """Rebuild a state from ``as_dict`` output (packed or not; keys may carry a prefix
        such as ``weight.``). Raises ValueError naming what is missing or malformed."""
        d = dict(qs_dict)
        packed_keys = [k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if len(packed_keys) > 1:
            raise ValueError(f"expected one packed quant_state entry, found {packed_keys}")
        if packed_keys:
            key = packed_keys[0]
            suffix = key.split(".")[-1]
            if suffix not in {f"bitsandbytes__{q}" for q in QUANT_TYPES}:
                raise ValueError(f"unknown packed quant_state entry {key!r}")
            d.update(unpack_dict(d.pop(key)))
        elif "quant_type" not in d:
            raise ValueError(
                "found neither a packed quant_state entry nor unpacked quant_type/blocksize items"
            )
        d = {k.split(".")[-1]: v for k, v in d.items()}
        unknown = set(d) - _VALID_KEYS
        if unknown:
            raise ValueError(f"unexpected quant state entries: {sorted(unknown)}")
        for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if key not in d:
                raise ValueError(f"quant state is missing {key!r}")
        if d["quant_type"] not in QUANT_TYPES:
            raise ValueError(f"quant state has unknown quant_type {d['quant_type']!r}")
        if d["blocksize"] not in BLOCKSIZES_4BIT:
            raise ValueError(f"quant state has unsupported blocksize {d['blocksize']!r}")

        state2 = offset = None
        if "nested_absmax" in d:
            for key in ("nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset"):
                if key not in d:
                    raise ValueError(f"double-quantized state is missing {key!r}")
            offset = torch.tensor(float(d["nested_offset"]), dtype=torch.float32, device=device)
            state2 = cls(
                absmax=d["nested_absmax"].to(device),
                blocksize=int(d["nested_blocksize"]),
                code=d["nested_quant_map"].to(device),
                dtype=_dtype_from_name(d["nested_dtype"], "nested_dtype"),
            )
        return cls(
            quant_type=d["quant_type"],
            absmax=d["absmax"].to(device),
            blocksize=int(d["blocksize"]),
            code=d["quant_map"].to(device),
            dtype=_dtype_from_name(d["dtype"], "dtype"),
            shape=torch.Size(d["shape"]) if d["shape"] is not None else None,
            offset=offset,
            state2=state2,
        )

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor to ``device`` (in place, like bitsandbytes) and return self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self
