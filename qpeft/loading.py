"""Load safetensors checkpoints into a meta-device model, quantizing as each tensor is read.

``qpeft.convert`` on a model built on the meta device gives 4-bit layers with meta weights
(shapes and formats, no values). :func:`load_safetensors` then reads the checkpoint tensor
by tensor with safetensors' lazy ``safe_open``: each targeted linear weight is read (only
the requested rows, through ``get_slice``), quantized and dropped before the next is read;
every other tensor is assigned dense in the dtype the model declares for it. Peak memory
is the model's 4-bit and dense parameters plus one tensor (or one row range) read densely.
See docs/distributed.md, "Loading on the meta device".
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

from . import functional as qf
from ._formats import NESTED_BLOCKSIZE
from .nn import IA3Linear, Linear4bit
from .nn.lora import LoRAAdapter
from .quant_state import QuantState
from .weight4bit import Weight4bit

__all__ = ["load_safetensors"]

RowsFn = Callable[[str, int], "tuple[int, int] | None"]


def _files(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            index = os.path.join(p, "model.safetensors.index.json")
            if os.path.exists(index):
                with open(index) as fh:
                    names = sorted(set(json.load(fh)["weight_map"].values()))
            else:
                names = sorted(n for n in os.listdir(p) if n.endswith(".safetensors"))
            if not names:
                raise FileNotFoundError(f"no .safetensors file in {p}")
            files += [os.path.join(p, n) for n in names]
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"no such safetensors file or directory: {p}")
    return files


def _key(name: str) -> str:
    """The checkpoint key of a converted model's tensor: qpeft's wrappers hold the original
    layer as ``base_layer`` (QLoRALinear, IA3Linear), which the checkpoint does not name."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _read_rows(sl, r0: int, r1: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Rows [r0, r1) of a safetensors slice as a dense tensor (the only dense read of a 4-bit
    target: tests/test_meta_load.py counts the live results)."""
    return sl[r0:r1].to(device=device, dtype=dtype)


def _quantize_rows(sl, layer: Linear4bit, r0: int, r1: int, dtype, device) -> Weight4bit:
    """Rows [r0, r1) of the checkpoint weight quantized in ``layer``'s format, bit for bit the
    rows [r0, r1) of the whole weight quantized (``Weight4bit._row_slice`` of it).

    Blockwise codes and absmax depend only on their block, so the rows' own quantization is
    the whole's restricted to them. Double quantization is not local: its offset is the mean
    of every block's absmax, so for a strict row range the other rows are streamed in
    block-aligned chunks of at most the range's size (their absmax kept, 4 bytes per block,
    their values dropped) and the nested statistics computed over all absmax, as
    ``qf.quantize_4bit`` does, then sliced as ``_row_slice`` slices them."""
    rows, k = sl.get_shape()
    bs, qt, nested = layer.blocksize, layer.quant_type, layer.double_quant
    full = r0 == 0 and r1 == rows
    x = _read_rows(sl, r0, r1, dtype, device)
    packed, state = qf.quantize_4bit(x, bs, qt, double_quant=nested and full)
    del x
    if full or not nested:
        return Weight4bit(packed, state)
    align = bs // math.gcd(k, bs)
    step = max(align, (r1 - r0) // align * align)
    absmax = []
    for a, b in ((0, r0), (r1, rows)):
        for c0 in range(a, b, step):
            chunk = _read_rows(sl, c0, min(c0 + step, b), dtype, device)
            absmax.append(qf.quantize_4bit(chunk, bs, qt, double_quant=False)[1].absmax)
            del chunk
        if a == 0:
            absmax.append(state.absmax)
    absmax = torch.cat(absmax)
    offset = absmax.mean()  # the same fp32 reduction quantize_4bit runs on the same vector
    codes, state2 = qf.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    whole = QuantState(
        absmax=codes,
        shape=(rows, k),
        code=state.code,
        blocksize=bs,
        quant_type=qt,
        dtype=dtype,
        offset=offset,
        state2=state2,
    )
    # _row_slice reads only the packed bytes' size: a stride-0 stand-in for the whole's codes
    stand_in = torch.zeros(1, 1, dtype=torch.uint8, device=device).expand((rows * k + 1) // 2, 1)
    sliced = Weight4bit(stand_in, whole)._row_slice(r0, r1)
    return Weight4bit(packed, sliced.quant_state)


def _set_param(owners, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    p = nn.Parameter(value, requires_grad=requires_grad)
    for m in owners:
        m._parameters[name] = p


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2), or the tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def _shard_rows(t: torch.Tensor, key: str) -> tuple[int, int] | None:
    """The rows [r0, r1) this rank holds of an FSDP2-sharded parameter (``torch.chunk`` on
    dim 0, as FSDP2 splits it), or None for a plain tensor."""
    if not hasattr(t, "to_local"):
        return None
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)
    if len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(
            f"{key}: load_safetensors loads DTensors sharded on dim 0 over a 1-D mesh (FSDP2's "
            f"fully_shard), not placements {placements}"
        )
    rows, world = t.shape[0], t.device_mesh.size()
    chunk = -(rows // -world)
    r0 = min(t.device_mesh.get_local_rank() * chunk, rows)
    return r0, min(r0 + chunk, rows)


def _fill(m: nn.Module, name: str, device, init) -> None:
    """``init`` applied to parameter ``name`` of ``m``: in place on its (local) storage, or on a
    new tensor on ``device`` when it is still on the meta device."""
    p = getattr(m, name)
    with torch.no_grad():
        if _local(p).is_meta:
            new = torch.empty(p.shape, device=device, dtype=p.dtype)
            init(new)
            m._parameters[name] = nn.Parameter(new, requires_grad=p.requires_grad)
        else:
            init(_local(p))


def _init_lora_a(init: str, r: int):
    # LoRAAdapter.__init__'s draws: PEFT's Kaiming-uniform (a = sqrt(5)), or N(0, 1/r); on a
    # row shard [r / world, in] the fan-in (dim 1) and so the bound are the whole's
    if init == "default":
        return lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return lambda t: nn.init.normal_(t, std=1.0 / r)


def _init_fns(model: nn.Module) -> dict[int, Callable[[nn.Module], None]]:
    """``id(module) -> _init_weights`` of the innermost transformers model holding it (a
    composite model's sub-models have their own)."""
    out: dict[int, Callable[[nn.Module], None]] = {}

    def walk(m: nn.Module, fn) -> None:
        if callable(getattr(m, "_init_weights", None)) and hasattr(m, "config"):
            fn = m._init_weights
        if fn is not None:
            out[id(m)] = fn
        for child in m.children():
            walk(child, fn)

    walk(model, None)
    return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _buffers_from_init(m: nn.Module, names: list[str], init_weights, device) -> dict[str, torch.Tensor]:
    """Non-persistent buffers ``names`` of ``m`` as transformers computes them on load: its
    model's ``_init_weights(module)`` (e.g. Gemma's ``embed_scale``, BERT's ``position_ids``)
    run on a stand-in for ``m`` whose other tensors are meta copies, so nothing loaded is
    touched and no parameter is allocated. It runs twice, from all-zero and all-one bytes; the
    buffers that come out equal are the ones it sets (the others are left out)."""
    runs = []
    for fill in (0, 255):
        stand_in = copy.copy(m)
        stand_in._modules = {}
        stand_in._parameters = {
            n: None if p is None else nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for n, p in m._parameters.items()
        }
        stand_in._buffers = {
            n: None if b is None else torch.empty_like(b, device="meta") for n, b in m._buffers.items()
        }
        for n in names:
            b = m._buffers[n]
            stand_in._buffers[n] = torch.empty(b.shape, dtype=b.dtype, device=device)
            _bytes(stand_in._buffers[n]).fill_(fill)
        try:
            with torch.no_grad():
                init_weights(stand_in)
        except Exception:  # an _init_weights that needs more of the module than the stand-in has
            return {}
        runs.append({n: stand_in._buffers[n] for n in names})
    zero, one = runs
    like = {n: (m._buffers[n].shape, m._buffers[n].dtype) for n in names}
    return {
        n: zero[n]
        for n in names
        if isinstance(zero[n], torch.Tensor)
        and not zero[n].is_meta
        and (zero[n].shape, zero[n].dtype) == like[n] == (one[n].shape, one[n].dtype)
        and torch.equal(_bytes(zero[n]), _bytes(one[n]))
    }


def _materialize_leftovers(model: nn.Module, was_meta: set, device) -> None:
    """Tensors the checkpoint does not hold that were on the meta device: qpeft adapters
    (initialized as their constructors would: LoRA A by PEFT's init, B zeros; IA3 ones) and
    non-persistent buffers a module computes from its config (transformers' rotary
    embeddings: rebuilt by constructing the module again on ``device``) or that its model's
    ``_init_weights`` sets (``_buffers_from_init``)."""
    init_fns = None
    for m in model.modules():
        if isinstance(m, LoRAAdapter) and (id(m), "lora_A") in was_meta:
            _fill(m, "lora_A", device, _init_lora_a(getattr(m, "_qpeft_init", "default"), m.r))
            _fill(m, "lora_B", device, lambda t: t.zero_())
        elif isinstance(m, IA3Linear) and (id(m), "ia3_l") in was_meta:
            _fill(m, "ia3_l", device, lambda t: t.fill_(1.0))
        meta_buffers = [n for n, _ in m.named_buffers(recurse=False) if (id(m), n) in was_meta]
        if meta_buffers and hasattr(m, "config") and not any(True for _ in m.parameters(recurse=False)):
            with torch.device(device):
                fresh = type(m)(m.config)
            for n in meta_buffers:
                m._buffers[n] = getattr(fresh, n)
            for attr, v in vars(fresh).items():  # e.g. attention_scaling, computed with inv_freq
                if not attr.startswith("_") and isinstance(v, (int, float)):
                    setattr(m, attr, v)
        elif meta_buffers:
            init_fns = _init_fns(model) if init_fns is None else init_fns
            if id(m) in init_fns:
                m._buffers.update(_buffers_from_init(m, meta_buffers, init_fns[id(m)], device))


def _renamer(model: nn.Module) -> Callable[[str], tuple[str, bool]] | None:
    """transformers' checkpoint key conversion for ``model`` (transformers >= 5 renames keys on
    load, e.g. GPT-NeoX's ``embed_out.weight`` -> ``lm_head.weight``): ``key -> (the model's
    key, whether a tensor conversion, not only a rename, is needed)``; None when transformers
    has none for the model."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # not a transformers model
        return None
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    if not renamings and not converters:
        return None

    def rename(key: str) -> tuple[str, bool]:
        new, converter = rename_source_key(key, renamings, converters)
        return new, converter is not None

    return rename


def load_safetensors(
    model: nn.Module,
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    device: torch.device | str = "cpu",
    rows: RowsFn | None = None,
    strict: bool = True,
) -> nn.Module:
    """Fill ``model`` (typically built on the meta device and ``qpeft.convert``-ed there) from
    safetensors files, quantizing each 4-bit layer's weight as it is read; returns ``model``.

    ``paths``: a file, a list of files, or a directory (its ``model.safetensors.index.json``
    shards, else every ``*.safetensors`` in it), as ``save_pretrained`` writes them.
    Checkpoint keys are the model's names without qpeft's ``base_layer``. Each 4-bit weight
    takes the format its layer declares (quant_type, blocksize, double_quant) and the dtype of
    its meta weight; dense parameters and persistent buffers are cast to the dtype the model
    declares for them and put on ``device``.

    ``rows(key, out_features)``: for a rank that should hold part of each 4-bit weight, the
    rows ``(r0, r1)`` of that weight to read and keep (None: all). Only those rows are read
    (``get_slice``), except that a double-quantized weight streams its other rows once, chunk
    by chunk, for the nested statistics (module doc of ``_quantize_rows``); the result is bit
    for bit rows [r0, r1) of the whole weight quantized, so the bounds must fall on
    quantization blocks (``ValueError`` otherwise). The layer then holds that row range.

    A checkpoint that is already 4-bit (bitsandbytes' ``weight.absmax`` /
    ``weight.quant_state.bitsandbytes__*`` keys) is refused with a ValueError before
    anything is read: ``qpeft.load_quantized`` loads those.

    ``strict``: raise if a tensor the model needs is missing from the checkpoint, or the
    checkpoint has a tensor the model lacks (a ``KeyError`` naming them); otherwise those stay
    as they are / are skipped.
    """
    from safetensors import safe_open

    device = torch.device(device)
    was_meta, real = set(), []
    sharded_meta = False
    for mname, m in model.named_modules():
        for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            if t is not None and _local(t).is_meta:
                was_meta.add((id(m), n))
                sharded_meta |= hasattr(t, "to_local")
            elif t is not None:
                real.append(f"{mname}.{n}" if mname else n)
    if sharded_meta and real:
        raise ValueError(
            f"an FSDP2-sharded meta model is loaded through its to_empty, which would discard the tensors "
            f"already materialized ({real[:4]}{' ...' if len(real) > 4 else ''}): shard a model that is "
            "wholly on the meta device"
        )
    if sharded_meta:
        # FSDP2 (fully_shard on the meta model): its own to_empty allocates every rank's local
        # shards (4-bit ones in their layers' format, zero) for the loader to copy into
        model.to_empty(device=device)
    four_bit: dict[str, Linear4bit] = {}
    dense: dict[str, tuple[list[nn.Module], str, torch.Tensor, bool]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        prefix = mname + "." if mname else ""
        for pname, p in m.named_parameters(recurse=False):
            key = _key(prefix + pname)
            if isinstance(m, Linear4bit) and pname == "weight":
                four_bit[key] = m
            elif isinstance(m, LoRAAdapter) or (isinstance(m, IA3Linear) and pname == "ia3_l"):
                continue  # adapters: not in a base checkpoint
            elif key in dense:
                dense[key][0].append(m)
            else:
                dense[key] = ([m], pname, p, False)
        for bname, b in m.named_buffers(recurse=False):
            if b is None or bname in m._non_persistent_buffers_set:
                continue
            key = _key(prefix + bname)
            if key in dense:
                dense[key][0].append(m)
            else:
                dense[key] = ([m], bname, b, True)
    seen_ids: dict[int, str] = {}
    for key, (_, _, t, _) in list(dense.items()):  # tied parameters: load once, under any name
        if id(t) in seen_ids:
            dense[seen_ids[id(t)]][0].extend(dense.pop(key)[0])
        else:
            seen_ids[id(t)] = key
    aliases = {k: seen_ids[id(t)] for k, (_, _, t, _) in dense.items()}
    # keys the model does not have under their own name: transformers' renames for the model's
    # architecture where they are plain renames; those it converts (e.g. per-expert weights
    # fused into one tensor) are refused before anything is read
    files, renamed, converted = _files(paths), {}, []
    renamer = None
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in four_bit or key in dense or key in aliases:
                    continue
                if ".quant_state.bitsandbytes__" in key or key.endswith(".weight.absmax"):
                    # a 4-bit checkpoint (save_quantized, transformers + bitsandbytes): its
                    # weights are packed codes, which this loader would read as dense values
                    raise ValueError(
                        f"load_safetensors: {path} is already quantized to 4 bits (it holds {key!r}, "
                        "bitsandbytes' layout); load_safetensors quantizes dense checkpoints as it reads "
                        "them: load this one with qpeft.load_quantized(model, file), which also takes a "
                        "model built on the meta device"
                    )
                renamer = renamer or _renamer(model) or (lambda k: (k, False))
                new, conversion = renamer(key)
                if conversion:
                    converted.append(f"{key} -> {new}")
                elif new in four_bit or new in dense or new in aliases:
                    renamed[key] = new
    if converted:
        raise NotImplementedError(
            f"load_safetensors: the checkpoint stores {type(model).__name__}'s weights under keys that "
            f"transformers converts on load (not only renames), which is not supported: "
            f"{converted[:4]}{' ...' if len(converted) > 4 else ''}; load the model with from_pretrained "
            "and qpeft.convert it (docs/distributed.md, 'Loading on the meta device')"
        )
    loaded, unexpected = set(), []
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for file_key in f.keys():
                key = renamed.get(file_key, file_key)
                if key in four_bit:
                    layer = four_bit[key]
                    sl = f.get_slice(file_key)
                    shape = tuple(sl.get_shape())
                    if shape != (layer.out_features, layer.in_features):
                        raise ValueError(
                            f"{key}: the checkpoint holds shape {list(shape)}, the model's 4-bit layer "
                            f"[{layer.out_features}, {layer.in_features}]"
                        )
                    shard = _shard_rows(layer.weight, key)
                    if shard is not None:  # FSDP2: this rank's rows, copied into its local shard
                        if rows is not None:
                            raise ValueError("rows= is for plain tensors; an FSDP2 shard's rows are its own")
                        local = _local(layer.weight)
                        w = _quantize_rows(sl, layer, *shard, local.dtype, local.device)
                        local.copy_(w)
                        loaded.add(key)
                        continue
                    r0, r1 = (rows(key, shape[0]) if rows is not None else None) or (0, shape[0])
                    if not 0 <= r0 <= r1 <= shape[0]:
                        raise ValueError(f"{key}: rows ({r0}, {r1}) are not within [0, {shape[0]}]")
                    layer.weight._row_slice(r0, r1)  # refuses bounds inside a block, on the meta weight
                    w = _quantize_rows(sl, layer, r0, r1, layer.weight.dtype, device)
                    layer.weight = nn.Parameter(w, requires_grad=False)
                    loaded.add(key)
                elif key in dense or key in aliases:
                    owners, name, old, is_buffer = dense[aliases.get(key, key)]
                    sl = f.get_slice(file_key)
                    if tuple(sl.get_shape()) != tuple(old.shape):
                        raise ValueError(
                            f"{key}: the checkpoint holds shape {list(sl.get_shape())}, the model {list(old.shape)}"
                        )
                    shard = _shard_rows(old, key)
                    if shard is not None:  # FSDP2: this rank's rows into its local shard
                        local = _local(old)
                        with torch.no_grad():
                            local.copy_(sl[shard[0] : shard[1]].to(dtype=local.dtype))
                        loaded.add(aliases.get(key, key))
                        continue
                    value = f.get_tensor(file_key).to(device=device, dtype=old.dtype)
                    if is_buffer:
                        for m in owners:
                            m._buffers[name] = value
                    else:
                        _set_param(owners, name, value, old.requires_grad)
                    loaded.add(aliases.get(key, key))
                else:
                    unexpected.append(file_key)
    missing = [k for k in [*four_bit, *dense] if k not in loaded]
    if strict and (missing or unexpected):
        raise KeyError(
            f"load_safetensors: missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}; "
            f"in the checkpoint but not the model: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    _materialize_leftovers(model, was_meta, device)
    if strict:
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if _local(t).is_meta]
        if left:
            raise RuntimeError(
                f"load_safetensors: still on the meta device after loading: {left[:8]}"
                f"{' ...' if len(left) > 8 else ''}; the checkpoint does not hold them and qpeft cannot "
                "compute them: set them before use"
            )
    return model
