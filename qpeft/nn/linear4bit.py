"""Linear4bit: a frozen linear layer whose weight is stored 4-bit (NF4/FP4, bitsandbytes layout).

The weight is the parameter ``weight``, a :class:`qpeft.Weight4bit` (logical shape [out, in],
dtype the one it dequantizes to, ``requires_grad=False``) holding the packed codes
(``weight.packed``, uint8 [(out * in + 1) // 2, 1]) and their decoding state
(``weight.quant_state``, a :class:`qpeft.QuantState`; ``layer.quant_state`` is the same
object). As a parameter it moves with the module, deep-copies, pickles, compiles and is
sharded by FSDP2 in its 4-bit form (docs/design.md, "The 4-bit weight tensor";
docs/distributed.md). The state dict still carries the bitsandbytes keys
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__<type>``, ``bias``), so a
``bitsandbytes.nn.Linear4bit`` state dict loads here and this one loads there (through
``Params4bit.from_prequantized``, the way transformers loads 4-bit checkpoints).

The forward is ``qpeft.functional.linear_4bit``: at M <= 8 rows (decoding) the GEMV
``qpeft::gemv_4bit``, which reads the packed weight once; otherwise the fused op
``qpeft::qlora_linear`` without an adapter (its LoRA terms skipped, not computed as
zeros), which dequantizes W tile by tile. The backward recomputes from the packed
weight, so neither pass keeps a dequantized copy of W alive (a
``F.linear(x, dequantize(W))`` would save the full W for the backward of every layer).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import functional as qf
from .._formats import (
    ABSMAX_FLOOR,
    BLOCKSIZES_4BIT,
    FLOAT_DTYPES,
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    code4,
    zero_code4,
)
from ..autograd import autocast_enabled, layer_module, linear_call, linear_plan
from ..quant_state import QuantState
from ..weight4bit import Weight4bit, _contiguous_strides, gather_full

_is_compiling = torch.compiler.is_compiling

__all__ = ["Linear4bit"]

_PACKED_PREFIX = "quant_state.bitsandbytes__"


def _check_quant_args(quant_type: str, blocksize: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT}, got {blocksize!r}")


def _empty_state(
    shape: tuple[int, int], blocksize: int, quant_type: str, double_quant: bool, device, dtype: torch.dtype
) -> tuple[torch.Tensor, QuantState]:
    """What quantize_4bit returns for an all-zero tensor, built without the dense tensor: every
    nibble is the code of 0.0 and every absmax 0, except a partial last block's, which is stored
    floored to ABSMAX_FLOOR as bitsandbytes does; double quantization runs on that (small)
    absmax vector exactly as quantize_4bit does (tests/test_serialization_defects.py holds this
    to quantize_4bit bit for bit)."""
    device = torch.empty(0, device=device).device  # None: torch's default device, as torch.zeros does
    n = math.prod(shape)
    z = zero_code4(quant_type)
    packed = torch.full(((n + 1) // 2, 1), z << 4 | z, dtype=torch.uint8, device=device)
    blocks = -(n // -blocksize)
    absmax = torch.zeros(blocks, dtype=torch.float32, device=device)
    if n % blocksize:
        absmax[-1] = ABSMAX_FLOOR
    state = QuantState(
        absmax=absmax,
        shape=shape,
        code=code4(quant_type, device).clone(),
        blocksize=blocksize,
        quant_type=quant_type,
        dtype=dtype,
    )
    if double_quant:
        state.offset = absmax.mean()
        state.absmax, state.state2 = qf.quantize_blockwise(absmax - state.offset, blocksize=NESTED_BLOCKSIZE)
    return packed, state


def result_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear layer returns for x: autocast's inside an autocast region, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if autocast_enabled(dev) else x.dtype


def refuse_jit_script(module: nn.Module):
    """``__prepare_scriptable__`` of qpeft's layers (torch.jit.script calls it on a module and
    its submodules first): TorchScript cannot compile them (a tensor subclass weight, an
    autograd.Function, Python-level dispatch), and failed deep inside with "Unknown type
    annotation" or a hasattr message."""
    raise RuntimeError(
        f"torch.jit.script cannot compile qpeft's {type(module).__name__} (its 4-bit weight is a tensor "
        "subclass and its autograd a Python autograd.Function): use torch.compile or torch.export, or "
        "torch.jit.trace (under torch.no_grad() its graph holds the qpeft ops and torch.jit.save keeps it; "
        "docs/design.md, 'torch.func, torch.jit.trace, TorchScript')"
    )


class Linear4bit(nn.Module):
    """y = x @ dequant(W)^T + bias with W frozen in 4 bits.

    Build one with :meth:`from_linear` (quantizes an ``nn.Linear``), or construct it
    empty and ``load_state_dict`` a bitsandbytes / qpeft 4-bit state dict (or a plain
    ``nn.Linear`` state dict, which is quantized on load). ``compute_dtype``: when set,
    x is cast to it for the matmul and the result cast back to x's dtype (as
    bitsandbytes does); None computes in x's dtype. On CPU the kernels accumulate in
    fp32 whatever the dtype. Inside an autocast region autocast's dtype wins, as for
    ``F.linear``: x computes in it and y comes out in it, with or without
    ``compute_dtype``, in eval and in training (every adapter layer over this base
    returns the same dtype).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        compress_statistics: bool | None = None,
        quant_storage: torch.dtype = torch.uint8,
    ) -> None:
        """``compress_statistics`` and ``quant_storage`` are bitsandbytes' names:
        ``compress_statistics`` is ``double_quant`` (give one of them); qpeft stores the codes
        as uint8 (bitsandbytes checkpoints packed in another ``quant_storage`` dtype load,
        their bytes read as uint8). Unlike bitsandbytes (fp4) the default format is nf4."""
        super().__init__()
        if compress_statistics is not None:
            if not double_quant and compress_statistics:  # both given, disagreeing
                raise ValueError(
                    "double_quant=False and compress_statistics=True (its bitsandbytes name) disagree"
                )
            double_quant = bool(compress_statistics)
        if quant_storage != torch.uint8:
            raise ValueError(
                f"quant_storage={quant_storage}: qpeft keeps the 4-bit codes as uint8 (checkpoints packed "
                "in other storage dtypes load as their bytes); leave it at torch.uint8"
            )
        for what, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{what} must be an int, got {type(v).__name__} {v!r}")
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        _check_quant_args(quant_type, blocksize)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be float32, float16 or bfloat16 (the weight's dtype), got {dtype}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        # An all-zero weight until from_linear / load_state_dict fills it, built directly in its
        # 4-bit form: quantizing a dense zero tensor would peak at 8x the layer's size in fp32.
        packed, state = _empty_state(
            (self.out_features, self.in_features),
            blocksize,
            quant_type,
            double_quant,
            device,
            dtype or torch.float32,
        )
        self.weight = nn.Parameter(Weight4bit(packed, state), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(
                torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False
            )
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> Linear4bit:
        """Quantize ``linear``'s weight (on its device; an fp64 weight is rounded to fp32 first,
        as the quantizer works in fp32); the bias is copied and frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Linear4bit.from_linear needs a torch.nn.Linear, got {type(linear).__name__}")
        _check_quant_args(quant_type, blocksize)
        w = linear.weight.detach()
        if w.dtype == torch.float64:
            w = w.float()
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype
        if w.device.type != "meta" and not bool(torch.isfinite(w).all()):
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(
                f"the weight holds {bad} non-finite value(s) (NaN or Inf): a 4-bit layer of it would "
                "output non-finite values. Repair the weight (e.g. torch.nan_to_num_) or leave this "
                "layer unconverted (convert(..., exclude=...)); qpeft.functional.quantize_4bit(..., "
                "allow_nonfinite=True) quantizes such a tensor as bitsandbytes does"
            )
        packed, state = qf.quantize_4bit(w, blocksize, quant_type, double_quant)
        self.weight = nn.Parameter(Weight4bit(packed, state), requires_grad=False)
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        return self

    # --- the 4-bit weight ------------------------------------------------------------------
    @property
    def quant_state(self) -> QuantState:
        """The weight's decoding state (``self.weight.quant_state``)."""
        weight = self.weight
        if _is_sharded_4bit(weight):
            # not an AttributeError: nn.Module.__getattr__ would hide it behind "no attribute"
            raise RuntimeError(
                "this Linear4bit is sharded by FSDP2: its weight is a DTensor over this rank's rows, and the "
                "whole layer's quant_state exists only while FSDP2 has it gathered (forward/backward, or "
                "after module.unshard()); weight.to_local().quant_state is this rank's shard's"
            )
        return weight.quant_state

    @quant_state.setter
    def quant_state(self, state: QuantState) -> None:
        self.weight = nn.Parameter(Weight4bit(self.weight.packed, state), requires_grad=False)

    def __setattr__(self, name, value):
        if name == "weight" and isinstance(value, torch.Tensor) and not isinstance(value, Weight4bit):
            if value.dtype == torch.uint8 and "weight" in self._parameters:
                # ``layer.weight = packed`` (plain uint8 codes, as bitsandbytes-style code
                # assigns) keeps working: the codes are wrapped with the current state
                value = nn.Parameter(Weight4bit(value, self.quant_state), requires_grad=False)
            elif not isinstance(getattr(value, "to_local", lambda: None)(), Weight4bit):  # FSDP2's DTensor
                raise TypeError(
                    f"{type(self).__name__}.weight must be a qpeft.Weight4bit (or its packed uint8 codes), got "
                    f"a {value.dtype} {type(value).__name__}: a dense weight is quantized by requantize_() "
                    "or load_state_dict(), never on assignment (a weight tied to another module's, as "
                    "model.tie_weights() ties an output layer to the input embedding, cannot be shared "
                    "with a 4-bit layer: leave that layer out of qpeft.convert)"
                )
        super().__setattr__(name, value)

    # --- compute -------------------------------------------------------------------------
    __prepare_scriptable__ = refuse_jit_script

    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            got = f"{x.shape[-1]} features" if x.dim() else "no feature dimension (a 0-d tensor)"
            raise ValueError(
                f"{type(self).__name__}(in_features={self.in_features}, out_features={self.out_features}) got an "
                f"input with {got} (shape {tuple(x.shape)})"
            )

    def qlora(
        self,
        x: torch.Tensor,
        lora_A: torch.Tensor | None = None,
        lora_B: torch.Tensor | None = None,
        scaling: float = 0.0,
        *,
        bias: bool = True,
        out_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out_scale * (x @ W^T + bias + scaling * x @ A^T @ B^T)`` through the fused op.
        Without an adapter and out_scale: ``qpeft.functional.linear_4bit`` (the GEMV at
        M <= 8 rows); without an adapter but with out_scale, the fused op with its LoRA
        terms skipped. ``bias=False`` leaves the bias out."""
        self.check_input(x)
        out_dtype = result_dtype(x)
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        b = self.bias if bias else None
        w = self.weight
        if lora_A is None and lora_B is None and out_scale is None:
            y = qf.linear_4bit(x, w.packed, w.quant_state, b)
        else:
            y = qf.qlora_linear(x, w.packed, w.quant_state, lora_A, lora_B, scaling, b, out_scale=out_scale)
        # y is in x's dtype (autocast's inside an autocast region); compute_dtype casts back to
        # the dtype every path returns (result_dtype: autocast's there too, as F.linear's)
        return y.to(out_dtype) if self.compute_dtype is not None and y.dtype != out_dtype else y

    # The fast path (docs/design.md, "Per-call overhead"): a plan for qpeft._C_layer's
    # linear_call, built after a call the full path served; it serves inference calls of
    # at most GEMV_MAX_ROWS rows (the GEMV), everything else takes the full path.
    _fast_plan: tuple | None = None

    def __getstate__(self) -> dict:
        # a plan belongs to this process and this object (it names the layer by id): a
        # copy or a pickle (torch.save of the module, torch.multiprocessing) plans anew
        state = self.__dict__.copy()
        state.pop("_fast_plan", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = self._fast_plan
        if plan is not None and not _is_compiling():
            y = linear_call(plan, self, x)
            if y is not None:
                if y is not NotImplemented:
                    return y
                self.__dict__["_fast_plan"] = plan = None  # stale: something it holds changed
        y = self.qlora(x)
        if plan is None and type(self) is Linear4bit and not _is_compiling():
            self._plan_fast_path()
        return y

    def _plan_fast_path(self) -> None:
        """After the full path served a call: the plan for ``qpeft._C_layer.linear_call``
        (``autograd.linear_plan``), guarded by every attribute the call read (the weight,
        its codes and state, the bias, compute_dtype), so that replacing any of them makes
        the next call take the full path and re-plan."""
        d, params = self.__dict__, self._parameters
        if d.get("compute_dtype") not in (None, torch.float32) or layer_module() is None:
            return
        weight = params.get("weight")
        if not isinstance(weight, Weight4bit):
            return
        w_d = weight.__dict__
        state = w_d.get("quant_state")
        if state is None:
            return
        guards = (
            *(None, "compute_dtype", d.get("compute_dtype")),
            *(params, "weight", weight),
            *(weight, "packed", w_d.get("packed")),
            *(weight, "quant_state", state),
            *(params, "bias", params.get("bias")),
        )
        self.__dict__["_fast_plan"] = linear_plan(self, guards, w_d.get("packed"), state, params.get("bias"))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight [out, in] (default: the dtype it was quantized from)."""
        return qf.dequantize_4bit(self.weight.packed, self.quant_state, dtype)

    def requantize_(self, weight: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Replace the stored weight by the quantization of ``weight`` [out, in] (same settings);
        ``dtype``: the dtype it dequantizes to (default ``weight``'s)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight must be [{self.out_features}, {self.in_features}], got {tuple(weight.shape)}"
            )
        packed, state = qf.quantize_4bit(weight, self.blocksize, self.quant_type, self.double_quant)
        if dtype is not None:
            state.dtype = dtype
        self.weight = nn.Parameter(Weight4bit(packed, state), requires_grad=False)

    def weight_bytes(self) -> int:
        """Bytes of the stored weight: packed codes plus quantization statistics."""
        return self.weight.storage_bytes()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}"
        )

    # --- state dict in the bitsandbytes layout ----------------------------------------------
    # (.to(device) / .cpu() / .half() need nothing here: the Weight4bit parameter moves its
    # codes and statistics together, and a dtype cast only relabels the dtype it dequantizes
    # to, never the codes or the fp32 statistics.)
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self.weight
        if isinstance(weight, Weight4bit):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            destination[prefix + "weight"] = weight.packed if keep_vars else weight.packed.detach()
            for k, v in weight.quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()
            return
        if not _is_sharded_4bit(weight):
            raise TypeError(f"{prefix}weight is a {type(weight).__name__}, not a qpeft.Weight4bit")
        # sharded (FSDP2: a DTensor over a Weight4bit shard): the bitsandbytes keys, with the
        # per-row tensors (codes, absmax, nested absmax) as DTensors over this rank's shard of
        # them, as FSDP2 gives every parameter; the rest (code tables, the packed JSON with the
        # whole shape) is the same on every rank. No collective; full_tensor() (or
        # get_model_state_dict(full_state_dict=True)) gives the unsharded layout.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in _sharded_state_entries(weight).items():
            destination[prefix + k] = v if keep_vars else v.detach()

    # torch.distributed.checkpoint.state_dict resolves every state-dict key as an attribute
    # path; under FSDP2 ``self.weight`` is a DTensor, which has no ``absmax`` / ``quant_state``,
    # so its "weight" segment is resolved on _dcp_weight_owner (its ``weight`` is the local
    # Weight4bit). The hook only redirects the lookup: the key and its FQN stay the same.
    def _fqn_modifiers(self) -> dict[str, str]:
        return {"weight": "_dcp_weight_owner"}

    @property
    def _dcp_weight_owner(self):
        weight = self.weight
        return _WeightOwner(weight.to_local() if _is_sharded_4bit(weight) else weight)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        w_key = prefix + "weight"
        quant_keys = [k for k in state_dict if k.startswith(w_key + ".")]
        if w_key in state_dict:
            # DTensor entries (a sharded state dict: FSDP2's, or torch.distributed.checkpoint
            # loaded into one) are gathered, one layer at a time (a collective: every rank loads)
            weight = _full_value(state_dict[w_key])
            quant = {k[len(prefix) :]: _full_value(state_dict[k]) for k in quant_keys}
            try:
                if _is_sharded_4bit(self.weight):
                    self._load_sharded(weight, quant, prefix)
                else:
                    self._load_weight(weight, quant, prefix)
            except (ValueError, TypeError) as exc:
                # the bias is left alone too: a layer is loaded whole or not at all
                error_msgs.append(f"While loading {w_key}: {exc}")
                return
        elif strict:
            missing_keys.append(w_key)
        # The weight is handled above; let nn.Module load the bias (and report its keys).
        # Sharded (FSDP2), a whole bias tensor is copied here into this rank's rows: nn.Module
        # would refuse to copy a plain tensor into the DTensor (a DTensor it loads itself).
        params = self._parameters
        b_key, bias = prefix + "bias", params.get("bias")
        whole_bias = state_dict.get(b_key) if hasattr(bias, "_local_tensor") else None
        if not isinstance(whole_bias, torch.Tensor) or hasattr(whole_bias, "_local_tensor"):
            whole_bias = None
        elif tuple(whole_bias.shape) != tuple(bias.shape):
            error_msgs.append(
                f"size mismatch for {b_key}: copying a param with shape {tuple(whole_bias.shape)} from "
                f"checkpoint, the shape in current model is {tuple(bias.shape)}."
            )
        else:
            r0, r1 = _shard_row_range(bias, b_key)
            with torch.no_grad():
                bias._local_tensor.copy_(whole_bias[r0:r1])
        order = list(params)
        popped = {k: params.pop(k) for k in ("weight", "bias") if k == "weight" or whole_bias is not None}
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            # back in its place: parameters() and state_dict() keep their order after a load
            params.update(popped)
            ordered = {k: params[k] for k in order if k in params} | params
            params.clear()
            params.update(ordered)
        # handled here: the statistics, the weight, and a sharded layer's bias copied above (a
        # bias in the checkpoint of a layer without one stays unexpected, as nn.Linear has it)
        skip = set(quant_keys) | {w_key} | ({b_key} if whole_bias is not None else set())
        unexpected_keys[:] = [k for k in unexpected_keys if k not in skip]

    def prepare_weight(
        self, weight: torch.Tensor, quant: dict[str, torch.Tensor], prefix: str = ""
    ) -> tuple[torch.Tensor, QuantState]:
        """Check a checkpoint's weight for this layer and return ``(packed, state)`` without
        changing the layer. ``quant``: the quantization entries keyed ``weight.absmax``,
        ``weight.quant_state.bitsandbytes__nf4``... (empty for a floating-point weight, which
        is quantized). ``prefix`` (the layer's state-dict prefix) is used in error messages.
        Raises ValueError/TypeError naming the key."""
        shape = (self.out_features, self.in_features)
        device = self.weight.device
        w_key = prefix + "weight"
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"{w_key} must be a tensor, got {type(weight).__name__}")
        if device.type == "meta":
            # a layer built on the meta device takes the checkpoint's tensors where they are
            # (what load_state_dict(assign=True) does for a plain parameter; copying into a
            # meta tensor would leave the layer without data)
            device = weight.device
        if isinstance(weight, Weight4bit):  # a qpeft layer's parameter (state_dict(keep_vars)...)
            weight = weight.packed
        if not quant:
            if not weight.is_floating_point() or tuple(weight.shape) != shape:
                raise ValueError(
                    f"expected a 4-bit {w_key} with its quantization state ({w_key}.absmax, "
                    f"{w_key}.quant_state...) or a floating-point {w_key} of shape {shape}, got "
                    f"{weight.dtype} {tuple(weight.shape)} without quantization state"
                )
            return qf.quantize_4bit(weight.to(device), self.blocksize, self.quant_type, self.double_quant)
        state = QuantState.from_dict(quant, device=device, strict=True, key_prefix=prefix)
        if state.quant_type is None:
            raise ValueError(f"{w_key} has an 8-bit state (no quant_type); Linear4bit holds 4-bit weights")
        if tuple(state.shape) != shape:
            raise ValueError(
                f"the checkpoint's 4-bit {w_key} has shape {tuple(state.shape)} but this layer is {shape}"
            )
        if weight.dtype == torch.bool or weight.is_complex():
            # a bool tensor's bytes are not codes (any nonzero byte may read as True and back as 1)
            raise TypeError(f"{w_key} is a {weight.dtype} tensor; packed 4-bit codes are stored as uint8")
        packed = weight.detach().to(device)
        if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage: the same bytes in another dtype
            packed = packed.contiguous().view(torch.uint8)
        n = math.prod(shape)
        if packed.numel() != (n + 1) // 2:
            raise ValueError(f"{w_key} has {packed.numel()} bytes but a {shape} weight needs {(n + 1) // 2}")
        return packed.reshape(-1, 1).clone(), state

    def commit_weight(self, packed: torch.Tensor, state: QuantState) -> None:
        """Install what :meth:`prepare_weight` returned (cannot fail)."""
        self.weight = nn.Parameter(Weight4bit(packed, state), requires_grad=False)
        self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.nested

    def _load_weight(self, weight: torch.Tensor, quant: dict[str, torch.Tensor], prefix: str = "") -> None:
        self.commit_weight(*self.prepare_weight(weight, quant, prefix))

    def _load_sharded(self, weight: torch.Tensor, quant: dict[str, torch.Tensor], prefix: str = "") -> None:
        """Load a whole checkpoint weight into an FSDP2-sharded layer: quantize or check it as
        :meth:`prepare_weight` does, then copy this rank's rows into the local shard in place.
        The parameter (the DTensor FSDP2 registered) and its local shard stay the same objects:
        FSDP2's all-gather buffers are sized for the shard's format, so the checkpoint must be
        in the layer's format (quant type, blocksize; double quantization if the shard has it)."""
        packed, state = self.prepare_weight(weight, quant, prefix)
        param = self.weight
        local = param._local_tensor
        st = local.quant_state
        if (state.quant_type, state.blocksize) != (st.quant_type, st.blocksize):
            raise ValueError(
                f"the checkpoint's {prefix}weight is {state.quant_type} with blocksize {state.blocksize}, but this "
                f"layer, sharded by FSDP2, is {st.quant_type} with blocksize {st.blocksize}: a sharded layer loads "
                "its own format in place; load the checkpoint before fully_shard, or convert with its format"
            )
        r0, r1 = _shard_row_range(param, prefix + "weight")
        src = Weight4bit(packed, state)._row_slice(r0, r1)
        if st.nested and not src.nested:
            raise ValueError(
                f"the checkpoint's {prefix}weight has no double quantization, but this layer's FSDP2 shards "
                "keep nested statistics: load it before fully_shard, or convert with double_quant=False"
            )
        with torch.no_grad():
            local.copy_(src)


class _WeightOwner:
    """What ``Linear4bit._fqn_modifiers`` points the "weight" segment of a state-dict key at:
    an object whose ``weight`` is the (local) Weight4bit, on which every bitsandbytes key resolves."""

    __slots__ = ("weight",)

    def __init__(self, weight) -> None:
        self.weight = weight


def _is_sharded_4bit(t) -> bool:
    """Whether ``t`` is FSDP2's sharded 4-bit weight: a DTensor over a Weight4bit shard."""
    return not isinstance(t, Weight4bit) and isinstance(getattr(t, "_local_tensor", None), Weight4bit)


def _full_value(t):
    """The whole tensor of a state-dict entry: a DTensor gathered (a collective), else ``t``."""
    local = getattr(t, "_local_tensor", None) if not isinstance(t, Weight4bit) else None
    if local is None:
        return t
    if isinstance(local, Weight4bit):
        return gather_full(t)
    return t.full_tensor()


def _shard_row_range(param, key: str) -> tuple[int, int]:
    """The rows [r0, r1) of the whole tensor that this rank's shard of ``param`` (FSDP2's
    DTensor, named ``key``) holds."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if tuple(shape[1:]) != tuple(param.shape[1:]):
        raise ValueError(
            f"{key} is sharded with placements {tuple(param.placements)}; Linear4bit loads tensors sharded "
            "by rows only (fully_shard's default Shard(0))"
        )
    return int(offset[0]), int(offset[0]) + int(shape[0])


def _sharded_state_entries(weight) -> dict[str, torch.Tensor]:
    """The bitsandbytes state-dict entries (keys relative to the layer) of an FSDP2-sharded
    weight: ``weight`` (the packed codes), ``weight.absmax`` and ``weight.nested_absmax`` as
    DTensors with the parameter's mesh and placements over this rank's tensors (rows of the
    weight are contiguous runs of all three, so a row shard is a shard of each), and the code
    tables and the packed JSON (with the whole shape and the offset) as plain tensors."""
    from torch.distributed.tensor import DTensor

    local = weight._local_tensor
    rows, local_rows = weight.shape[0], local.shape[0]
    if local_rows == 0 or rows % local_rows:
        raise NotImplementedError(
            f"a Weight4bit of {rows} rows sharded unevenly ({local_rows} rows here) has no state dict: "
            f"use a world size dividing {rows}, or exclude this module from fully_shard"
        )
    shards = rows // local_rows
    st = local.quant_state
    whole = QuantState(
        absmax=st.absmax,
        shape=tuple(weight.shape),
        code=st.code,
        blocksize=st.blocksize,
        quant_type=st.quant_type,
        dtype=st.dtype,
        offset=st.offset,
        state2=st.state2,
    )
    entries = {"weight": local.packed}
    entries.update({"weight." + k: v for k, v in whole.as_dict(packed=True).items()})
    for key in ("weight", "weight.absmax", "weight.nested_absmax"):
        if key in entries:
            t = entries[key]
            shape = (t.shape[0] * shards, *t.shape[1:])
            entries[key] = DTensor.from_local(
                t,
                weight.device_mesh,
                weight.placements,
                run_check=False,
                shape=shape,
                stride=_contiguous_strides(shape),
            )
    return entries
