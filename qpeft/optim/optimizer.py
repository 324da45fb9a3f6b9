"""The base of qpeft's optimizers: state allocation (32-bit or blockwise 8-bit,
paged or not), the step loop over param groups, state accounting, and
state_dict/load_state_dict with validation.

Each optimizer step calls one registered op per parameter (``torch.ops.qpeft.*``,
layer below); the subclasses (adamw.py, lion.py) say which op and which state.
"""

from __future__ import annotations

import numbers
from collections import defaultdict
from collections.abc import Iterable
from copy import deepcopy
from itertools import chain
from math import prod
from typing import Any

import torch

from .._formats import FLOAT_DTYPES, dynamic_map
from .._optim_math import MIN_8BIT_NUMEL, state_blocks
from . import distributed as _dist
from .paging import PAGE_MIN_NUMEL, StatePager, check_numel_arg

STATE_DICT_KEY = "qpeft"
_STRIDED = torch.strided
_FLOATS = frozenset(FLOAT_DTYPES)
_CPU = torch.device("cpu")
# State dict formats: 1 keeps each 8-bit absmax as the 1-D blocks of the parameter; 2
# (the "rows" layout, docs/design.md "Optimizers under FSDP2 and DDP") as a per-row table
# that reshards with the parameter. They differ only for 8-bit state.
STATE_FORMAT = 1
ROWS_FORMAT = 2
LAYOUTS = ("auto", "flat", "rows")
# The step count after an update goes to the ops as an int64.
MAX_STEP = 2**63 - 2


def _check_param(p: torch.Tensor, where: str) -> None:
    if _is_4bit(p):
        raise TypeError(
            f"{where} is a 4-bit quantized weight (qpeft.Weight4bit: packed codes, frozen); qpeft optimizers "
            "step float32/float16/bfloat16 parameters: give the optimizer the trainable parameters "
            "(p for p in model.parameters() if p.requires_grad)"
        )
    if p.is_complex():
        raise TypeError(
            f"{where} is complex ({p.dtype}); qpeft optimizers support float32/float16/bfloat16 "
            "parameters only (optimize torch.view_as_real(param) instead)"
        )
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{where} has dtype {p.dtype}; qpeft optimizers support float32, float16 and bfloat16"
        )


def _is_4bit(p: torch.Tensor) -> bool:
    from ..weight4bit import Weight4bit

    return isinstance(_dist.local(p), Weight4bit)


def _check_frozen_or_param(p: torch.Tensor, where: str) -> None:
    """At add_param_group: a parameter that requires grad must be one the step can update;
    a frozen one of any kind (a 4-bit base weight, a float64 or integer buffer-like
    parameter) is accepted, as torch.optim and bitsandbytes accept it, and never stepped:
    it gets no gradient (should one be set by hand, the step refuses it, before any update)."""
    if p.requires_grad:
        _check_param(p, where)


# Group keys torch.optim gives a meaning qpeft's fused steps do not implement; the
# constructors refuse them as keywords (TypeError), a group that sets them truthy is refused
# too rather than silently run without them (maximize=True would descend).
UNSUPPORTED_GROUP_FLAGS = ("maximize", "amsgrad", "capturable", "differentiable", "fused")


def _check_group_flags(group: dict[str, Any], where: str) -> None:
    for name in UNSUPPORTED_GROUP_FLAGS:
        if group.get(name):
            raise ValueError(f"{where} sets {name}={group[name]!r}, which qpeft's optimizers do not support")


def _in(where: str) -> str:
    return f" of {where}" if where else ""


class HyperparameterTypeError(TypeError, ValueError):
    """A hyperparameter that is no number (a string lr, a bool, a 3-tuple of betas).
    A TypeError as torch.optim raises for one; a ValueError as well, since in a
    state_dict being loaded it is a bad value like any other (load_state_dict raises
    ValueError for those)."""


def real_hparam(value: Any, name: str, where: str) -> float:
    """A hyperparameter as a Python float: a real number (not a bool or a string) or a
    one-element real tensor, as torch.optim accepts for lr. ``where`` names the group."""
    if type(value) is float:  # the per-step case
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise HyperparameterTypeError(
                f"{name}{_in(where)} must be a real number or a one-element real tensor, got a "
                f"{value.dtype} tensor of shape {tuple(value.shape)}"
            )
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise HyperparameterTypeError(
            f"{name}{_in(where)} must be a real number, got {type(value).__name__} {value!r}"
        )
    return float(value)


def beta_pair(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise HyperparameterTypeError(f"betas{_in(where)} must be a pair (beta1, beta2), got {value!r}")
    return real_hparam(value[0], "betas[0]", where), real_hparam(value[1], "betas[1]", where)


def group_hparams(group: dict[str, Any], names: tuple[str, ...], where: str) -> tuple:
    try:
        return tuple(group[name] for name in names)
    except KeyError as e:
        raise ValueError(f"{where or 'the group'} has no {e.args[0]!r} hyperparameter") from None


class QpeftOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` over qpeft's fused step ops.

    Args (beyond the algorithm's hyperparameters):
        optim_bits: 32 (fp32 state) or 8 (blockwise 8-bit state; parameters with
            fewer than ``min_8bit_size`` elements keep fp32 state).
        paged: keep the state of parameters with at least ``page_min_numel``
            elements in paged (CUDA unified) memory. No effect on CPU parameters.
        page_out: after each group's update, prefetch its paged state back to host.
        state_memory: the paged-memory provider (default: CUDA managed memory).
        state_dict_layout: how ``state_dict()`` writes 8-bit absmax: "flat" (format 1,
            the 1-D blocks), "rows" (format 2, a per-row table that torch.distributed.
            checkpoint reshards with the parameter), or "auto" (rows when a parameter is a
            DTensor). A checkpoint must be loaded through a state dict of its own layout;
            ``load_state_dict`` reads both.

    DTensor parameters (FSDP2's ``fully_shard``; placements Shard(0) or Replicate()) are
    stepped on their local shards with state kept per shard (docs/design.md, "Optimizers
    under FSDP2 and DDP").
    """

    algorithm: str = ""
    # state names per layout: {"32": (...), "8": (...)} set by subclasses
    _STATE_32: tuple[str, ...] = ()
    _STATE_8: tuple[tuple[str, bool], ...] = ()  # (state name, signed map?) per 8-bit moment

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        optim_bits: int,
        paged: bool,
        page_out: bool = False,
        min_8bit_size: int = MIN_8BIT_NUMEL,
        page_min_numel: int = PAGE_MIN_NUMEL,
        state_memory=None,
        state_dict_layout: str = "auto",
    ) -> None:
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        min_8bit_size = check_numel_arg(min_8bit_size, "min_8bit_size", 1)
        if state_dict_layout not in LAYOUTS:
            raise ValueError(f"state_dict_layout must be one of {LAYOUTS}, got {state_dict_layout!r}")
        self.optim_bits = optim_bits
        self.state_dict_layout = state_dict_layout
        self.min_8bit_size = min_8bit_size
        self._pager = StatePager(paged, page_out, page_min_numel, state_memory)
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hparams(defaults, "")
        super().__init__(params, defaults)  # checks each group in add_param_group

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, refusing (TypeError/ValueError, nothing added) a group
        whose hyperparameters or parameters this optimizer cannot step."""
        gi = len(self.param_groups)
        if isinstance(param_group, dict):  # torch raises the TypeError otherwise
            self._hparams({**self.defaults, **param_group}, f"param group {gi}")
            _check_group_flags(param_group, f"param group {gi}")
        super().add_param_group(param_group)
        try:
            seen: set[int] = set()
            for pi, p in enumerate(self.param_groups[gi]["params"]):
                _check_frozen_or_param(p, f"parameter {pi} of param group {gi}")
                if id(p) in seen:
                    # torch only warns (and steps it twice in a row); the fused step would
                    # update it twice with one step count: neither is what was meant
                    raise ValueError(
                        f"parameter {pi} of param group {gi} appears twice in the group: "
                        "pass each parameter once"
                    )
                seen.add(id(p))
                if _dist.is_dtensor(p):
                    _dist.check_placements(p, f"parameter {pi} of param group {gi}")
        except BaseException:
            del self.param_groups[gi]
            raise

    # --- copies (copy.deepcopy, pickle, torch.save of the optimizer) ---------------------

    # What this class adds to torch's pickled state (defaults, state, param_groups); the
    # 8-bit maps are made again on first use.
    _OWN_ATTRS = ("optim_bits", "state_dict_layout", "min_8bit_size", "_pager")

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._OWN_ATTRS}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_pager" in state:  # a copy; load_state_dict passes state and param_groups only
            self._maps = {}
            self._repage_state()

    def _repage_state(self) -> None:
        """Give a copy's paged state paged memory of its own: the copy of a paged tensor
        is ordinary memory that still has the paged marker (its prefetch would fail), and
        a copy moved elsewhere (torch.load's map_location) may page or not anew."""
        for p, state in self.state.items():
            old = self._local_state(state)
            if self.placement(p) != "paged" and not any(self._pager.is_paged(t) for t in old.values()):
                continue
            new = self._new_state(p)
            for name, t in self._local_state(new).items():
                if torch.is_tensor(t):
                    t.copy_(old[name])
            new["step"] = state["step"]
            self.state[p] = new

    # --- what a parameter's state looks like ---------------------------------------

    @property
    def paged(self) -> bool:
        return self._pager.paged

    @property
    def page_out(self) -> bool:
        return self._pager.page_out

    def uses_8bit(self, p: torch.Tensor) -> bool:
        """Whether p gets 8-bit state: by its whole (global) size, so that every rank and
        every world size give a DTensor parameter the same state keys."""
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _state_spec(self, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of each state tensor this rank keeps for p (of its local
        shard if p is a DTensor)."""
        lp = _dist.local(p)
        if not self.uses_8bit(p):
            return {name: (tuple(lp.shape), torch.float32) for name in self._STATE_32}
        spec = {}
        for name, _signed in self._STATE_8:
            spec[f"{name}_q"] = (tuple(lp.shape), torch.uint8)
            spec[f"{name}_absmax"] = ((state_blocks(lp.numel()),), torch.float32)
        return spec

    def _qmaps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed, unsigned) dynamic maps on ``device``, made once per device."""
        if device not in self._maps:
            self._maps[device] = (dynamic_map(True, device), dynamic_map(False, device))
        return self._maps[device]

    def _new_state(self, p: torch.Tensor) -> dict[str, Any]:
        """Zero state for p. For a DTensor p: per-element tensors are DTensors over local
        tensors of the shard's shape (mesh and placements p's); 8-bit absmax, which
        belongs to the blocks of the local shard, is a plain local tensor."""
        lp = _dist.local(p)
        state: dict[str, Any] = {"step": 0}
        for name, (shape, dtype) in self._state_spec(p).items():
            state[name] = self._pager.zeros(lp, shape, dtype)
        if self.uses_8bit(p):
            # A zero state: absmax 0 and the code of 0.0 (dequantizes to +0.0).
            signed, unsigned = self._qmaps(torch.device("cpu"))
            for name, is_signed in self._STATE_8:
                code = signed if is_signed else unsigned
                state[f"{name}_q"].fill_(int((code == 0).nonzero()[0, 0]))
        if lp is not p:
            for name, t in state.items():
                if torch.is_tensor(t) and not name.endswith("_absmax"):
                    d = _dist.wrap_like(t, p)
                    if self._pager.is_paged(t):
                        d._local_tensor._qpeft_paged = True  # the tensor the step reads
                    state[name] = d
        return state

    @staticmethod
    def _local_state(state: dict[str, Any]) -> dict[str, Any]:
        """state with DTensors replaced by their local tensors (what the ops update)."""
        return {k: _dist.local(v) for k, v in state.items()}

    def _state_tensors(self, state: dict[str, Any]) -> list[torch.Tensor]:
        return [_dist.local(v) for k, v in state.items() if k != "step" and torch.is_tensor(v)]

    # --- the step ---------------------------------------------------------------------

    def _hparams(self, group: dict[str, Any], where: str) -> tuple[float, ...]:
        """The group's hyperparameters as the floats _update passes to the op; raises
        TypeError/ValueError naming ``where`` (the group) for any the step cannot use."""
        raise NotImplementedError

    def _update(self, items: list, hp: tuple[float, ...], eight_bit: bool) -> None:
        """Update (param, grad, state) items of one group, device and state layout with
        the group's checked hyperparameters ``hp``: subclasses call their
        torch.ops.qpeft multi-tensor step op once, with step counts state["step"] + 1
        (the caller counts the step once the op has returned)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient. Paged state of each group
        is prefetched to its device before the group's updates (and paged out after
        them with page_out=True), all on torch's current stream.

        Everything a step can refuse (hyperparameters, gradients, state) is checked for
        all groups before anything is updated: a step that raises leaves parameters,
        state and step counts as they were (and makes no state), so it can be retried
        once the cause is fixed."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(gi, group) for gi, group in enumerate(self.param_groups)]
        for plan in plans:
            self._apply(*plan)
        return loss

    def _plan(self, gi: int, group: dict[str, Any]):
        """Check one group and sort its (param, grad, state) items by op call; changes
        nothing. New state is made here but kept out of self.state until stepped."""
        hp = self._hparams(group, f"param group {gi}")
        _check_group_flags(group, f"param group {gi}")
        # One op call per (device, state layout): on CPU one parallel region for all of
        # the group's tensors. The op updates in place, so a non-contiguous parameter
        # is stepped as a contiguous copy and written back. This loop runs per
        # parameter every step, so it checks only what can change between steps
        # without going through this optimizer: the gradient (layout, dtype, shape,
        # device) and the parameter's dtype, size and device against its state.
        # The state tensors are made for the parameter (_new_state, load_state_dict);
        # the first stands for the rest (the op checks all of them again).
        # A DTensor parameter (docs/design.md, "Optimizers under FSDP2 and DDP") is
        # stepped as its local shard with its local gradient and local state.
        batches: dict[tuple[torch.device, bool], tuple[list, list, list]] = {}
        fresh: dict[torch.Tensor, dict[str, Any]] = {}
        state_of = self.state.get  # not self.state[p]: that would insert an empty state
        key8, key32 = self._STATE_8[0][0] + "_q", self._STATE_32[0]
        dtensor = _dist.dtensor_type()
        for pi, param in enumerate(group["params"]):
            g = param.grad
            if g is None:
                continue
            owner = state_of(param) or fresh.get(param)
            if not owner:
                self._check_step_args(param, g, None, gi, pi)
                owner = fresh[param] = self._new_state(param)
            p, state = param, owner
            if dtensor is not None and isinstance(param, dtensor):
                where = f"parameter {pi} of param group {gi}"
                _dist.check_placements(param, where)
                p, g = param._local_tensor, _dist.local_grad(param, g, where)
                state = self._local_state(owner)
            eight_bit = key8 in state
            first = state.get(key8 if eight_bit else key32)
            dt = p.dtype
            if first is not None and p.is_cpu:  # is_cpu costs a third of a device compare
                device, same_device = _CPU, g.is_cpu and first.is_cpu
            else:
                device = p.device
                same_device = first is not None and g.device == device and first.device == device
            if not (
                same_device
                and g.layout is _STRIDED
                and g.dtype is dt
                and dt in _FLOATS
                and g.shape == p.shape
                and first.numel() == p.numel()
            ):
                self._check_step_args(param, param.grad, owner, gi, pi)  # raises, naming the problem
            work = p
            batch = batches.get((device, eight_bit))
            if batch is None:
                batch = batches[(device, eight_bit)] = ([], [], [])
            if not p.is_contiguous():
                if torch._debug_has_internal_overlap(p) == 1:  # e.g. an expand()ed view
                    raise ValueError(
                        f"parameter {pi} of param group {gi} has elements that share memory (an expanded "
                        "view?), so its update cannot be written back: give it storage of its own (.clone())"
                    )
                work = p.contiguous()
                batch[1].append((p, work))
            batch[0].append((work, g, state))
            batch[2].append(owner)
        return hp, batches, fresh

    def _apply(self, hp: tuple[float, ...], batches: dict, fresh: dict) -> None:
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        try:
            if self._pager.paged:
                for items, _, _ in batches.values():
                    for work, _, state in items:
                        by_device[work.device].extend(self._state_tensors(state))
                for device, tensors in by_device.items():
                    self._pager.before_update(tensors, device)
            for (_, eight_bit), (items, copies, owners) in batches.items():
                self._update(items, hp, eight_bit)
                for state in owners:
                    state["step"] += 1
                for p, work in copies:
                    p.copy_(work)
            for device, tensors in by_device.items():
                self._pager.after_update(tensors, device)
        finally:
            # New state joins self.state once stepped (all of it, unless an op failed
            # after the checks; then the parameters it updated keep theirs).
            for p, state in fresh.items():
                if state["step"]:
                    self.state[p] = state

    def _check_step_args(
        self, p: torch.Tensor, g: torch.Tensor, state: dict | None, gi: int, pi: int
    ) -> None:
        """Everything the step needs of one parameter, its gradient and its state (None:
        about to be made), raising TypeError/ValueError that names the problem. For a
        DTensor parameter, its placements and its gradient's, then the local shards."""
        where = f"parameter {pi} of param group {gi}"
        spec = self._state_spec(p)
        if _dist.is_dtensor(p):
            _check_param(p, where)
            _dist.check_placements(p, where)
            p, g = _dist.local(p), _dist.local_grad(p, g, where)
            if state is not None:
                state = self._local_state(state)
        if g.layout is not _STRIDED:
            raise TypeError(
                f"{type(self).__name__} does not support sparse gradients ({where} has a {g.layout} gradient)"
            )
        _check_param(p, where)
        if g.dtype != p.dtype:
            raise TypeError(f"the gradient of {where} has dtype {g.dtype}, the parameter {p.dtype}")
        if g.shape != p.shape:
            raise ValueError(
                f"the gradient of {where} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}"
            )
        if g.device != p.device:
            raise ValueError(f"the gradient of {where} is on {g.device}, the parameter on {p.device}")
        if state is None:
            return
        if set(spec) != set(state) - {"step"}:
            raise ValueError(
                f"the state of {where} has keys {sorted(state)}, but {type(self).__name__} keeps "
                f"{sorted(spec)} for a parameter of shape {tuple(p.shape)}: was the parameter replaced?"
            )
        for name, (shape, dtype) in spec.items():
            t = state[name]
            if not torch.is_tensor(t) or t.dtype != dtype or t.numel() != prod(shape):
                got = f"{t.dtype} of {t.numel()} elements" if torch.is_tensor(t) else type(t).__name__
                raise ValueError(
                    f"state '{name}' of {where} is {got}, expected {dtype} of {prod(shape)} elements "
                    f"(parameter shape {tuple(p.shape)}): was the parameter replaced?"
                )
            if t.device != p.device:
                raise ValueError(f"state '{name}' of {where} is on {t.device}, the parameter on {p.device}")
            if not t.is_contiguous():
                raise ValueError(
                    f"state '{name}' of {where} must be contiguous (the step updates it in place)"
                )

    # --- accounting -----------------------------------------------------------------

    def _gets_state(self, p: torch.Tensor) -> bool:
        """Whether p has or will get state: a frozen parameter (requires_grad=False)
        gets no gradient, so no state, unless it had some already."""
        return p.requires_grad or p in self.state  # `in`: no empty state inserted

    def state_bytes(self) -> list[int]:
        """Bytes of per-element state of each parameter, in param_groups order (the
        layout this optimizer gives it, allocated yet or not; 0 for a frozen parameter
        without state; the step counter and the two shared 8-bit maps are not
        per-element state and are not counted)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                out.append(
                    sum(
                        prod(shape) * torch.empty((), dtype=dt).element_size()
                        for shape, dt in self._state_spec(p).values()
                    )
                    if self._gets_state(p)
                    else 0
                )
        return out

    def state_bytes_per_param(self) -> float:
        """Optimizer state bytes per element of the parameters that have or will get
        state (frozen ones without state are left out of both counts): 8.0 with fp32
        AdamW state, 2 + 8/256 = 2.03125 for 8-bit AdamW state of tensors whose size is
        a multiple of 256 (one byte per moment plus one fp32 absmax per 256 elements
        and moment)."""
        numel = sum(p.numel() for p in self._params() if self._gets_state(p))
        return sum(self.state_bytes()) / numel if numel else 0.0

    def memory_report(self) -> dict[str, int]:
        """Bytes of allocated state by location: 'host' / 'device' (ordinary CPU / GPU
        tensors) and 'paged_device' / 'paged_host' / 'paged_unknown' (paged state, by
        the driver's record of where it was last prefetched)."""
        report = dict.fromkeys(("host", "device", "paged_device", "paged_host", "paged_unknown"), 0)
        for state in self.state.values():
            for t in self._state_tensors(state):
                report[self._pager.location(t)] += t.numel() * t.element_size()
        return report

    def placement(self, p: torch.Tensor) -> str:
        """Where p's state lives or will live: 'paged', 'device' or 'host' (for a DTensor,
        the state of its local shard)."""
        return self._pager.placement(_dist.local(p))

    # --- checkpoints ------------------------------------------------------------------

    def _format_tag(self, rows: bool = False) -> dict[str, Any]:
        return {
            "optimizer": type(self).__name__,
            "algorithm": self.algorithm,
            "optim_bits": self.optim_bits,
            "min_8bit_size": self.min_8bit_size,
            "format": ROWS_FORMAT if rows else STATE_FORMAT,
        }

    def _params(self) -> list[torch.Tensor]:
        return list(chain.from_iterable(g["params"] for g in self.param_groups))

    def _writes_rows(self) -> bool:
        if self.state_dict_layout == "auto":
            return any(_dist.is_dtensor(p) for p in self._params())
        return self.state_dict_layout == "rows"

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus the state format, as a ``"qpeft"`` entry and in every
        param group (torch.distributed.checkpoint.state_dict keeps only "state" and
        "param_groups"). The 8-bit states are saved as they are (uint8 codes and fp32
        absmax): resuming is bit-exact. Paged and unpaged variants of one algorithm share
        the format.

        State of a DTensor parameter is saved as DTensors (8-bit absmax as the rows
        table, format 2), so that torch.distributed.checkpoint saves each rank's shard
        and reshards on load (docs/design.md, "Optimizers under FSDP2 and DDP")."""
        sd = super().state_dict()
        rows = self._writes_rows()
        if not rows and any(_dist.is_dtensor(p) and self.uses_8bit(p) for p in self._params()):
            raise ValueError(
                "state_dict_layout='flat' cannot save the 8-bit state of DTensor parameters (its absmax "
                "blocks are those of each rank's shard): use state_dict_layout='rows' or 'auto'"
            )
        tag = self._format_tag(rows)
        sd[STATE_DICT_KEY] = tag
        for g in sd["param_groups"]:
            g[STATE_DICT_KEY] = dict(tag)
        if rows:
            params = self._params()
            sd["state"] = {k: self._rows_state(params[k], v) for k, v in sd["state"].items()}
        return sd

    def _rows_state(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
        """A copy of p's state dict entry with each 8-bit absmax as its rows table."""
        out = dict(state)
        if not self.uses_8bit(p):
            return out
        lp = _dist.local(p)
        rows, row, k = _dist.rows_geometry(tuple(p.shape))
        local_rows = lp.shape[0] if lp.dim() else 1
        for name, _signed in self._STATE_8:
            table = _dist.absmax_to_rows(state[f"{name}_absmax"], local_rows, row, k)
            out[f"{name}_absmax"] = _dist.wrap_like(table, p, (rows, 1 + k)) if lp is not p else table
        return out

    def _saved_spec(self, p: torch.Tensor, rows: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (global shape, dtype) of each state tensor a state dict holds for p."""
        if not self.uses_8bit(p):
            return {name: (tuple(p.shape), torch.float32) for name in self._STATE_32}
        n_rows, _, k = _dist.rows_geometry(tuple(p.shape))
        absmax = (n_rows, 1 + k) if rows else (state_blocks(p.numel()),)
        spec = {}
        for name, _signed in self._STATE_8:
            spec[f"{name}_q"] = (tuple(p.shape), torch.uint8)
            spec[f"{name}_absmax"] = (absmax, torch.float32)
        return spec

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict written by a qpeft optimizer of the same algorithm and state
        bits (paged or not), in either layout. Raises ValueError for anything else:
        another optimizer's state dict, other groups/parameter counts, or states whose
        keys, dtypes or shapes do not fit the parameters.

        For a DTensor parameter the saved state may be DTensors of any Shard(0)/Replicate
        layout (redistributed) or full plain tensors (this rank's slice is taken); 8-bit
        state in the rows layout is rebuilt for the local shard's blocks, bit-exact where
        the blocks are the saved ones, requantized where not.

        As torch's: hooks from register_load_state_dict_pre_hook run first, on a shallow
        copy of ``state_dict`` (one may return a replacement), those from
        register_load_state_dict_post_hook after the load; the group values are deep
        copies, shared with neither the state dict nor the optimizer that wrote it."""
        name = type(self).__name__
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(
                f"{name}.load_state_dict expects an optimizer state_dict with 'state' and 'param_groups'"
            )
        tag = state_dict.get(STATE_DICT_KEY)
        saved_groups = state_dict["param_groups"]
        if tag is None and isinstance(saved_groups, (list, tuple)) and saved_groups:
            first = saved_groups[0]
            tag = first.get(STATE_DICT_KEY) if isinstance(first, dict) else None
        if not isinstance(tag, dict):
            raise ValueError(
                f"{name} cannot load this state_dict: it has no '{STATE_DICT_KEY}' entry, so it was not written by "
                "a qpeft optimizer (a torch.optim or bitsandbytes state_dict has a different state layout)"
            )
        if tag.get("format") not in (STATE_FORMAT, ROWS_FORMAT):
            raise ValueError(
                f"{name} cannot load state format {tag.get('format')!r} (this version reads "
                f"{STATE_FORMAT} and {ROWS_FORMAT})"
            )
        rows = tag.get("format") == ROWS_FORMAT
        if (tag.get("algorithm"), tag.get("optim_bits")) != (self.algorithm, self.optim_bits):
            raise ValueError(
                f"this state_dict was written by {tag.get('optimizer')} ({tag.get('algorithm')}, "
                f"{tag.get('optim_bits')}-bit state); {name} uses {self.algorithm} with {self.optim_bits}-bit state"
            )
        groups = self.param_groups
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(groups)}"
            )
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
            if not isinstance(sg, dict) or not isinstance(sg.get("params"), (list, tuple)):
                raise ValueError(
                    f"param group {gi} of the loaded state dict must be a dict with a 'params' list"
                )
            # The group's hyperparameters are what the next step uses: refuse now what it would.
            self._hparams(sg, f"param group {gi} of the loaded state dict")
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(
                    f"param group {gi}: the loaded state dict has {len(sg['params'])} parameters, "
                    f"this optimizer has {len(g['params'])}"
                )
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        index_of = {id(p): (gi, pi) for gi, g in enumerate(groups) for pi, p in enumerate(g["params"])}

        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(
                    f"the loaded state dict has state for parameter id {key!r}, which no group lists"
                )
            p = id_map[key]
            new_state[p] = self._load_param_state(p, saved, *index_of[id(p)], rows=rows)

        # Deep copies, as torch's: a tensor lr or a betas list stays the saved optimizer's,
        # not also this one's (a scheduler on either would change both).
        new_groups = deepcopy(
            [{k: v for k, v in sg.items() if k not in ("params", STATE_DICT_KEY)} for sg in saved_groups]
        )
        for g, ng in zip(groups, new_groups):
            ng["params"] = g["params"]
            if "param_names" in g and "param_names" not in ng:
                ng["param_names"] = g["param_names"]
        self.__setstate__({"state": new_state, "param_groups": new_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _load_param_state(
        self, p: torch.Tensor, saved: Any, gi: int, pi: int, rows: bool = False
    ) -> dict[str, Any]:
        where = f"parameter {pi} of param group {gi} (shape {tuple(p.shape)})"
        spec = self._saved_spec(p, rows)
        if not isinstance(saved, dict):
            raise ValueError(f"state of {where} must be a dict, got {type(saved).__name__}")
        expected = set(spec) | {"step"}
        if set(saved) != expected:
            raise ValueError(
                f"state of {where} has keys {sorted(saved, key=str)}, but {type(self).__name__} keeps "
                f"{sorted(expected)} for it ({'8-bit' if self.uses_8bit(p) else '32-bit'} state)"
            )
        step = saved["step"]
        if (
            torch.is_tensor(step)
            and step.numel() == 1
            and not step.is_floating_point()
            and not step.is_complex()
        ):
            step = step.item()
        # An integer, and no float even if integral: qpeft writes ints, and a float count
        # past 2**24 (float32) or 2**53 (float64) has lost steps already.
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step <= MAX_STEP:
            raise ValueError(
                f"state 'step' of {where} must be an integer in [0, {MAX_STEP}] (the count after the next "
                f"update goes to the step op as an int64), got {type(saved['step']).__name__} {saved['step']!r}"
            )
        step = int(step)
        eight_dtensor = self.uses_8bit(p) and _dist.is_dtensor(p)
        if eight_dtensor and not rows:
            raise ValueError(
                f"state of {where}: a format-{STATE_FORMAT} state dict (8-bit absmax as flat blocks) cannot "
                "be loaded into a DTensor parameter; save it with state_dict_layout='rows'"
            )
        for sname, (shape, dtype) in spec.items():
            t = saved[sname]
            if not torch.is_tensor(t):
                raise ValueError(f"state '{sname}' of {where} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"state '{sname}' of {where} has dtype {t.dtype}, expected {dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"state '{sname}' of {where} has shape {tuple(t.shape)}, expected {shape}: the checkpoint "
                    "belongs to a different model or parameter order"
                )
        state = self._new_state(p)
        state["step"] = step
        local_state = self._local_state(state)
        if rows and self.uses_8bit(p):
            codes = dict(zip(("signed", "unsigned"), self._qmaps(_dist.local(p).device)))
            for mname, signed in self._STATE_8:
                q = _dist.localize(saved[f"{mname}_q"], p, tuple(p.shape))
                table = _dist.localize(saved[f"{mname}_absmax"], p, spec[f"{mname}_absmax"][0])
                dev = local_state[f"{mname}_q"].device
                code = codes["signed" if signed else "unsigned"]
                new_q, absmax = _dist.rows_to_state(q.to(dev), table.to(dev), code, where)
                local_state[f"{mname}_q"].view(-1).copy_(new_q)
                local_state[f"{mname}_absmax"].copy_(absmax)
        else:
            for sname, (shape, _) in spec.items():
                local_state[sname].copy_(_dist.localize(saved[sname], p, shape))
        return state
