"""Weight4bit: a 4-bit quantized weight as a torch.Tensor (docs/design.md, "The 4-bit weight tensor").

A wrapper tensor subclass whose logical shape is the weight's ([out, in] for a linear layer)
and whose dtype is the dtype it dequantizes to, holding the packed codes (uint8
``[(numel + 1) // 2, 1]``, bitsandbytes' layout) and a :class:`qpeft.QuantState` (absmax,
nested statistics, code, blocksize, quant type). ``Linear4bit.weight`` is one, as an
``nn.Parameter(requires_grad=False)``, so module moves, ``copy.deepcopy``, ``torch.save`` /
``torch.load(weights_only=True)``, ``torch.compile`` and FSDP2's ``fully_shard`` treat it as
the module's weight while it stays 4-bit.

Only ops that keep the 4-bit form are implemented (aliases, clones, device moves, dtype
relabels, row slices on quantization-block boundaries, zero-filled allocation, copies between
4-bit weights, equality); any other aten op raises ``NotImplementedError`` naming
:meth:`Weight4bit.dequantize`, the one explicit way to a dense tensor. A ``qpeft`` op
given a Weight4bit reads its packed bytes.

FSDP2: ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` all-gather the packed bytes and the
statistics (never a dense copy); see docs/distributed.md, "The 4-bit weight under FSDP2".
"""

from __future__ import annotations

import math

import torch
from torch.utils._pytree import tree_map

from ._formats import BLOCKSIZES_4BIT, FLOAT_DTYPES, QUANT_TYPES, code4, dynamic_map, zero_code4
from .quant_state import QuantState

__all__ = ["Weight4bit", "broadcast_4bit", "ddp_ignore_4bit", "gather_full"]

aten = torch.ops.aten
_BUCKET_OPS = (aten.cat.default,)  # DistributedDataParallel flattens its broadcast buckets with cat


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


def fp32_absmax(state: QuantState) -> torch.Tensor:
    """The fp32 absmax a state decodes with: ``absmax`` itself, or for a double-quantized state
    the nested 8-bit codes decoded and the offset added, in fp32: the same two roundings as
    every backend's nested decode (backends/default/quant.py: ``nested_absmax``), so a state
    holding this vector decodes bit for bit like the nested one."""
    if not state.nested:
        return state.absmax
    st2 = state.state2
    nb = st2.blocksize
    n = state.absmax.numel()
    values = st2.code[state.absmax.reshape(-1).long()]
    scales = st2.absmax.repeat_interleave(nb)[:n] if n else st2.absmax[:0]
    return values * scales + state.offset.reshape(()).to(torch.float32)


def _zero_state(shape, like: QuantState, device, dtype, nested: bool) -> tuple[torch.Tensor, QuantState]:
    """A zero weight of ``shape`` in ``like``'s format: every code the code of 0.0, every
    absmax 0 (decodes to exact zeros). Nested: codes of 0 with a zero nested absmax."""
    n = math.prod(shape)
    z = zero_code4(like.quant_type)
    packed = torch.full(((n + 1) // 2, 1), z << 4 | z, dtype=torch.uint8, device=device)
    blocks = -(n // -like.blocksize)
    code = code4(like.quant_type, device).clone()  # the tables, not copies of a meta `like`
    if not nested:
        state = QuantState(
            absmax=torch.zeros(blocks, dtype=torch.float32, device=device),
            shape=shape,
            code=code,
            blocksize=like.blocksize,
            quant_type=like.quant_type,
            dtype=dtype,
        )
        return packed, state
    st2 = like.state2
    nested_state = QuantState(
        absmax=torch.zeros(-(blocks // -st2.blocksize), dtype=torch.float32, device=device),
        code=dynamic_map(signed=True, device=device).clone(),
        blocksize=st2.blocksize,
        dtype=st2.dtype,
    )
    # a zero nested absmax scales every code to 0 and the offset is 0: each absmax decodes to 0
    state = QuantState(
        absmax=torch.zeros(blocks, dtype=torch.uint8, device=device),
        shape=shape,
        code=code,
        blocksize=like.blocksize,
        quant_type=like.quant_type,
        dtype=dtype,
        offset=torch.zeros((), dtype=torch.float32, device=device),
        state2=nested_state,
    )
    return packed, state


class Weight4bit(torch.Tensor):
    """A 4-bit (NF4/FP4, blockwise, optionally double-quantized) weight as a tensor.

    ``packed``: uint8 ``[(numel + 1) // 2, 1]``; ``quant_state``: its :class:`QuantState`
    (``quant_state.shape`` is this tensor's shape and ``quant_state.dtype`` its dtype).
    Build one with :meth:`from_float` or ``Weight4bit(packed, quant_state)`` (shares both).
    """

    packed: torch.Tensor
    quant_state: QuantState
    # a row slice whose statistics had to be re-expressed (a double-quantized weight sliced
    # across a nested block): a copy, so writing into it would not reach the source
    _not_a_view: bool
    # a double-quantized row slice viewing part of a weight: its offset is the whole weight's,
    # so a copy into it must not change the offset (the rows outside would decode differently)
    _partial_nested: bool

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, packed: torch.Tensor, quant_state: QuantState, requires_grad: bool = False):
        if not isinstance(packed, torch.Tensor) or isinstance(packed, Weight4bit):
            raise TypeError(
                f"Weight4bit needs the packed uint8 codes as a plain tensor, got {type(packed).__name__}"
            )
        if packed.dtype != torch.uint8:
            raise TypeError(f"Weight4bit's packed codes must be uint8, got {packed.dtype}")
        if not isinstance(quant_state, QuantState) or quant_state.quant_type not in QUANT_TYPES:
            raise TypeError(f"Weight4bit needs a 4-bit QuantState (quant_type nf4/fp4), got {quant_state!r}")
        if quant_state.shape is None or quant_state.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"Weight4bit needs a QuantState with a shape and a float32/float16/bfloat16 dtype, got {quant_state!r}"
            )
        if quant_state.blocksize not in BLOCKSIZES_4BIT:
            raise ValueError(f"unsupported blocksize {quant_state.blocksize!r}")
        shape = tuple(quant_state.shape)
        return torch.Tensor._make_wrapper_subclass(
            cls,
            shape,
            strides=_contiguous_strides(shape),
            dtype=quant_state.dtype,
            device=packed.device,
            requires_grad=requires_grad,
        )

    def __init__(self, packed: torch.Tensor, quant_state: QuantState, requires_grad: bool = False):
        self.packed = packed
        self.quant_state = quant_state
        self._not_a_view = False
        self._partial_nested = False

    # --- construction and decoding ----------------------------------------------------------
    @classmethod
    def from_float(
        cls, weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = True
    ) -> Weight4bit:
        """Quantize a dense tensor (``qpeft.functional.quantize_4bit``)."""
        from . import functional as qf

        packed, state = qf.quantize_4bit(weight.detach(), blocksize, quant_type, double_quant)
        return cls(packed, state)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense tensor (default: this tensor's dtype), through ``qpeft.functional.dequantize_4bit``."""
        from . import functional as qf

        if self.numel() == 0:  # an empty row slice (FSDP's empty shards): nothing to decode
            return torch.empty(self.shape, dtype=dtype or self.dtype, device=self.device)
        return qf.dequantize_4bit(self.packed, self.quant_state, dtype or self.dtype)

    # ``param.data = new`` swaps only the C++ tensor (shape, dtype, device): the codes and
    # statistics live in this object's Python attributes, so they are swapped here too, or
    # ``quant_state.dtype`` would disagree with ``dtype`` (PEFT's prepare_model_for_kbit_training
    # does ``param.data = param.data.to(torch.float32)`` for every bf16/fp16 parameter).
    @property
    def data(self) -> torch.Tensor:
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        if not isinstance(new, Weight4bit):
            raise TypeError(
                f"a Weight4bit's data can only be another Weight4bit, got a {type(new).__name__} "
                f"of dtype {getattr(new, 'dtype', '?')}: quantize it explicitly (Weight4bit.from_float)"
            )
        torch.Tensor.data.__set__(self, new)
        self.packed, self.quant_state, self._not_a_view = new.packed, new.quant_state, new._not_a_view
        self._partial_nested = new._partial_nested

    @property
    def nested(self) -> bool:
        return self.quant_state.nested

    # inner tensors by name (__tensor_flatten__ reads them with getattr)
    @property
    def absmax(self) -> torch.Tensor:
        return self.quant_state.absmax

    @property
    def code(self) -> torch.Tensor:
        return self.quant_state.code

    @property
    def nested_absmax(self) -> torch.Tensor | None:
        return self.quant_state.state2.absmax if self.quant_state.nested else None

    @property
    def nested_code(self) -> torch.Tensor | None:
        return self.quant_state.state2.code if self.quant_state.nested else None

    # bitsandbytes' Params4bit names for the format (PEFT's and transformers' bnb code read
    # them off a 4-bit weight); read-only: requantize the layer to change them
    @property
    def quant_type(self) -> str:
        return self.quant_state.quant_type

    @property
    def blocksize(self) -> int:
        return self.quant_state.blocksize

    @property
    def compress_statistics(self) -> bool:
        return self.quant_state.nested

    @property
    def quant_storage(self) -> torch.dtype:
        return self.packed.dtype

    # the bitsandbytes state-dict names of the code tables, so that every state-dict key of a
    # 4-bit layer is an attribute path (torch.distributed.checkpoint.state_dict resolves
    # keys with getattr)
    @property
    def quant_map(self) -> torch.Tensor:
        return self.quant_state.code

    @property
    def nested_quant_map(self) -> torch.Tensor | None:
        return self.nested_code

    @property
    def offset(self) -> torch.Tensor | None:
        return self.quant_state.offset if self.quant_state.nested else None

    def storage_bytes(self) -> int:
        """Bytes of the packed codes and every statistic (the code tables excluded)."""
        ts = [self.packed, self.absmax, self.nested_absmax, self.offset]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def inner_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self._inner_names()]

    # The wrapper has no storage of its own (torch's share_memory_ would move its empty
    # placeholder storage and crash): the codes and statistics are what gets shared
    # (``Module.share_memory()``, torch.multiprocessing).
    def share_memory_(self) -> Weight4bit:
        for t in self.inner_tensors():
            t.share_memory_()
        return self

    def is_shared(self) -> bool:
        return all(t.is_shared() for t in self.inner_tensors())

    def __repr__(self) -> str:
        st = self.quant_state
        return (
            f"Weight4bit(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"quant_type={st.quant_type!r}, blocksize={st.blocksize}, double_quant={st.nested}"
            f"{', requires_grad=True' if self.requires_grad else ''})"
        )

    # --- flatten / unflatten (torch.compile, FSDP2's DTensor, pickling) -----------------------
    def _inner_names(self) -> list[str]:
        names = ["packed", "absmax", "code"]
        if self.quant_state.nested:
            names += ["nested_absmax", "nested_code", "offset"]
        return names

    def _meta(self) -> tuple:
        st = self.quant_state
        return (
            tuple(st.shape),
            st.dtype,
            st.blocksize,
            st.quant_type,
            st.state2.blocksize if st.nested else None,
            st.state2.dtype if st.nested else None,
        )

    def __tensor_flatten__(self):
        return self._inner_names(), self._meta()

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        shape, dtype, blocksize, quant_type, nested_bs, nested_dtype = meta
        if outer_size is not None:
            shape = tuple(outer_size)
        return Weight4bit(inner_tensors["packed"], _state_from(inner_tensors, shape, dtype, meta))

    def __reduce_ex__(self, protocol):
        names = self._inner_names()
        # a parameter stays one (nn.Parameter marks a tensor subclass with _is_param): a
        # module pickled whole (torch.save(model)) gets its weight back as a parameter
        return (
            _rebuild_weight4bit,
            (
                {n: getattr(self, n) for n in names},
                self._meta(),
                self.requires_grad,
                bool(getattr(self, "_is_param", False)),
            ),
        )

    # --- shapes and formats -----------------------------------------------------------------
    def _relabel(self, shape=None, dtype=None) -> Weight4bit:
        """The same storage under another shape (same numel) or logical dtype."""
        st = self.quant_state
        new = QuantState(
            absmax=st.absmax,
            shape=tuple(shape) if shape is not None else st.shape,
            code=st.code,
            blocksize=st.blocksize,
            quant_type=st.quant_type,
            dtype=dtype or st.dtype,
            offset=st.offset,
            state2=st.state2,
        )
        out = Weight4bit(self.packed, new)
        out._partial_nested = self._partial_nested  # a view of a partial view is one too
        return out

    def _map_inner(self, fn) -> Weight4bit:
        """fn applied to every inner tensor (clone, device move)."""
        st = self.quant_state
        state2 = None
        if st.nested:
            s2 = st.state2
            state2 = QuantState(
                absmax=fn(s2.absmax), code=fn(s2.code), blocksize=s2.blocksize, dtype=s2.dtype
            )
        new = QuantState(
            absmax=fn(st.absmax),
            shape=st.shape,
            code=fn(st.code),
            blocksize=st.blocksize,
            quant_type=st.quant_type,
            dtype=st.dtype,
            offset=fn(st.offset) if st.nested else None,
            state2=state2,
        )
        return Weight4bit(fn(self.packed), new)

    def _row_slice(self, r0: int, r1: int) -> Weight4bit:
        """Rows [r0, r1) along dim 0. A view of the packed bytes and statistics when the slice
        starts and ends on quantization blocks (and, double-quantized, on nested blocks of 256
        absmax: such a view of part of the weight shares its offset, which ``copy_`` into it
        keeps, ``_partial_nested``); across a nested block the slice holds its absmax decoded to fp32
        (``fp32_absmax``: bit-identical decode) and is a copy. Refused inside a block."""
        st = self.quant_state
        shape = tuple(st.shape)
        if len(shape) == 0:
            raise NotImplementedError("Weight4bit: a 0-d 4-bit tensor has no rows to slice")
        rows = shape[0]
        k = math.prod(shape[1:])
        n = rows * k
        bs = st.blocksize
        e0, e1 = r0 * k, r1 * k
        if e0 % bs or (e1 % bs and e1 != n):
            bad = e0 if e0 % bs else e1
            align = bs // math.gcd(k, bs) if k else 1
            if rows % align == 0 and rows // align >= 2:
                # world w shards evenly on blocks iff rows / w is a multiple of align
                sharding = f"e.g. an FSDP world size dividing {rows // align} ({rows} rows / {align})"
            else:
                sharding = (
                    f"no FSDP world size above 1 shards these {rows} rows on block boundaries (that needs "
                    f"a row count that is a multiple of {align}, at least {2 * align}): keep the module out of "
                    "fully_shard"
                )
            raise ValueError(
                f"Weight4bit{list(shape)}: rows [{r0}, {r1}) cut a quantization block (element {bad} is not a "
                f"multiple of blocksize {bs}). 4-bit rows can only be sliced or sharded on block boundaries: "
                f"use row counts that are multiples of {align} (blocksize / gcd(row length {k}, blocksize)); "
                f"{sharding}; or use a blocksize dividing {k}"
            )
        new_shape = (r1 - r0, *shape[1:])
        packed = self.packed[e0 // 2 : (e1 + 1) // 2]
        b0, b1 = e0 // bs, -(e1 // -bs)
        blocks = st.absmax.numel()
        if not st.nested:
            state = QuantState(
                absmax=st.absmax[b0:b1],
                shape=new_shape,
                code=st.code,
                blocksize=bs,
                quant_type=st.quant_type,
                dtype=st.dtype,
            )
            return Weight4bit(packed, state)
        nb = st.state2.blocksize
        if b0 % nb == 0 and (b1 % nb == 0 or b1 == blocks):
            state2 = QuantState(
                absmax=st.state2.absmax[b0 // nb : -(b1 // -nb)],
                code=st.state2.code,
                blocksize=nb,
                dtype=st.state2.dtype,
            )
            state = QuantState(
                absmax=st.absmax[b0:b1],
                shape=new_shape,
                code=st.code,
                blocksize=bs,
                quant_type=st.quant_type,
                dtype=st.dtype,
                offset=st.offset,
                state2=state2,
            )
            out = Weight4bit(packed, state)
            out._partial_nested = self._partial_nested or (r0, r1) != (0, rows)
            return out
        state = QuantState(
            absmax=fp32_absmax(st)[b0:b1].clone(),
            shape=new_shape,
            code=st.code,
            blocksize=bs,
            quant_type=st.quant_type,
            dtype=st.dtype,
        )
        out = Weight4bit(packed.clone(), state)
        out._not_a_view = True
        return out

    def _zeros(self, shape, device=None, dtype=None, same_format: bool = True) -> Weight4bit:
        """A zero weight of ``shape``. ``same_format=False`` (``new_zeros`` / ``new_empty`` of
        another size, the buffer FSDP2 copies a row shard into) keeps double quantization only
        when the new size holds whole nested blocks (a multiple of 256 quantization blocks):
        exactly when the shards that will be copied in are nested views (``_row_slice``);
        otherwise the statistics are fp32 absmax, which any shard can be copied into."""
        device = self.device if device is None else device
        dtype = self.dtype if dtype is None or dtype not in FLOAT_DTYPES else dtype
        st = self.quant_state
        nested = st.nested
        if nested and not same_format:
            blocks = -(math.prod(shape) // -st.blocksize)
            nested = blocks % st.state2.blocksize == 0
        packed, state = _zero_state(tuple(shape), st, device, dtype, nested)
        return Weight4bit(packed, state)

    def _copy_from(self, src) -> None:
        """In-place copy of another 4-bit weight of the same shape and quantization."""
        if isinstance(src, torch.Tensor) and not isinstance(src, Weight4bit) and src.dtype == torch.uint8:
            raise NotImplementedError(
                f"Weight4bit.copy_ got a plain uint8 tensor of shape {tuple(src.shape)}: packed 4-bit codes "
                "without their quantization statistics. torch.distributed.checkpoint.state_dict."
                "set_model_state_dict(..., broadcast_from_rank0=True) copies parameters only (a 4-bit "
                "layer's absmax and code keys never reach the other ranks), so qpeft cannot load through "
                "it: give every rank the full state dict (set_model_state_dict with full_state_dict=True "
                "and no broadcast_from_rank0, or model.load_state_dict), or use torch.distributed.checkpoint "
                "(docs/distributed.md, 'Checkpoints of a sharded model')"
            )
        if not isinstance(src, Weight4bit):
            raise NotImplementedError(
                f"Weight4bit.copy_ takes another Weight4bit, got a dense {type(src).__name__} "
                f"{getattr(src, 'dtype', '')}: quantize it explicitly (Weight4bit.from_float, or "
                "Linear4bit.requantize_ / load_state_dict, which quantize a floating-point weight)"
            )
        if self._not_a_view:
            raise NotImplementedError(
                "this Weight4bit is a row slice of a double-quantized weight across a nested block: a copy "
                "with fp32 absmax, so writing into it would not reach the source"
            )
        a, b = self.quant_state, src.quant_state
        if tuple(a.shape) != tuple(b.shape) or a.blocksize != b.blocksize or a.quant_type != b.quant_type:
            raise ValueError(
                f"Weight4bit.copy_: {src!r} does not match {self!r} (shape, blocksize, quant_type)"
            )
        if a.nested and not b.nested:
            raise NotImplementedError(
                "Weight4bit.copy_ into a double-quantized weight from one with fp32 absmax would need "
                "requantizing the statistics; copy into a weight without double quantization"
            )
        requantized = None
        if a.nested:
            if a.state2.absmax.shape != b.state2.absmax.shape or a.state2.blocksize != b.state2.blocksize:
                raise ValueError("Weight4bit.copy_: the nested statistics differ in size")
            if self._partial_nested and not _same_offset(a.offset, b.offset):
                # the nested codes are relative to the offset, which every row of the weight
                # shares (writing the source's would change the rows outside this slice): the
                # source's absmax is re-expressed against ours, requantized exactly as double
                # quantization does (``_requantize_nested``)
                requantized = _requantize_nested(fp32_absmax(b), a)
        self.packed.copy_(src.packed)
        if requantized is not None:
            a.absmax.copy_(requantized[0])
            a.state2.absmax.copy_(requantized[1])
        elif a.nested:
            a.absmax.copy_(b.absmax)
            a.state2.absmax.copy_(b.state2.absmax)  # the code tables are the format's, never written
            if not self._partial_nested:  # a partial view's offset is the whole weight's (and equal)
                a.offset.copy_(b.offset.reshape(a.offset.shape))
        else:
            a.absmax.copy_(fp32_absmax(b))  # bit-identical decode (fp32_absmax)
        # In-place ops inside __torch_dispatch__ run below autograd's ADInplaceOrView key, so
        # they bump no version counter: bump the written inner tensors' here, which the
        # layers' autograd nodes saved (Python and C++ alike), so that a backward after this
        # copy raises torch's "modified by an inplace operation" error, as nn.Linear's does,
        # instead of silently using the new weight.
        written = [self.packed, a.absmax]
        if a.nested:
            written += [a.state2.absmax, a.offset]
        torch.autograd.graph.increment_version(written)

    def _equal(self, other) -> bool:
        if not isinstance(other, Weight4bit):
            return False
        if self._meta() != other._meta():
            return False
        return all(torch.equal(x, y) for x, y in zip(self.inner_tensors(), other.inner_tensors()))

    # --- dispatch ---------------------------------------------------------------------------
    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, *args, **kwargs)
        if func.namespace == "qpeft":
            # qpeft ops take the packed bytes: a Weight4bit argument stands for them
            def unwrap(t):
                return t.packed if isinstance(t, Weight4bit) else t

            return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        hint = ""
        if func in _BUCKET_OPS:
            # DistributedDataParallel's construction broadcasts the parameters concatenated into
            # per-dtype buckets; a frozen 4-bit weight needs neither that nor an all-reduce
            hint = (
                ". If this came from DistributedDataParallel (its parameter broadcast concatenates "
                "parameters), have DDP ignore the frozen 4-bit weights: "
                "qpeft.weight4bit.ddp_ignore_4bit(module) on the module given to DDP (qpeft.convert does it for "
                "the model it returns; docs/distributed.md)"
            )
        raise NotImplementedError(
            f"Weight4bit does not support {func}: it holds 4-bit codes, and no op dequantizes it "
            "silently. Call .dequantize() for a dense tensor (docs/design.md, 'The 4-bit weight tensor')"
            + hint
        )

    # --- FSDP2 extension (docs/distributed.md, "The 4-bit weight under FSDP2") ----------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        world = mesh.size()
        rows = outer_size[0]
        if rows % world:
            raise NotImplementedError(
                f"FSDP2 would shard a Weight4bit of {rows} rows unevenly over {world} ranks (its padded "
                f"all-gather inputs must have the padded logical size, which packed 4-bit data cannot): "
                f"use a world size dividing {rows}, or exclude this module from fully_shard"
            )
        st = self.quant_state
        inputs = [self.packed.reshape(-1), st.absmax.reshape(-1)]
        if st.nested:
            inputs.append(st.state2.absmax.reshape(-1))
        # A shard group of one rank (one process, or HSDP with a shard dimension of 1): FSDP2
        # skips the all-gather and copies only the first input into the first output, so
        # the statistics would never reach fsdp_post_all_gather. This rank's shard is then
        # the whole weight: its statistics travel as metadata (references, no copy).
        local = tuple(inputs[1:]) if world == 1 else None
        meta = (
            self._meta(),
            st.code,
            st.state2.code if st.nested else None,
            st.offset if st.nested else None,
            local,
        )
        return tuple(inputs[:1] if world == 1 else inputs), meta

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        (shape, dtype, blocksize, quant_type, nested_bs, nested_dtype), code, nested_code, offset, local = (
            metadata
        )
        stats = all_gather_outputs[1:] if local is None else local
        dtype = param_dtype if param_dtype in FLOAT_DTYPES else dtype
        if out is not None:
            # the outputs were gathered again into the same storage our inner tensors view
            return None
        world = all_gather_outputs[0].numel() // ((math.prod(shape) + 1) // 2)
        full_shape = (shape[0] * world, *shape[1:])
        packed = all_gather_outputs[0].reshape(-1, 1)
        absmax = stats[0].reshape(-1)
        state2 = None
        if nested_bs is not None:
            state2 = QuantState(
                absmax=stats[1].reshape(-1),
                code=nested_code,
                blocksize=nested_bs,
                dtype=nested_dtype,
            )
        state = QuantState(
            absmax=absmax,
            shape=full_shape,
            code=code,
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )
        # the inner tensors alias the all-gather outputs, which FSDP frees and refills itself
        return Weight4bit(packed, state), ()


def _state_from(inner: dict, shape, dtype, meta) -> QuantState:
    _, _, blocksize, quant_type, nested_bs, nested_dtype = meta
    state2 = offset = None
    if nested_bs is not None:
        state2 = QuantState(
            absmax=inner["nested_absmax"], code=inner["nested_code"], blocksize=nested_bs, dtype=nested_dtype
        )
        offset = inner["offset"]
    return QuantState(
        absmax=inner["absmax"],
        shape=shape,
        code=inner["code"],
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=dtype,
        offset=offset,
        state2=state2,
    )


def _same_offset(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two double-quantization offsets are the same fp32 value (bit for bit); a meta
    offset (no value yet) is taken as the same."""
    if a.is_meta or b.is_meta:
        return True
    return torch.equal(
        a.reshape(-1).view(torch.int32), b.reshape(-1).to(a.device, torch.float32).view(torch.int32)
    )


def _requantize_nested(absmax: torch.Tensor, state: QuantState) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``absmax`` double-quantized against ``state``'s offset (not their own mean): the
    uint8 codes and nested absmax that ``quantize_4bit`` computes from ``absmax - offset``
    (``quantize_blockwise``, blocks of the state's nested blocksize). The 4-bit codes then
    decode to within that 8-bit rounding of the absmax, as after any double quantization."""
    from . import functional as qf

    offset = state.offset.reshape(()).to(torch.float32)
    codes, nested = qf.quantize_blockwise(
        absmax.to(offset.device) - offset, blocksize=state.state2.blocksize, code=state.state2.code
    )
    return codes, nested.absmax


def gather_full(weight) -> Weight4bit:
    """The whole Weight4bit of an FSDP2-sharded one (a DTensor whose local tensor is a
    Weight4bit shard), all-gathered the way FSDP2 gathers it (the packed bytes and the
    statistics). A collective: every rank of the weight's mesh must call it."""
    import torch.distributed as dist

    local = weight.to_local()
    if not isinstance(local, Weight4bit):
        raise TypeError(f"gather_full needs a DTensor over a Weight4bit shard, got {type(local).__name__}")
    mesh = weight.device_mesh
    world = mesh.size()
    inputs, meta = local.fsdp_pre_all_gather(mesh, weight.shape, weight.stride(), None, None)
    outputs = []
    for t in inputs:
        t = t.contiguous()
        out = t.new_empty(t.numel() * world)
        dist.all_gather_into_tensor(out, t, group=mesh.get_group())
        outputs.append(out)
    return local.fsdp_post_all_gather(tuple(outputs), meta, None)[0]


def ddp_ignore_4bit(model: torch.nn.Module) -> list[str]:
    """Mark every Weight4bit parameter of ``model`` for DistributedDataParallel to skip, and
    return their names. DDP broadcasts rank 0's parameters at construction through flat
    per-dtype buckets (``torch.cat`` of the parameters), which a 4-bit tensor cannot join
    without being made dense; the frozen 4-bit weights need neither that broadcast nor a
    gradient reduction when every rank quantizes or loads the same base (use
    :func:`broadcast_4bit` otherwise). ``qpeft.convert`` calls this on the model it converts;
    call it on the module you pass to DDP if that is another one (docs/distributed.md)."""
    names = [n for n, p in model.named_parameters() if isinstance(p, Weight4bit)]
    old = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    model._ddp_params_and_buffers_to_ignore = old + [n for n in names if n not in old]
    return names


def broadcast_4bit(model: torch.nn.Module, src: int = 0, group=None) -> None:
    """Copy rank ``src``'s 4-bit weights (codes and statistics, in place) to every rank of
    ``group``: DDP's initial parameter sync for the weights :func:`ddp_ignore_4bit` skips.
    The weights must have the same shapes and formats on every rank."""
    import torch.distributed as dist

    for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if isinstance(p, Weight4bit):
            for t in (p.packed, p.absmax, p.nested_absmax, p.offset):
                if t is not None:
                    dist.broadcast(t, src=src, group=group)


def _rebuild_weight4bit(
    inner: dict, meta: tuple, requires_grad: bool = False, is_param: bool = False
) -> Weight4bit:
    """Unpickle a Weight4bit (allow-listed for ``torch.load(weights_only=True)``)."""
    shape, dtype = meta[0], meta[1]
    w = Weight4bit(inner["packed"], _state_from(inner, shape, dtype, meta))
    if is_param:
        return torch.nn.Parameter(w, requires_grad=requires_grad)
    if requires_grad:
        w.requires_grad_(True)
    return w


# --- op handlers ------------------------------------------------------------------------------
def _alias(func, self, *args, **kwargs):
    out = Weight4bit(self.packed, self.quant_state)
    out._not_a_view, out._partial_nested = self._not_a_view, self._partial_nested
    return out


def _clone(func, self, *args, **kwargs):
    return self._map_inner(lambda t: t.clone())


def _to_copy(
    func, self, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False, memory_format=None
):
    out = self
    if device is not None and torch.device(device) != self.device:
        out = out._map_inner(lambda t: t.to(device, non_blocking=non_blocking))
    else:
        out = out._map_inner(lambda t: t.clone())
    if dtype is not None and dtype != out.dtype:
        if dtype == torch.float64:
            # module.double() (gradchecks): no 4-bit kernel dequantizes to fp64, and before the
            # weight was a tensor the packed buffer ignored dtype casts; it still does
            return out
        if dtype not in FLOAT_DTYPES:
            raise NotImplementedError(
                f"Weight4bit cannot become {dtype}: its dtype is the float dtype it dequantizes to "
                "(float32/float16/bfloat16); .dequantize() gives a dense tensor"
            )
        out = out._relabel(dtype=dtype)  # the codes and fp32 statistics are untouched
    if pin_memory:
        out = out._map_inner(lambda t: t.pin_memory())
    return out


def _view(func, self, size, *args, **kwargs):
    size = list(size)
    n = self.numel()
    if size.count(-1) == 1:
        rest = math.prod(s for s in size if s != -1)
        size[size.index(-1)] = n // rest if rest else 0
    if math.prod(size) != n:
        raise RuntimeError(f"Weight4bit: shape {size} is invalid for a tensor of {n} elements")
    # every shape of the same elements is the same row-major flat codes: a relabel
    return self._relabel(shape=tuple(size))


def _as_strided(func, self, size, stride, storage_offset=None):
    size = tuple(size)
    if (storage_offset or 0) == 0 and tuple(stride) == _contiguous_strides(size):
        if size == tuple(self.shape):
            return _alias(func, self)
        if len(size) == self.dim() and size[1:] == tuple(self.shape[1:]) and size[0] <= self.shape[0]:
            return self._row_slice(0, size[0])
    raise NotImplementedError(
        f"Weight4bit supports as_strided only as a contiguous row prefix of itself, got size {size}, "
        f"stride {tuple(stride)}, offset {storage_offset}"
    )


def _norm_dim(self, dim: int) -> int:
    d = dim + self.dim() if dim < 0 else dim
    if d != 0:
        raise NotImplementedError(
            f"Weight4bit slices only along dim 0 (rows of whole quantization blocks), got dim {dim}"
        )
    return d


def _slice(func, self, dim=0, start=None, end=None, step=1):
    _norm_dim(self, dim)
    if step != 1:
        raise NotImplementedError("Weight4bit row slices need step 1")
    r0, r1, _ = slice(start, end).indices(self.shape[0])
    return self._row_slice(r0, max(r0, r1))


def _split(func, self, split_size, dim=0):
    _norm_dim(self, dim)
    rows = self.shape[0]
    if rows == 0:
        return [self._row_slice(0, 0)]
    return [self._row_slice(r, min(r + split_size, rows)) for r in range(0, rows, split_size)]


def _split_with_sizes(func, self, split_sizes, dim=0):
    _norm_dim(self, dim)
    out, r = [], 0
    for s in split_sizes:
        out.append(self._row_slice(r, r + s))
        r += s
    return out


def _new_zeros(func, self, size, dtype=None, layout=None, device=None, pin_memory=None):
    return self._zeros(size, device, dtype, same_format=tuple(size) == tuple(self.shape))


def _empty_like(func, self, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return self._zeros(self.shape, device, dtype)


def _copy_(func, self, src, non_blocking=False):
    self._copy_from(src)
    return self


def _equal(func, self, other):
    return self._equal(other) if isinstance(self, Weight4bit) else False


def _is_pinned(func, self, device=None):
    return self.packed.is_pinned()


_HANDLERS = {
    aten.detach.default: _alias,
    aten.alias.default: _alias,
    aten.clone.default: _clone,
    aten._to_copy.default: _to_copy,
    aten.view.default: _view,
    aten._unsafe_view.default: _view,
    aten.reshape.default: _view,
    aten.as_strided.default: _as_strided,
    aten.slice.Tensor: _slice,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split_with_sizes,
    aten.new_zeros.default: _new_zeros,
    aten.new_empty.default: _new_zeros,
    aten.empty_like.default: _empty_like,
    aten.zeros_like.default: _empty_like,
    aten.copy_.default: _copy_,
    aten.equal.default: _equal,
    aten.is_pinned.default: _is_pinned,
}

torch.serialization.add_safe_globals([_rebuild_weight4bit])
