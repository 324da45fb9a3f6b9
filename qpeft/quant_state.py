"""QuantState: everything needed to decode a quantized tensor, in bitsandbytes' layout.

Field names, nesting (``state2`` holds the double-quantization statistics) and the
serialized form (``as_dict(packed=True)``) follow bitsandbytes, so a state written
by either library loads into the other (docs/design.md, "Formats").
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from ._formats import BLOCKSIZES_4BIT, FLOAT_DTYPES, QUANT_TYPES, code4

_PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
_NESTED_KEYS = ("nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset")
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
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


def _dtype_from_name(name: Any, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"quant state entry {key!r} must name float32, float16 or bfloat16, got {name!r}")
    return dtype


def _int_field(value: Any, key: str) -> int:
    # bool is an int subclass and "64" would pass int(): neither is a blocksize a writer produces
    if type(value) is not int:
        raise ValueError(f"quant state entry {key!r} must be an integer, got {value!r}")
    return value


def _tensor_field(value: Any, key: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"quant state entry {key!r} must be a tensor, got {type(value).__name__}")
    return value


def _shape_field(value: Any, key: str) -> torch.Size | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"quant state entry {key!r} must be a list of non-negative integers, got {value!r}")
    return torch.Size(value)


def _blocks(n: int, blocksize: int) -> int:
    return -(n // -blocksize)


def _blocksize_ok(blocksize: Any, quant_type: str | None) -> bool:
    """4-bit states take the 4-bit kernels' blocksizes; 8-bit blockwise states (quant_type
    None) any positive integer, as quantize_blockwise (and bitsandbytes) produce them."""
    if quant_type is None:
        return type(blocksize) is int and blocksize > 0
    return blocksize in BLOCKSIZES_4BIT


def pack_dict(d: dict[str, Any]) -> torch.Tensor:
    """Non-tensor entries as UTF-8 JSON in a uint8 tensor (safetensors holds only tensors)."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_dict(t: torch.Tensor) -> dict[str, Any]:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        what = (
            f"a {t.dtype} tensor of shape {tuple(t.shape)}"
            if isinstance(t, torch.Tensor)
            else type(t).__name__
        )
        raise ValueError(f"packed quant state must be a 1-D uint8 tensor of UTF-8 JSON, got {what}")
    try:
        d = json.loads(bytes(t.detach().cpu().numpy()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"packed quant state is not UTF-8 JSON: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError(f"packed quant state must be a JSON object, got a JSON {type(d).__name__}")
    return d


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

    def __getattr__(self, name: str):
        # Only reached when ordinary lookup fails. State-dict keys are attribute paths, and
        # torch.distributed.checkpoint.state_dict (get_state_dict / set_state_dict) walks
        # them with getattr: ``weight.quant_state.bitsandbytes__<type>`` resolves to the
        # packed tensor that key holds.
        quant_type = self.__dict__.get("quant_type")
        if quant_type is not None and name == "bitsandbytes__" + quant_type:
            return self.as_dict(packed=True)[_PACKED_KEY_PREFIX + quant_type]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        shape = tuple(self.shape) if self.shape is not None else None
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={shape}, dtype={self.dtype}, "
            f"blocksize={self.blocksize}, nested={self.nested})"
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The bitsandbytes state-dict entries (strip-prefixed keys, as bitsandbytes writes them).

        ``packed=True`` returns only tensors: the non-tensor items go into
        ``quant_state.bitsandbytes__<quant_type>`` as UTF-8 JSON. A state on the meta device
        gives the same entries without reading a value (``nested_offset`` is None).
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
                    # a meta-device state (a layer built on the meta device) has no value to
                    # read: the entry is there, as the keys are, with None for its number
                    "nested_offset": None if self.offset.is_meta else float(self.offset.item()),
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
    def from_dict(
        cls,
        qs_dict: dict[str, Any],
        device: torch.device | str,
        *,
        strict: bool = False,
        key_prefix: str = "",
    ) -> QuantState:
        """Rebuild a state from ``as_dict`` output (packed or not; keys may carry a prefix
        such as ``weight.``), 4-bit or 8-bit blockwise (``quant_type`` None, as bitsandbytes
        writes 8-bit states). Raises ValueError naming what is missing or malformed.

        The default reads what bitsandbytes reads (leftover nested entries without
        ``nested_absmax`` are ignored, as there). ``strict=True`` also refuses a partial set
        of nested entries and runs :meth:`validate`, so a state that cannot decode fails
        here rather than in a later forward. ``key_prefix`` is prepended to key names in
        error messages (a layer passes its state-dict prefix)."""
        d = dict(qs_dict)
        packed_keys = [k for k, v in d.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if len(packed_keys) > 1:
            raise ValueError(f"expected one packed quant_state entry, found {packed_keys}")
        names: dict[str, str] = {}  # short name -> the key to name in errors
        # what the keys share before their short names ("weight." in a layer's state dict),
        # so an absent entry is named as the checkpoint would hold it
        stem = key_prefix
        if packed_keys:
            stem += packed_keys[0][: packed_keys[0].rfind("quant_state")]
        elif dotted := [k for k in d if "." in k]:
            stem += dotted[0].rsplit(".", 1)[0] + "."
        packed_type = None
        if packed_keys:
            key = packed_keys[0]
            suffix = key.split(".")[-1]
            if suffix not in {f"bitsandbytes__{q}" for q in QUANT_TYPES}:
                raise ValueError(f"unknown packed quant_state entry {key_prefix + key!r}")
            packed_type = suffix.removeprefix("bitsandbytes__")
            fields = unpack_dict(d.pop(key))
            overlap = sorted(set(fields) & {k.split(".")[-1] for k in d})
            if overlap:
                raise ValueError(f"{key_prefix + key!r} repeats entries that are also tensors: {overlap}")
            d.update(fields)
            names.update({k: f"{key_prefix}{key}[{k!r}]" for k in fields})
        elif "quant_type" not in {k.split(".")[-1] for k in d}:
            raise ValueError(
                "found neither a packed quant_state entry nor unpacked quant_type/blocksize items"
            )
        for k in list(d):
            short = k.split(".")[-1]
            names.setdefault(short, key_prefix + k)
            if short != k:
                if short in d:
                    raise ValueError(f"quant state entry {short!r} appears twice ({k!r})")
                d[short] = d.pop(k)
        unknown = set(d) - _VALID_KEYS
        if unknown:
            raise ValueError(f"unexpected quant state entries: {sorted(unknown)}")

        def absent(key: str) -> str:
            """The name an absent entry would have: tensors are keys of their own, the other
            fields live in the packed entry when there is one."""
            if key in names:
                return names[key]
            if packed_keys and key not in _TENSOR_KEYS:
                return f"{key_prefix}{packed_keys[0]}[{key!r}]"
            return stem + key

        for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if key not in d:
                raise ValueError(f"quant state is missing {absent(key)!r}")
        quant_type = d["quant_type"]
        if quant_type is not None and quant_type not in QUANT_TYPES:
            raise ValueError(f"quant state has unknown quant_type {quant_type!r} ({names['quant_type']})")
        if packed_keys and quant_type != packed_type:
            raise ValueError(
                f"{names['quant_type']} is {quant_type!r} but the entry is named for {packed_type!r}"
            )
        blocksize = _int_field(d["blocksize"], names["blocksize"])
        if not _blocksize_ok(blocksize, quant_type):
            raise ValueError(f"quant state has unsupported blocksize {blocksize!r} ({names['blocksize']})")
        present = [k for k in _NESTED_KEYS if k in d]
        if strict and present and len(present) != len(_NESTED_KEYS):
            missing = [absent(k) for k in _NESTED_KEYS if k not in d]
            raise ValueError(f"double-quantized state is missing {missing} (it has {present})")

        state2 = offset = None
        if "nested_absmax" in d:
            for key in _NESTED_KEYS:
                if key not in d:
                    raise ValueError(f"double-quantized state is missing {absent(key)!r}")
            value = d["nested_offset"]
            if value is None:
                raise ValueError(
                    f"{names['nested_offset']} has no value: the state was written from the meta device "
                    "(state_dict() of a layer not loaded yet); load a checkpoint with values"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{names['nested_offset']} must be a number, got {value!r}")
            offset = torch.tensor(float(value), dtype=torch.float32, device=device)
            state2 = cls(
                absmax=_tensor_field(d["nested_absmax"], names["nested_absmax"]).to(device),
                blocksize=_int_field(d["nested_blocksize"], names["nested_blocksize"]),
                code=_tensor_field(d["nested_quant_map"], names["nested_quant_map"]).to(device),
                dtype=_dtype_from_name(d["nested_dtype"], names["nested_dtype"]),
            )
        state = cls(
            quant_type=quant_type,
            absmax=_tensor_field(d["absmax"], names["absmax"]).to(device),
            blocksize=blocksize,
            code=_tensor_field(d["quant_map"], names["quant_map"]).to(device),
            dtype=_dtype_from_name(d["dtype"], names["dtype"]),
            shape=_shape_field(d["shape"], names["shape"]),
            offset=offset,
            state2=state2,
        )
        if strict:
            state.validate(names)
        return state

    def validate(self, names: dict[str, str] | None = None) -> None:
        """Check that the state can decode: statistics sized for ``shape`` and ``blocksize``,
        fp32 (uint8 codes when double-quantized), finite, non-negative plain absmax, and the
        4-bit ``quant_map`` equal to the table of ``quant_type`` (the kernels decode with
        that table). ``names`` maps entry names (``absmax``, ``nested_absmax``...) to the
        keys to name in errors. Raises ValueError."""
        names = names or {}

        def name(key: str) -> str:
            return names.get(key, key)

        def check(t: torch.Tensor, key: str, dtype: torch.dtype, numel: int | None) -> None:
            if t.dtype != dtype:
                raise ValueError(f"{name(key)} must be {dtype}, got {t.dtype}")
            if numel is not None and t.numel() != numel:
                raise ValueError(f"{name(key)} has {t.numel()} entries, expected {numel}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name(key)} holds NaN or infinite values")

        if self.quant_type is not None:
            if self.quant_type not in QUANT_TYPES:
                raise ValueError(f"unknown quant_type {self.quant_type!r} ({name('quant_type')})")
            if self.shape is None:
                raise ValueError(f"a 4-bit state needs a shape ({name('shape')} is None)")
            check(self.code, "quant_map", torch.float32, 16)
            if not torch.equal(self.code.cpu().reshape(-1), code4(self.quant_type)):
                raise ValueError(f"{name('quant_map')} is not the {self.quant_type} table")
        else:
            check(self.code, "quant_map", torch.float32, 256)
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name('dtype')} must be float32, float16 or bfloat16, got {self.dtype}")
        if not _blocksize_ok(self.blocksize, self.quant_type):
            raise ValueError(f"unsupported blocksize {self.blocksize!r} ({name('blocksize')})")
        n = math.prod(self.shape) if self.shape is not None else None
        if n == 0:
            raise ValueError(f"{name('shape')} is {tuple(self.shape)}: a quantized tensor is never empty")
        blocks = _blocks(n, self.blocksize) if n is not None else None
        if not self.nested:
            if self.absmax.dtype == torch.uint8:
                raise ValueError(
                    f"{name('absmax')} holds uint8 codes of a double-quantized state but "
                    f"{name('nested_absmax')} and the other nested entries are missing"
                )
            check(self.absmax, "absmax", torch.float32, blocks)
            if bool((self.absmax < 0).any()):
                raise ValueError(f"{name('absmax')} holds negative values (block maxima of |x| are >= 0)")
            return
        check(self.absmax, "absmax", torch.uint8, blocks)
        st2 = self.state2
        if not isinstance(self.offset, torch.Tensor) or self.offset.numel() != 1:
            raise ValueError(f"{name('nested_offset')} must be one number")
        check(self.offset, "nested_offset", torch.float32, 1)
        if not _blocksize_ok(st2.blocksize, self.quant_type):  # 8-bit: any, as bitsandbytes nests them
            raise ValueError(f"unsupported nested blocksize {st2.blocksize!r} ({name('nested_blocksize')})")
        if st2.dtype != torch.float32:
            raise ValueError(f"{name('nested_dtype')} must be float32, got {st2.dtype}")
        check(st2.code, "nested_quant_map", torch.float32, 256)
        check(st2.absmax, "nested_absmax", torch.float32, _blocks(self.absmax.numel(), st2.blocksize))

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor to ``device`` (in place, like bitsandbytes) and return self."""
        self.absmax = self.absmax.to(device)
        if self.code is not None:
            self.code = self.code.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.to(device)
        return self
