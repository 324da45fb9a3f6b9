"""The base of qpeft's optimizers: state allocation (32-bit or blockwise 8-bit,
paged or not), the step loop over param groups, state accounting, and
state_dict/load_state_dict with validation.

Each optimizer step calls one registered op per parameter (``torch.ops.qpeft.*``,
layer below); the subclasses (adamw.py, lion.py) say which op and which state.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from math import prod
from typing import Any

import torch

from .._formats import FLOAT_DTYPES, dynamic_map
from .._optim_math import MIN_8BIT_NUMEL, state_blocks
from .paging import PAGE_MIN_NUMEL, StatePager

STATE_DICT_KEY = "qpeft"
_STRIDED = torch.strided
STATE_FORMAT = 1


def _check_param(p: torch.Tensor, where: str) -> None:
    if p.is_complex():
        raise TypeError(
            f"{where} is complex ({p.dtype}); qpeft optimizers support float32/float16/bfloat16 "
            "parameters only (optimize torch.view_as_real(param) instead)"
        )
    if p.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{where} has dtype {p.dtype}; qpeft optimizers support float32, float16 and bfloat16"
        )


class QpeftOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` over qpeft's fused step ops.

    Args (beyond the algorithm's hyperparameters):
        optim_bits: 32 (fp32 state) or 8 (blockwise 8-bit state; parameters with
            fewer than ``min_8bit_size`` elements keep fp32 state).
        paged: keep the state of parameters with at least ``page_min_numel``
            elements in paged (CUDA unified) memory. No effect on CPU parameters.
        page_out: after each group's update, prefetch its paged state back to host.
        state_memory: the paged-memory provider (default: CUDA managed memory).
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
    ) -> None:
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        if min_8bit_size < 1:
            raise ValueError(f"min_8bit_size must be >= 1, got {min_8bit_size}")
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self._pager = StatePager(paged, page_out, page_min_numel, state_memory)
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(params, defaults)
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                _check_param(p, f"parameter {pi} of param group {gi}")

    # --- what a parameter's state looks like ---------------------------------------

    @property
    def paged(self) -> bool:
        return self._pager.paged

    @property
    def page_out(self) -> bool:
        return self._pager.page_out

    def uses_8bit(self, p: torch.Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _state_spec(self, p: torch.Tensor) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> (shape, dtype) of each per-element state tensor of p."""
        if not self.uses_8bit(p):
            return {name: (tuple(p.shape), torch.float32) for name in self._STATE_32}
        spec = {}
        for name, _signed in self._STATE_8:
            spec[f"{name}_q"] = (tuple(p.shape), torch.uint8)
            spec[f"{name}_absmax"] = ((state_blocks(p.numel()),), torch.float32)
        return spec

    def _qmaps(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(signed, unsigned) dynamic maps on ``device``, made once per device."""
        if device not in self._maps:
            self._maps[device] = (dynamic_map(True, device), dynamic_map(False, device))
        return self._maps[device]

    def _new_state(self, p: torch.Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": 0}
        for name, (shape, dtype) in self._state_spec(p).items():
            state[name] = self._pager.zeros(p, shape, dtype)
        if self.uses_8bit(p):
            # A zero state: absmax 0 and the code of 0.0 (dequantizes to +0.0).
            signed, unsigned = self._qmaps(torch.device("cpu"))
            for name, is_signed in self._STATE_8:
                code = signed if is_signed else unsigned
                state[f"{name}_q"].fill_(int((code == 0).nonzero()[0, 0]))
        return state

    def _state_tensors(self, state: dict[str, Any]) -> list[torch.Tensor]:
        return [v for k, v in state.items() if k != "step" and torch.is_tensor(v)]

    # --- the step ---------------------------------------------------------------------

    def _update(self, items: list, group: dict[str, Any], eight_bit: bool) -> None:
        """Update (param, grad, state) items of one group, device and state layout:
        subclasses call their torch.ops.qpeft multi-tensor step op once."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient. Paged state of each group
        is prefetched to its device before the group's updates (and paged out after
        them with page_out=True), all on torch's current stream."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        paged = self._pager.paged
        for gi, group in enumerate(self.param_groups):
            # One op call per (device, state layout): on CPU one parallel region for
            # all of the group's tensors. The op updates in place, so a non-contiguous
            # parameter is stepped as a contiguous copy and written back. This loop
            # runs per parameter every step: it does no more than it must (the op
            # checks dtypes, sizes and devices; a parameter is checked here once,
            # when its state is made).
            batches: dict[tuple[torch.device, bool], list] = defaultdict(list)
            copies = []
            for pi, p in enumerate(group["params"]):
                grad = p.grad
                if grad is None:
                    continue
                if grad.layout is not _STRIDED:
                    raise TypeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(parameter {pi} of param group {gi} has a {grad.layout} gradient)"
                    )
                state = self.state[p]
                if not state:
                    _check_param(p, f"parameter {pi} of param group {gi}")
                    state.update(self._new_state(p))
                state["step"] += 1
                work = p
                if not p.is_contiguous():
                    work = p.contiguous()
                    copies.append((p, work))
                batches[(p.device, self.uses_8bit(p))].append((work, grad, state))
            by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
            if paged:
                for items in batches.values():
                    for work, _, state in items:
                        by_device[work.device].extend(self._state_tensors(state))
                for device, tensors in by_device.items():
                    self._pager.before_update(tensors, device)
            for (_, eight_bit), items in batches.items():
                self._update(items, group, eight_bit)
            for p, work in copies:
                p.copy_(work)
            for device, tensors in by_device.items():
                self._pager.after_update(tensors, device)
        return loss

    # --- accounting -----------------------------------------------------------------

    def state_bytes(self) -> list[int]:
        """Bytes of per-element state of each parameter, in param_groups order (the
        layout this optimizer gives it, allocated yet or not; the step counter and
        the two shared 8-bit maps are not per-element state and are not counted)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                out.append(
                    sum(
                        prod(shape) * torch.empty((), dtype=dt).element_size()
                        for shape, dt in self._state_spec(p).values()
                    )
                )
        return out

    def state_bytes_per_param(self) -> float:
        """Optimizer state bytes per parameter element: 8.0 with fp32 AdamW state,
        2 + 8/256 = 2.03125 for 8-bit AdamW state of tensors whose size is a multiple
        of 256 (one byte per moment plus one fp32 absmax per 256 elements and moment)."""
        numel = sum(p.numel() for g in self.param_groups for p in g["params"])
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
        """Where p's state lives or will live: 'paged', 'device' or 'host'."""
        return self._pager.placement(p)

    # --- checkpoints ------------------------------------------------------------------

    def _format_tag(self) -> dict[str, Any]:
        return {
            "optimizer": type(self).__name__,
            "algorithm": self.algorithm,
            "optim_bits": self.optim_bits,
            "min_8bit_size": self.min_8bit_size,
            "format": STATE_FORMAT,
        }

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus a ``"qpeft"`` entry naming the state format. The 8-bit
        states are saved as they are (uint8 codes and fp32 absmax): resuming is bit-exact.
        Paged and unpaged variants of one algorithm share the format."""
        sd = super().state_dict()
        sd[STATE_DICT_KEY] = self._format_tag()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict written by a qpeft optimizer of the same algorithm and state
        bits (paged or not). Raises ValueError for anything else: another optimizer's
        state dict, other groups/parameter counts, or states whose keys, dtypes or
        shapes do not fit the parameters."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(
                f"{name}.load_state_dict expects an optimizer state_dict with 'state' and 'param_groups'"
            )
        tag = state_dict.get(STATE_DICT_KEY)
        if not isinstance(tag, dict):
            raise ValueError(
                f"{name} cannot load this state_dict: it has no '{STATE_DICT_KEY}' entry, so it was not written by "
                "a qpeft optimizer (a torch.optim or bitsandbytes state_dict has a different state layout)"
            )
        if tag.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{name} cannot load state format {tag.get('format')!r} (this version reads {STATE_FORMAT})"
            )
        if (tag.get("algorithm"), tag.get("optim_bits")) != (self.algorithm, self.optim_bits):
            raise ValueError(
                f"this state_dict was written by {tag.get('optimizer')} ({tag.get('algorithm')}, "
                f"{tag.get('optim_bits')}-bit state); {name} uses {self.algorithm} with {self.optim_bits}-bit state"
            )
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, this optimizer has {len(groups)}"
            )
        for gi, (g, sg) in enumerate(zip(groups, saved_groups)):
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
        index_of = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in groups))}

        new_state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)
        for key, saved in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(
                    f"the loaded state dict has state for parameter id {key!r}, which no group lists"
                )
            p = id_map[key]
            new_state[p] = self._load_param_state(p, saved, index_of[id(p)])

        new_groups = []
        for g, sg in zip(groups, saved_groups):
            ng = dict(sg)
            ng["params"] = g["params"]
            if "param_names" in g and "param_names" not in sg:
                ng["param_names"] = g["param_names"]
            new_groups.append(ng)
        self.__setstate__({"state": new_state, "param_groups": new_groups})

    def _load_param_state(self, p: torch.Tensor, saved: Any, index: int) -> dict[str, Any]:
        where = f"parameter {index} (shape {tuple(p.shape)})"
        spec = self._state_spec(p)
        if not isinstance(saved, dict):
            raise ValueError(f"state of {where} must be a dict, got {type(saved).__name__}")
        expected = set(spec) | {"step"}
        if set(saved) != expected:
            raise ValueError(
                f"state of {where} has keys {sorted(saved)}, but {type(self).__name__} keeps {sorted(expected)} "
                f"for it ({'8-bit' if self.uses_8bit(p) else '32-bit'} state)"
            )
        step = saved["step"]
        if torch.is_tensor(step):
            step = step.item()
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"state 'step' of {where} must be a non-negative integer, got {saved['step']!r}")
        for name, (shape, dtype) in spec.items():
            t = saved[name]
            if not torch.is_tensor(t):
                raise ValueError(f"state '{name}' of {where} must be a tensor, got {type(t).__name__}")
            if t.dtype != dtype:
                raise ValueError(f"state '{name}' of {where} has dtype {t.dtype}, expected {dtype}")
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"state '{name}' of {where} has shape {tuple(t.shape)}, expected {shape}: the checkpoint "
                    "belongs to a different model or parameter order"
                )
        state = self._new_state(p)
        state["step"] = step
        for name in spec:
            state[name].copy_(saved[name])
        return state
