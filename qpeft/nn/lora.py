"""QLoRALinear: a drop-in for ``nn.Linear`` with a frozen (4-bit or 16-bit) base and LoRA adapters.

Forward paths (s = alpha / r, or alpha / sqrt(r) with rsLoRA; x: [..., in]):

- LoRA, no dropout (or eval): one fused op, ``y = x W^T + bias + s (x A^T) B^T``
  (``qpeft.functional.qlora_linear``: W dequantized tile by tile, never kept).
- LoRA with dropout p > 0 in training: PEFT drops the LoRA branch's input only, so the
  fused op (one x for both terms) cannot serve. The base term goes through the fused op
  with a zero adapter (``Linear4bit.forward``), the LoRA term ``s B(A(dropout(x)))`` is two
  rank-r matmuls in torch (2*M*r*(K+N) flops: 0.4% of the base product at r=8, K=N=4096).
- DoRA (Liu et al. 2024, as PEFT computes it): ``y = (m / ||W + s B A||_row) * (x W^T +
  s x A^T B^T) + bias`` with the norm detached; the bracket is the fused op without bias,
  and the per-row scale multiplies it in torch so the magnitude m gets its gradient.
  With dropout in training PEFT's form is kept: ``base(x) + (m/n - 1) * dropout(x) W^T +
  (m/n) * s * B A dropout(x)``. The row norms are recomputed (chunked over rows, no full
  dequantized copy: ``weight_rows.row_norms``) on every forward, as PEFT does.
- 16-bit base (``quantize=False``): the same with ``F.linear`` on the dense weight (on CPU
  in fp32: torch's bf16 GEMM is about 5x slower than fp32 on this class of CPU).

Adapters are named; ``set_adapter(name)`` picks the active one (only it is trainable),
``disable_adapters()`` gives exactly the base layer's output.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import _LORA_FLOATS
from ..autograd import layer_call, layer_module, small_layer_plan
from ..weight4bit import Weight4bit
from .linear4bit import Linear4bit, refuse_jit_script, result_dtype
from .weight_rows import row_norms


def _is_dtensor(t) -> bool:
    from ..optim.distributed import is_dtensor

    return is_dtensor(t)


__all__ = ["LoRAAdapter", "MergeReport", "QLoRALinear"]

INITS = ("default", "gaussian")

_is_compiling = torch.compiler.is_compiling


def check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    return r


def check_alpha(alpha) -> float:
    # Checked where the user passes it (QLoRALinear, add_adapter, convert): a string would
    # otherwise fail deep inside as "unsupported operand type(s) for /", and a bool is a
    # flag passed in the wrong place, not a scale.
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise TypeError(f"LoRA alpha must be a finite real number, got {alpha!r}")
    return alpha


def check_dropout(dropout) -> float:
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    return dropout


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def dense_linear(layer: nn.Linear, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """F.linear of a 16-bit/fp32 base; on CPU 16-bit weights compute in fp32 (see module doc)."""
    w = layer.weight
    dt = torch.promote_types(x.dtype, w.dtype)
    if (
        x.device.type == "cpu"
        and dt in (torch.float16, torch.bfloat16)
        and not torch.is_autocast_enabled("cpu")
    ):
        dt = torch.float32
    b = layer.bias if bias else None
    return F.linear(x.to(dt), w.to(dt), None if b is None else b.to(dt))


def check_dense_input(layer: nn.Module, x) -> None:
    """x of an adapter layer over a 16-bit base: a floating-point tensor, as a 4-bit base
    requires (``_checks``); ``dense_linear`` would otherwise cast an integer, bool or complex
    x's result back to that dtype (truncated) and a list fail on ``x.dim()``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{type(layer).__name__} expects a tensor, got {type(x).__name__}")
    if x.dtype not in _LORA_FLOATS:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")


def set_base_attr(layer: nn.Module, name: str, value) -> bool:
    """``layer.weight = value`` / ``layer.bias = value`` on an adapter layer (QLoRALinear,
    IA3Linear) assigns its base layer's (``model.tie_weights()`` sets ``lm_head.weight``),
    where Linear4bit refuses a dense weight with a TypeError; nn.Module's own __setattr__
    raised a bare KeyError ("attribute 'weight' already exists") for a Parameter, the
    property being there. True when handled."""
    if name not in ("weight", "bias") or "base_layer" not in layer._modules:
        return False
    try:
        setattr(layer.base_layer, name, value)
    except TypeError as exc:
        raise TypeError(f"{type(layer).__name__}.{name} is its base layer's: {exc}") from None
    return True


class LoRAAdapter(nn.Module):
    """One adapter's parameters: ``lora_A`` [r, in], ``lora_B`` [out, r] (fp32 by default,
    as PEFT keeps adapters over 4-bit bases), optional DoRA ``magnitude`` [out]."""

    # PEFT's bias setting of an adapter load_adapter loaded ("lora_only", "all"): while it is
    # active the layer's bias trains (as under PEFT), and save_adapter writes the biases
    bias: str = "none"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        init: str = "default",
        use_rslora: bool = False,
        use_dora: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_rank(r)
        check_alpha(alpha)
        check_dropout(dropout)
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        if init == "default":  # PEFT's (and nn.Linear's) Kaiming-uniform with a = sqrt(5)
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:  # "gaussian": PEFT's N(0, 1/r)
            nn.init.normal_(self.lora_A, std=1.0 / r)
        self.magnitude = None
        if use_dora:
            self.magnitude = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    def delta(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """s * B(A(dropout(x))) in the adapter's dtype."""
        if dropout:
            x = self.dropout(x)
        x = x.to(self.lora_A.dtype)
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        extra = (", rslora" if self.use_rslora else "") + (", dora" if self.use_dora else "")
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout_p}{extra}"


@dataclass
class MergeReport:
    """Error that requantizing a merged (or unmerged) weight into 4 bits added, measured
    against the exact fp32 result of the merge: ``rms`` and ``max_abs`` of the difference,
    ``relative`` = ||difference||_F / ||exact||_F. Zero for 16-bit bases merged in place
    (their rounding to the weight dtype is not reported)."""

    rms: float
    max_abs: float
    relative: float


class QLoRALinear(nn.Module):
    """y = base(x) + s * B A x: a frozen base layer (``qpeft.nn.Linear4bit``, or an
    ``nn.Linear`` with ``quantize=False``) plus named LoRA adapters. See the module doc."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        init: str = "default",
        use_rslora: bool = False,
        use_dora: bool = False,
        train_bias: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, Linear4bit)):
            raise TypeError(
                f"QLoRALinear wraps nn.Linear or qpeft.nn.Linear4bit, got {type(base_layer).__name__}"
            )
        if train_bias and base_layer.bias is None:
            raise ValueError("train_bias=True (BitFit) needs a layer with a bias; this one has none")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.train_bias = train_bias
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.adapters_enabled = True
        self.merged_adapter: str | None = None
        self.merge_report: MergeReport | None = None
        self._merge_cache: dict = {}
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, r, alpha, dropout, init, use_rslora, use_dora)
        self.set_adapter(adapter_name)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        quantize: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        init: str = "default",
        use_rslora: bool = False,
        use_dora: bool = False,
        train_bias: bool = False,
        *,
        adapter_name: str = "default",
        compute_dtype: torch.dtype | None = None,
    ) -> QLoRALinear:
        """Wrap ``linear``: quantize its weight to 4 bits (``quantize=True``) or keep it
        (plain LoRA over a 16-bit base), and add adapter ``adapter_name``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QLoRALinear.from_linear needs a torch.nn.Linear, got {type(linear).__name__}")
        check_rank(r)
        check_alpha(alpha)  # before the (slow) quantization, not after it
        check_dropout(dropout)
        if train_bias and linear.bias is None:
            raise ValueError("train_bias=True (BitFit) needs a layer with a bias; this one has none")
        base = (
            Linear4bit.from_linear(linear, quant_type, blocksize, double_quant, compute_dtype)
            if quantize
            else linear
        )
        return cls(base, adapter_name, r, alpha, dropout, init, use_rslora, use_dora, train_bias)

    # --- adapters ---------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return isinstance(self.base_layer, Linear4bit)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (a :class:`qpeft.Weight4bit` for a 4-bit base: ``.packed`` holds
        the uint8 codes bitsandbytes' weight holds)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    __prepare_scriptable__ = refuse_jit_script

    def __setattr__(self, name, value):
        if not set_base_attr(self, name, value):
            super().__setattr__(name, value)

    def _adapter(self, name: str | None = None) -> LoRAAdapter:
        name = self.active_adapter if name is None else name
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} on this layer (adapters: {list(self.adapters)})")
        return self.adapters[name]

    @property
    def lora_A(self) -> nn.Parameter:
        """The active adapter's A [r, in_features]."""
        return self._adapter().lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        """The active adapter's B [out_features, r]."""
        return self._adapter().lora_B

    @property
    def scaling(self) -> float:
        return self._adapter().scaling

    def add_adapter(
        self,
        name: str,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        init: str = "default",
        use_rslora: bool = False,
        use_dora: bool = False,
    ) -> LoRAAdapter:
        """Add a new adapter (not activated: call ``set_adapter``). DoRA's magnitude starts
        at the row norms of the base weight (B = 0), so the output is unchanged."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without dots, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        self.check_can_add()
        device = self.base_layer.weight.device
        ad = LoRAAdapter(
            self.in_features, self.out_features, r, alpha, dropout, init, use_rslora, use_dora, device
        )
        if use_dora:
            with torch.no_grad():
                ad.magnitude.copy_(row_norms(self.base_layer, ad.lora_A, ad.lora_B, ad.scaling))
        ad.requires_grad_(False)
        self.adapters[name] = ad
        return ad

    def check_can_add(self) -> None:
        """RuntimeError if this layer is sharded by FSDP2: FSDP2 manages only the parameters
        that existed at fully_shard, so a new adapter would be a plain parameter on every rank,
        never reduced, and the ranks would train apart."""
        if any(_is_dtensor(t) for t in [self.base_layer.weight, *self.parameters()]):
            raise RuntimeError(
                "qpeft cannot add an adapter to a layer sharded by FSDP2 (fully_shard): FSDP2 manages only the "
                "parameters that existed at fully_shard, so a new adapter would be a plain parameter on every "
                "rank, never reduced, and the ranks would train apart. Add adapters before fully_shard"
            )

    def delete_adapter(self, name: str) -> None:
        self._adapter(name)
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged into the base weight; unmerge() first")
        del self.adapters[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: no adapter) and the only trainable one."""
        if name is not None:
            self._adapter(name)
        if self.merged_adapter is not None and name != self.merged_adapter:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged; unmerge() before switching adapters"
            )
        self.active_adapter = name
        for n, ad in self.adapters.items():
            ad.requires_grad_(n == name)
        trains = self.train_bias or (name is not None and self.adapters[name].bias != "none")
        if self.base_layer.bias is not None and (
            trains or any(ad.bias != "none" for ad in self.adapters.values())
        ):
            self.base_layer.bias.requires_grad_(trains)

    def disable_adapters(self) -> None:
        """From now on forward gives exactly the base layer's output."""
        if self.merged_adapter is not None:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge() first"
            )
        self.adapters_enabled = False

    def enable_adapters(self) -> None:
        self.adapters_enabled = True

    # --- forward ----------------------------------------------------------------------------
    # The fast path (docs/design.md, "Per-call overhead"): a plan for qpeft._C_layer, built
    # after a call the full path below served with the fused op (a 4-bit base, one LoRA
    # adapter, no dropout in training, no DoRA, fp32 adapters); None: no plan.
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
            y = layer_call(plan, self, x)
            if y is not None:
                if y is not NotImplemented:
                    return y
                self.__dict__["_fast_plan"] = None  # stale: something it holds changed
        base = self.base_layer
        # a 4-bit base checks x itself (base.qlora / base(x); DoRA's path checks it below)
        if not isinstance(base, Linear4bit):
            check_dense_input(self, x)
            if x.dim() < 1 or x.shape[-1] != self.in_features:
                got = f"{x.shape[-1]} features" if x.dim() else "no feature dimension (a 0-d tensor)"
                raise ValueError(
                    f"QLoRALinear(in_features={self.in_features}, out_features={self.out_features}) got an input "
                    f"with {got} (shape {tuple(x.shape)})"
                )
        name = self.active_adapter
        if (
            not self.adapters_enabled
            or name is None
            or self.merged_adapter is not None
            or name not in self.adapters
        ):
            return base(x)
        ad = self.adapters[name]
        dropping = self.training and ad.dropout_p > 0
        if ad.use_dora:
            if isinstance(base, Linear4bit):
                base.check_input(x)  # before the row norms
            return self._dora_forward(x, ad, dropping)
        if isinstance(base, Linear4bit):
            if not dropping:
                y = base.qlora(x, ad.lora_A, ad.lora_B, ad.scaling)
                if plan is None and type(base) is Linear4bit and not _is_compiling():
                    self._plan_fast_path(base, ad, name)
                return y
            return (base(x) + ad.delta(x)).to(result_dtype(x))
        return (dense_linear(base, x) + ad.delta(x)).to(result_dtype(x))

    def _plan_fast_path(self, base: Linear4bit, ad: LoRAAdapter, name: str) -> None:
        """After the full path served a call: the plan for qpeft._C_layer to serve the next
        ones (``autograd.small_layer_plan``), guarded by every attribute this forward read
        to pick the fused op, so that changing any of them (set_adapter, merge,
        disable_adapters, train() with dropout, a replaced parameter, weight or state)
        makes the next call take the full path again and re-plan."""
        if layer_module() is None:
            return
        modules, adapters = self._modules, self._modules["adapters"]
        params, base_params = ad._parameters, base._parameters
        weight = base_params.get("weight")  # a Weight4bit: its codes and state are attributes
        if not isinstance(weight, Weight4bit):
            return
        w_d = weight.__dict__
        d, ad_d, base_d = self.__dict__, ad.__dict__, base.__dict__
        guards = (
            *(None, "adapters_enabled", d.get("adapters_enabled")),
            *(None, "active_adapter", name),
            *(None, "merged_adapter", d.get("merged_adapter")),
            *(None, "training", d.get("training")),
            *(modules, "base_layer", base),
            *(modules, "adapters", adapters),
            *(adapters._modules, name, ad),
            *(params, "lora_A", params.get("lora_A")),
            *(params, "lora_B", params.get("lora_B")),
            *(ad, "use_dora", ad_d.get("use_dora")),
            *(ad, "dropout_p", ad_d.get("dropout_p")),
            *(ad, "scaling", ad_d.get("scaling")),
            *(ad, "training", ad_d.get("training")),
            *(base_params, "weight", weight),
            *(weight, "packed", w_d.get("packed")),
            *(weight, "quant_state", w_d.get("quant_state")),
            *(base_params, "bias", base_params.get("bias")),
            *(base, "compute_dtype", base_d.get("compute_dtype")),
        )
        if base_d.get("compute_dtype") not in (None, torch.float32) or ad_d.get("use_dora"):
            return
        state = w_d.get("quant_state")
        if state is None:
            return
        self.__dict__["_fast_plan"] = small_layer_plan(
            self,
            guards,
            w_d.get("packed"),
            state,
            params.get("lora_A"),
            params.get("lora_B"),
            base_params.get("bias"),
            ad.scaling,
        )

    def _base_no_bias(self, x: torch.Tensor, ad: LoRAAdapter | None = None) -> torch.Tensor:
        """x W^T (+ s x A^T B^T with ``ad``), no bias."""
        base = self.base_layer
        if isinstance(base, Linear4bit):
            if ad is None:
                return base.qlora(x, bias=False)
            return base.qlora(x, ad.lora_A, ad.lora_B, ad.scaling, bias=False)
        y = dense_linear(base, x, bias=False)
        return y if ad is None else y + ad.delta(x, dropout=False)

    def _dora_forward(self, x: torch.Tensor, ad: LoRAAdapter, dropping: bool) -> torch.Tensor:
        norm = row_norms(self.base_layer, ad.lora_A, ad.lora_B, ad.scaling)  # detached, as in PEFT
        scale = ad.magnitude / norm.to(ad.magnitude.dtype)
        bias = self.base_layer.bias
        if not dropping:
            y = self._base_no_bias(x, ad) * scale
            if bias is not None:
                y = y + bias
            return y.to(result_dtype(x))
        xd = ad.dropout(x)
        y = (
            self.base_layer(x)
            if isinstance(self.base_layer, Linear4bit)
            else dense_linear(self.base_layer, x)
        )
        y = y + (scale - 1) * self._base_no_bias(xd) + scale * ad.delta(xd, dropout=False)
        return y.to(result_dtype(x))

    # --- merge ------------------------------------------------------------------------------
    @torch.no_grad()
    def _merged_weight(self, ad: LoRAAdapter, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the merged fp32 weight, DoRA's row norm or None) from the fp32 base weight w."""
        merged = w + ad.scaling * (ad.lora_B.float() @ ad.lora_A.float())
        if not ad.use_dora:
            return merged, None
        norm = torch.linalg.vector_norm(merged, dim=1)
        return merged * (ad.magnitude.float() / norm)[:, None], norm

    @torch.no_grad()
    def merge(self, adapter_name: str | None = None, keep_original: bool | None = None) -> MergeReport:
        """Fold adapter ``adapter_name`` (default: the active one) into the base weight.

        A 4-bit base is dequantized, W + s*B@A (DoRA: scaled by m / row norm) is formed in
        fp32 and requantized with the same settings; the returned :class:`MergeReport`
        (also kept as ``self.merge_report``) gives the error that requantization added.
        ``keep_original`` (default: True for 4-bit bases, whose copy costs the packed size,
        False for 16-bit ones) keeps the pre-merge weight so ``unmerge`` restores it exactly;
        otherwise ``unmerge`` subtracts the adapter again (and requantizes, adding error).
        While merged, forward is the base layer alone.
        """
        self.check_not_sharded("merge")
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged; unmerge() first")
        if not self.adapters_enabled:
            # a disabled layer promises the base layer's output, which a merge would change
            raise RuntimeError("adapters are disabled; enable_adapters() before merging")
        with torch.autocast(self.base_layer.weight.device.type, enabled=False):  # weight arithmetic in fp32
            return self._merge(adapter_name, keep_original)

    def check_not_sharded(self, what: str = "merge") -> None:
        """RuntimeError if this layer is sharded by FSDP2 (its base weight or an adapter is a
        DTensor): merging rewrites the whole base weight, which no rank holds, in a format
        FSDP2's all-gather buffers were sized for (docs/distributed.md, "Adapters, merging")."""
        tensors = [self.base_layer.weight, *self.parameters(recurse=False)]
        if any(_is_dtensor(t) for t in tensors):
            raise RuntimeError(
                f"qpeft cannot {what} adapters of a model sharded by FSDP2 (fully_shard): no rank holds a "
                "whole base weight to rewrite. Save the adapter (qpeft.save_adapter works under FSDP2), then "
                "in one process load it into the unsharded converted model (qpeft.load_adapter) and merge "
                "there (qpeft.merge_adapters); or merge before fully_shard"
            )

    def _merge(self, adapter_name: str | None, keep_original: bool | None) -> MergeReport:
        name = self.active_adapter if adapter_name is None else adapter_name
        ad = self._adapter(name)
        base = self.base_layer
        keep = self.quantized if keep_original is None else keep_original
        if isinstance(base, Linear4bit):
            original = (base.weight, base.quant_state) if keep else None
            merged, norm = self._merged_weight(ad, base.dequantize(torch.float32))
            report = self._requantize(merged)
        else:
            original = base.weight.detach().clone() if keep else None
            merged, norm = self._merged_weight(ad, base.weight.float())
            base.weight.copy_(merged.to(base.weight.dtype))
            report = MergeReport(0.0, 0.0, 0.0)
        self._merge_cache = {"original": original, "norm": norm}
        self.merged_adapter = name
        self.merge_report = report
        return report

    @torch.no_grad()
    def unmerge(self) -> MergeReport:
        """Undo ``merge``: restore the kept original bit for bit, or subtract the adapter."""
        self.check_not_sharded("unmerge")
        if self.merged_adapter is None:
            raise RuntimeError("no adapter is merged")
        with torch.autocast(self.base_layer.weight.device.type, enabled=False):  # weight arithmetic in fp32
            return self._unmerge()

    def _unmerge(self) -> MergeReport:
        ad = self._adapter(self.merged_adapter)
        base, cache = self.base_layer, self._merge_cache
        report = MergeReport(0.0, 0.0, 0.0)
        if cache["original"] is not None:
            if isinstance(base, Linear4bit):
                base.weight, base.quant_state = cache["original"]
            else:
                base.weight.copy_(cache["original"])
        else:
            w = base.dequantize(torch.float32) if isinstance(base, Linear4bit) else base.weight.float()
            if ad.use_dora:
                w = w / (ad.magnitude.float() / cache["norm"])[:, None]
            w = w - ad.scaling * (ad.lora_B.float() @ ad.lora_A.float())
            if isinstance(base, Linear4bit):
                report = self._requantize(w)
            else:
                base.weight.copy_(w.to(base.weight.dtype))
        self.merged_adapter = None
        self._merge_cache = {}
        return report

    def _requantize(self, w: torch.Tensor) -> MergeReport:
        base = self.base_layer
        base.requantize_(w, dtype=base.quant_state.dtype)  # dequantize() keeps returning the original dtype
        err = base.dequantize(torch.float32) - w
        rms = float(err.pow(2).mean().sqrt())
        return MergeReport(
            rms, float(err.abs().max()), float(torch.linalg.vector_norm(err) / torch.linalg.vector_norm(w))
        )

    def extra_repr(self) -> str:
        state = "" if self.adapters_enabled else ", disabled"
        merged = f", merged={self.merged_adapter!r}" if self.merged_adapter else ""
        return f"active_adapter={self.active_adapter!r}{state}{merged}"
