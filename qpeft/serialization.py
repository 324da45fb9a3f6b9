"""Adapters in HF PEFT's format, and 4-bit base weights in the bitsandbytes layout.

``save_adapter(model, dir)`` writes what ``PeftModel.save_pretrained`` writes for LoRA:
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight``
([r, in]), ``...lora_B.weight`` ([out, r]), DoRA's ``...lora_magnitude_vector`` ([out]),
and ``adapter_config.json`` (peft_type LORA, r, lora_alpha, target_modules, rank_pattern /
alpha_pattern for layers that differ, use_rslora, use_dora, lora_dropout), and modules
trained in full (modules_to_save, a task model's head among them: see
``qpeft.convert.TASK_HEADS``) whole under their own keys. So
``peft.PeftModel.from_pretrained(base, dir)`` loads it on the same unquantized base model,
and ``load_adapter`` loads a PEFT-saved LoRA adapter into a converted model. PEFT's
``lora_bias=True`` (a bias on lora_B) has no counterpart in qpeft's adapters: such an
adapter (the config flag, or any ``lora_B.bias`` key) is refused with a ValueError, as is
any other LoRA key whose tail qpeft does not know, rather than dropped or loaded in
another tensor's place.

``save_quantized`` / ``load_quantized`` write and read the base model (no adapters) with
the keys transformers + bitsandbytes use for a 4-bit model: ``<path>.weight`` (packed
uint8), ``<path>.weight.absmax``, ``...quant_map``, ``...nested_absmax``,
``...nested_quant_map``, ``...quant_state.bitsandbytes__nf4``, ``<path>.bias``.

Saves are crash-safe: ``save_adapter`` assembles the new directory beside the old one and
swaps it in atomically, ``save_quantized`` writes a temporary file and renames it, so a
reader never sees a torn file or weights and config from different saves. Loads treat the
files as untrusted input: everything is validated (config field types, tensor dtypes,
finite values, complete 4-bit states) before the model changes.

safetensors is optional (a test extra): it is imported when a function needs it, and a
missing package raises an ImportError saying how to install it. ``load_adapter`` also
reads PEFT's older ``adapter_model.bin``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .convert import TASK_HEADS, names_module, task_heads
from .convert import task_type as _task_of
from .nn import IA3Linear, Linear4bit, QLoRALinear
from .nn.lora import LoRAAdapter
from .optim.distributed import is_dtensor

__all__ = ["load_adapter", "load_quantized", "save_adapter", "save_quantized"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
# <path>.<kind> then at most two segments: "weight", an adapter name (PEFT's in-memory
# names, e.g. "lora_A.default.weight", and its old DoRA "lora_magnitude_vector.default"),
# or a parameter other than the weight. _lora_key reads the tail and rejects what it
# does not know, whatever order the file's keys come in.
_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?P<tail>(?:\.[^.]+){0,2})$")
_BIAS_KEY = re.compile(r"^(?P<path>.+?)(?:\.base_layer)?\.bias$")
# with bias="all" PEFT also saves the biases its ModulesToSaveWrapper holds inside itself
# (<module>.original_module.<...>.bias, <module>.modules_to_save[.<adapter>].<...>.bias)
_WRAPPER_PARTS = ("original_module", "modules_to_save")


_LORA_BIAS = (
    "lora_bias (PEFT's LoraConfig(lora_bias=True): a bias on lora_B) is not supported: qpeft's "
    "LoRA adapters have no bias of their own"
)


def _lora_key(name: str) -> tuple[str, str] | None:
    """``(path, kind)`` of an adapter tensor's key (prefix removed): kind lora_A, lora_B or
    lora_magnitude_vector; None for a key that is not one. A LoRA key with a tail that
    names another tensor (lora_B's bias, anything unknown) raises ValueError: loading it
    in the weight's place, or dropping it, would change the adapter silently."""
    m = _KEY.match(name)
    if m is None:
        return None
    tail = m["tail"].split(".")[1:]
    param = tail[-1] if tail and tail[-1] in ("weight", "bias") else None
    adapter = tail[:-1] if param else tail
    if param == "bias":
        if m["kind"] == "lora_B":
            raise ValueError(f"{name}: {_LORA_BIAS}")
        raise ValueError(f"{name}: {m['kind']} has no bias in PEFT's LoRA format")
    if len(adapter) > 1 or (param is None and len(tail) > 1):
        raise ValueError(f"{name}: not a LoRA tensor this version of qpeft knows")
    return m["path"], m["kind"]


def _listed_names(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError(
            "saving and loading .safetensors files needs the safetensors package: pip install safetensors "
            "(or pip install 'qpeft[test]')"
        ) from None
    return st


def _linear_like_names(model: nn.Module) -> list[str]:
    """Names of the model's linear layers as the original model names them (a wrapper's
    base_layer is not a layer of its own)."""
    out, wrappers = [], []
    for n, m in model.named_modules():
        if any(n.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(m, (QLoRALinear, IA3Linear)):
            wrappers.append(n)
            out.append(n)
        elif isinstance(m, (nn.Linear, Linear4bit)):
            out.append(n)
    return out


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names (PEFT matches ``name == t or name.endswith('.' + t)``) when they select
    exactly ``names`` among the model's linear layers, else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n in _linear_like_names(model) if n.rsplit(".", 1)[-1] in leaves}
    return leaves if selected == set(names) else sorted(names)


def _modules_to_save(model: nn.Module, names, optional: Iterable[str] = ()) -> dict[str, nn.Module]:
    """PEFT's modules_to_save matching (a string suffix: qpeft.convert.names_module) over the model's modules. A name
    that matches none raises ValueError unless it is in ``optional`` (PEFT skips names the
    model lacks; qpeft does so where nothing would be lost)."""
    if not names:
        return {}
    names = [names] if isinstance(names, str) else list(names)
    optional = set(optional)
    found = {n: m for n, m in model.named_modules() if n and any(names_module(n, t) for t in names)}
    missing = [t for t in names if t not in optional and not any(names_module(n, t) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save names no module of the model: {missing}")
    wrapped = [n for n, m in found.items() if isinstance(m, (QLoRALinear, IA3Linear, Linear4bit))]
    if wrapped:
        raise ValueError(
            f"modules_to_save must be plain modules (e.g. embeddings, heads), not qpeft layers: {wrapped}"
        )
    return found


def _tie_partners(model: nn.Module, extra: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The modules outside ``extra`` that hold a tensor of a module in ``extra`` (``lm_head``
    of a tied model when ``embed_tokens`` is saved). qpeft trains the one tied tensor, which
    moves every holder, while PEFT trains a copy of each module it names and leaves the
    others as they were: they are saved too (and named in modules_to_save), so PEFT gives
    each the trained tensor."""
    shared = {id(t) for m in extra.values() for t in m.state_dict(keep_vars=True).values()}
    partners = {}
    for n, m in model.named_modules():
        if not n or any(n == e or n.startswith(e + ".") for e in extra):
            continue
        if any(id(t) in shared for t in [*m._parameters.values(), *m._buffers.values()] if t is not None):
            partners[n] = m
    wrapped = [n for n, m in partners.items() if isinstance(m, (QLoRALinear, IA3Linear, Linear4bit))]
    if wrapped:
        raise ValueError(
            f"{wrapped} share a tensor with modules_to_save {sorted(extra)} but are qpeft layers, which PEFT's "
            "format cannot hold in full; leave them out of modules_to_save or convert without them"
        )
    return partners


def _names_tensor(key: str, name: str) -> bool:
    """Whether tensor ``key`` lies in a module that modules_to_save entry ``name`` names."""
    parts = key.split(".")
    return any(names_module(".".join(parts[:i]), name) for i in range(1, len(parts)))


def _heads_to_save(model: nn.Module, task: str | None) -> dict[str, nn.Module]:
    """The task heads PEFT's task model trains in full and expects in the file (see
    qpeft.convert.TASK_HEADS); one that is a qpeft layer cannot be saved in a form PEFT loads."""
    heads = task_heads(model, task)
    quantized = [
        n
        for n, m in heads.items()
        if any(isinstance(c, (QLoRALinear, IA3Linear, Linear4bit)) for c in m.modules())
    ]
    if quantized:
        raise ValueError(
            f"{quantized} is the task head of this {task} model, which PEFT trains in full "
            "(modules_to_save) and expects whole in the adapter file, but here it holds qpeft "
            "layers; convert leaves task heads unconverted (qpeft.convert), or pass another "
            "task_type to save_adapter"
        )
    return heads


# --- crash-safe writes -----------------------------------------------------------------------
# Files are written under a temporary name beside their target, flushed to disk, then renamed
# over it, so a reader sees the old or the new content, never a torn file. The temporary names
# are ".<target name>.qpeft-tmp-<pid>-<random>": a save killed midway leaves one behind, and
# the next save into the same place removes those whose process is gone.
_TMP_TAG = ".qpeft-tmp-"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates the process: never probe, never delete
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def _temp_name(target: str) -> str:
    parent, base = os.path.split(target)
    return os.path.join(parent, f".{base}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(6)}")


def _remove_stale_temporaries(target: str) -> None:
    parent, base = os.path.split(target)
    prefix = f".{base}{_TMP_TAG}"
    for entry in os.listdir(parent):
        pid = entry[len(prefix) :].split("-", 1)[0]
        if not entry.startswith(prefix) or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        path = os.path.join(parent, entry)
        with contextlib.suppress(FileNotFoundError):  # another save may be cleaning up too
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)


def _fsync(path: str) -> None:
    """Flush a file, or a directory's entries, to disk (directories: POSIX only)."""
    is_dir = os.path.isdir(path)
    if is_dir and os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if is_dir else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:  # some file systems cannot sync directories; a file must reach the disk
            raise
    finally:
        os.close(fd)


def _new_file(path: str) -> None:
    # created with the process umask, like open(path, "w"), unlike mkstemp's 0600
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False where
    the platform or file system has no such call."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _swappable(target: str) -> bool:
    """Whether directory ``target`` may be replaced as a whole: it holds nothing but the
    adapter pair (regular files), is not a mount point, and is not the working directory or
    one above it. Anything else in it (a project's files, a mount, files another process is
    writing) must stay exactly as it is, which a swap of the directory cannot promise."""
    if os.path.ismount(target):
        return False
    cwd = os.getcwd()
    if cwd == target or cwd.startswith(target.rstrip(os.sep) + os.sep):
        return False
    for entry in os.scandir(target):
        if entry.name not in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) or not entry.is_file(follow_symlinks=False):
            return False
    return True


def _write_pair(
    directory: str, tensors: dict[str, torch.Tensor], config_bytes: bytes, temporary: bool
) -> tuple[str, str]:
    """The adapter pair written and flushed in ``directory`` (under temporary names with
    ``temporary``, else their own): (weights, config) paths."""
    st = _safetensors()
    weights, config = os.path.join(directory, ADAPTER_WEIGHTS), os.path.join(directory, ADAPTER_CONFIG)
    if temporary:
        weights, config = _temp_name(weights), _temp_name(config)
    try:
        st.save_file(tensors, weights, metadata={"format": "pt"})
        _fsync(weights)
        _new_file(config)
        with open(config, "wb") as f:
            f.write(config_bytes)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        for path in (weights, config):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        raise
    return weights, config


def _write_adapter_dir(target: str, tensors: dict[str, torch.Tensor], config_bytes: bytes) -> None:
    """Write the adapter pair (weights and config) into directory ``target``, changing nothing
    else in it.

    A new directory, or one that holds nothing but the pair (``_swappable``), is assembled
    beside the target and renamed in (an existing one swapped with one atomic exchange, or,
    without an exchange call, renamed aside first: for an instant the target is absent), so
    no reader ever sees weights and config from different saves. Into any other directory
    each file of the pair is written under a temporary name inside it and renamed over its
    target, weights then config: each file is whole, old or new, and nothing else in the
    directory is touched (it is never copied or rebuilt: a mount inside it, or a file another
    process writes meanwhile, stays); between the two renames a reader can find the new
    weights with the old config. That is also the fallback where the parent directory is
    not writable."""
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise FileExistsError(f"{target} exists and is not a directory")
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if os.path.isdir(target):
            _remove_stale_temporaries(os.path.join(target, name))
    if os.path.isdir(target) and not _swappable(target):
        _write_in_place(target, tensors, config_bytes)
        return
    if os.access(parent, os.W_OK | os.X_OK):
        _remove_stale_temporaries(target)
    staging = _temp_name(target)
    try:
        os.mkdir(staging)
    except PermissionError:
        if not os.path.isdir(target):
            raise
        _write_in_place(target, tensors, config_bytes)  # the parent is not ours to write
        return
    try:
        if os.path.isdir(target):
            os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
        weights, config = _write_pair(staging, tensors, config_bytes, temporary=False)
        if os.path.isdir(target) and not _swappable(target):
            # something else appeared in the target while the pair was written: it stays
            os.replace(weights, os.path.join(target, ADAPTER_WEIGHTS))
            os.replace(config, os.path.join(target, ADAPTER_CONFIG))
            _fsync(target)
            return
        _fsync(staging)
        if not os.path.isdir(target):
            os.rename(staging, target)
        elif not _exchange(staging, target):
            old = _temp_name(target)
            os.rename(target, old)
            try:
                os.rename(staging, target)
            except BaseException:
                os.rename(old, target)
                raise
            staging = old
        # after the swap ``staging`` names the previous version (the old pair alone): removed below
        _fsync(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_in_place(target: str, tensors: dict[str, torch.Tensor], config_bytes: bytes) -> None:
    weights, config = _write_pair(target, tensors, config_bytes, temporary=True)
    try:
        os.replace(weights, os.path.join(target, ADAPTER_WEIGHTS))
        os.replace(config, os.path.join(target, ADAPTER_CONFIG))
    finally:
        for path in (weights, config):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    _fsync(target)


def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    modules_to_save: Iterable[str] | None = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write adapter ``adapter_name`` (default: the active one) of every QLoRALinear of ``model``
    in PEFT's LoRA format (see the module doc). Layers without that adapter are left out.
    ``modules_to_save``: names of other modules trained in full (e.g. ``["embed_tokens",
    "lm_head"]`` after adding tokens), saved whole as PEFT saves its modules_to_save; the
    modules that share a tensor with them (``lm_head`` of a tied model when ``embed_tokens``
    is named) are saved and named too, as training moved them as well. The
    task heads PEFT's task models always train in full (``classifier`` / ``score`` for
    SEQ_CLS and TOKEN_CLS, ``qa_outputs`` for QUESTION_ANS; the task from ``task_type`` or
    the model's class name) are saved with them, so ``PeftModel.from_pretrained`` finds
    them.

    Under FSDP2 (adapters that are DTensors) the tensors are gathered with ``full_tensor()``,
    a collective, so every rank must call it; rank 0 of the default process group writes
    the directory, and every rank returns after the write (or raises its error)
    (docs/distributed.md, "Adapters, merging")."""
    _safetensors()  # fail before any work when the package is missing
    task = task_type if task_type is not None else _task_of(model)
    extra = _modules_to_save(model, modules_to_save) | _heads_to_save(model, task)
    extra |= _tie_partners(model, extra)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    if not layers:
        ia3 = [n for n, m in model.named_modules() if isinstance(m, IA3Linear)]
        if ia3:
            raise ValueError(
                f"the model's adapters are IA3 ({_listed_names(ia3)} are IA3Linear, from convert(method='ia3')); "
                "save_adapter writes PEFT's LoRA format only and qpeft cannot write PEFT's IA3 format. Save the "
                "IA3 vectors from the state dict instead: {k: v for k, v in model.state_dict().items() if "
                "k.endswith('.ia3_l')} (torch.save or safetensors), and load them into the same converted model "
                "with model.load_state_dict(vectors, strict=False)"
            )
        raise ValueError("the model has no qpeft QLoRALinear layer; run qpeft.convert(model) first")
    if adapter_name is None:
        actives = {m.active_adapter for _, m in layers if m.active_adapter is not None}
        if len(actives) != 1:
            raise ValueError(
                f"pass adapter_name: the layers' active adapters are {sorted(map(str, actives))}"
            )
        adapter_name = actives.pop()
    chosen = [(n, m, m.adapters[adapter_name]) for n, m in layers if adapter_name in m.adapters]
    if not chosen:
        raise KeyError(f"no layer has an adapter named {adapter_name!r}")
    if any(m.merged_adapter == adapter_name for _, m, _ in chosen):
        raise RuntimeError(
            f"adapter {adapter_name!r} is merged into the base weights; unmerge it before saving"
        )
    flavours = {(ad.use_rslora, ad.use_dora, ad.dropout_p) for _, _, ad in chosen}
    if len(flavours) > 1:
        raise ValueError("PEFT's format holds one use_rslora/use_dora/dropout per adapter; the layers differ")
    use_rslora, use_dora, dropout = flavours.pop()
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    sharded = [False]

    def whole(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if hasattr(t, "full_tensor"):  # FSDP2's DTensor: gather it (every rank calls this)
            sharded[0] = True
            t = t.full_tensor()
        return t.contiguous().cpu()

    for n, m, ad in chosen:
        key = PREFIX + n
        tensors[key + ".lora_A.weight"] = whole(ad.lora_A)
        tensors[key + ".lora_B.weight"] = whole(ad.lora_B)
        if ad.use_dora:
            tensors[key + ".lora_magnitude_vector"] = whole(ad.magnitude)
        if (m.train_bias or ad.bias != "none") and m.base_layer.bias is not None:
            tensors[key + ".base_layer.bias"] = whole(m.base_layer.bias)
        ranks[n], alphas[n] = ad.r, ad.alpha
    bias_all = any(ad.bias == "all" for _, _, ad in chosen)
    if bias_all:  # PEFT's bias="all": every bias of the model, named as PEFT's model names it
        adapted = {n for n, _, _ in chosen}
        wrappers = _wrapper_paths(model)
        for k, t in model.state_dict(keep_vars=True).items():
            if not k.endswith(".bias"):
                continue
            w = next((w for w in wrappers if k.startswith(w + ".base_layer.")), None)
            if w is not None and w not in adapted:  # a plain layer in PEFT's model
                k = w + k[len(w) + len(".base_layer") :]
            tensors[PREFIX + k] = whole(t)
    for n, module in extra.items():
        for pname, t in module.state_dict().items():
            tensors[f"{PREFIX}{n}.{pname}"] = whole(t)
    # tied modules (embed_tokens and lm_head of a tied model) share storage, which safetensors
    # refuses to write: every name after the first gets its own copy, as PEFT saves them
    storages = set()
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr in storages:
            tensors[key] = t.clone()
        elif ptr is not None:
            storages.add(ptr)
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model_name_or_path
        if base_model_name_or_path is not None
        else getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_modules(model, [n for n, _, _ in chosen]),
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "lora_dropout": dropout,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "bias": "all"
        if bias_all
        else "lora_only"
        if any(m.train_bias or ad.bias != "none" for _, m, ad in chosen)
        else "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": sorted({n.rsplit(".", 1)[-1] for n in extra}) or None,
        "inference_mode": True,
    }
    config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    # a symlinked directory is replaced where it points, so the link keeps working
    target = os.path.realpath(save_directory)
    if not sharded[0]:
        _write_adapter_dir(target, tensors, config_bytes)
        return
    # sharded: every rank holds the whole adapter now; one writer (ranks writing one shared
    # directory at once would race its swap), and its outcome sent to all, so that no rank
    # returns before the files exist and none waits on a writer that failed
    import torch.distributed as dist

    error = None
    if dist.get_rank() == 0:
        try:
            _write_adapter_dir(target, tensors, config_bytes)
        except Exception as exc:
            error = exc
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"qpeft.save_adapter: rank 0 failed to write {target}: {outcome[0]}")


# --- rank_pattern / alpha_pattern keys ------------------------------------------------------
# PEFT looks a layer up with ``re.match(rf"(.*\.)?({key})$", name)`` for each key in order,
# the first match winning: the key is a regular expression that must match a whole
# '.'-separated tail of the module path. The keys come from a file, and Python's
# backtracking engine can take exponential time on keys such as "(.*)*x", so they are
# matched here by a small Thompson automaton instead (time linear in the name's length
# times the key's size) over the regex syntax such keys use: literals (with '.' any
# character), escapes \d \w \s \D \W \S and escaped punctuation, [...] classes, groups
# ( ) and (?: ), '|', the quantifiers * + ? {m} {m,} {m,n} (lazy or not: whether a whole
# name matches does not depend on it), ^ and $. Other syntax (lookarounds, backreferences,
# flags) raises ValueError naming the key. Module names hold no newline, so '$' is the end.
_PATTERN_MAX_KEYS = 10_000
_PATTERN_MAX_LEN = 1_000
_PATTERN_MAX_STATES = 5_000  # after expanding counted repeats
_PATTERN_BUDGET = 20_000_000  # automaton steps per load_adapter: a hard bound on the work

_PRED, _SPLIT, _BOL, _EOL, _MATCH = range(5)
_CLASSES = {
    "d": str.isdecimal,
    "D": lambda c: not c.isdecimal(),
    "w": lambda c: c.isalnum() or c == "_",
    "W": lambda c: not (c.isalnum() or c == "_"),
    "s": str.isspace,
    "S": lambda c: not c.isspace(),
}
_ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
_REPEAT = re.compile(r"\{(\d*)(,(\d*))?\}")
_LITERAL_KEY = re.compile(r"[A-Za-z0-9_.\-]+")


class _PatternError(ValueError):
    pass


class _Parser:
    """Recursive descent over a key: nodes are ("pred", fn), ("bol",), ("eol",),
    ("cat", [nodes]), ("alt", [nodes]), ("rep", node, min, max or None)."""

    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0

    def peek(self) -> str | None:
        return self.text[self.i] if self.i < len(self.text) else None

    def fail(self, what: str):
        raise _PatternError(f"{what} at position {self.i}")

    def parse(self):
        node = self.alt()
        if self.i != len(self.text):
            self.fail("unbalanced ')'")
        return node

    def alt(self):
        branches = [self.cat()]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.cat())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def cat(self):
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.quantified(self.atom()))
        return ("cat", items)

    def quantified(self, node):
        while True:
            c, m = self.peek(), None
            if c in ("*", "+", "?"):
                self.i += 1
                lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{" and (m := _REPEAT.match(self.text, self.i)) and (m[1] or m[2]):
                self.i = m.end()
                lo = int(m[1]) if m[1] else 0
                hi = lo if m[2] is None else (int(m[3]) if m[3] else None)
                if hi is not None and hi < lo:
                    self.fail("repeat {m,n} with n < m")
                if max(lo, hi or 0) > _PATTERN_MAX_STATES:
                    self.fail("repeat count too large")
            else:
                return node
            if node[0] in ("bol", "eol"):
                self.fail("nothing to repeat")
            if self.peek() in ("?", "+"):  # lazy / possessive markers: the set of full matches is the same
                if self.peek() == "+":
                    self.fail("possessive quantifiers are not supported")
                self.i += 1
            node = ("rep", node, lo, hi)

    def atom(self):
        c = self.text[self.i]
        self.i += 1
        if c == "(":
            if self.text.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                self.fail("group extensions other than (?:...) are not supported")
            node = self.alt()
            if self.peek() != ")":
                self.fail("missing ')'")
            self.i += 1
            return node
        if c == "[":
            return ("pred", self.char_class())
        if c == ".":
            return ("pred", lambda ch: ch != "\n")
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c in "*+?":
            self.fail("nothing to repeat")
        if c == "\\":
            return ("pred", self.escape())
        return ("pred", c.__eq__)

    def escape(self):
        if self.i >= len(self.text):
            self.fail("trailing backslash")
        c = self.text[self.i]
        self.i += 1
        if c in _CLASSES:
            return _CLASSES[c]
        if c in _ESCAPED:
            return _ESCAPED[c].__eq__
        if c.isalnum():
            self.fail(f"escape \\{c} is not supported")
        return c.__eq__

    def class_escape(self):
        """After a backslash in a class: a character, or the predicate of \\d, \\w..."""
        if self.i >= len(self.text):
            self.fail("trailing backslash")
        c = self.text[self.i]
        self.i += 1
        if c in _CLASSES:
            return _CLASSES[c]
        if c in _ESCAPED:
            return _ESCAPED[c]
        if c.isalnum():
            self.fail(f"escape \\{c} is not supported")
        return c

    def char_class(self):
        negate = self.peek() == "^"
        if negate:
            self.i += 1
        singles: set[str] = set()
        ranges: list[tuple[str, str]] = []
        preds = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                self.fail("missing ']'")
            if c == "]" and not first:
                self.i += 1
                break
            first = False
            self.i += 1
            lo = c
            if c == "\\":
                lo = self.class_escape()
                if not isinstance(lo, str):
                    preds.append(lo)
                    continue
            if self.peek() == "-" and self.i + 1 < len(self.text) and self.text[self.i + 1] != "]":
                self.i += 1
                hi = self.text[self.i]
                self.i += 1
                if hi == "\\":
                    hi = self.class_escape()
                if not isinstance(hi, str) or hi < lo:
                    self.fail("bad character range")
                ranges.append((lo, hi))
            else:
                singles.add(lo)

        def pred(ch: str) -> bool:
            hit = ch in singles or any(a <= ch <= b for a, b in ranges) or any(p(ch) for p in preds)
            return hit != negate

        return pred


class _Pattern:
    """One rank_pattern/alpha_pattern key, compiled to a Thompson automaton."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.literal = _LITERAL_KEY.fullmatch(key) is not None
        if self.literal:
            return
        self.kind: list[int] = []
        self.outs: list[list[int]] = []
        self.preds: list = []
        match = self._new(_MATCH, [])
        self.start = self._compile(_Parser(key).parse(), match)

    def _new(self, kind: int, outs: list[int], pred=None) -> int:
        if len(self.kind) >= _PATTERN_MAX_STATES:
            raise _PatternError("the pattern is too large")
        self.kind.append(kind)
        self.outs.append(outs)
        self.preds.append(pred)
        return len(self.kind) - 1

    def _compile(self, node, nxt: int) -> int:
        # built back to front: each node compiles into states that continue at ``nxt``
        tag = node[0]
        if tag == "pred":
            return self._new(_PRED, [nxt], node[1])
        if tag in ("bol", "eol"):
            return self._new(_BOL if tag == "bol" else _EOL, [nxt])
        if tag == "cat":
            for child in reversed(node[1]):
                nxt = self._compile(child, nxt)
            return nxt
        if tag == "alt":
            return self._new(_SPLIT, [self._compile(child, nxt) for child in node[1]])
        _, body, lo, hi = node
        if hi is None:
            loop = self._new(_SPLIT, [])
            self.outs[loop][:] = [self._compile(body, loop), nxt]
            start = loop
        else:
            start = nxt
            for _ in range(hi - lo):
                start = self._new(_SPLIT, [self._compile(body, start), nxt])
        for _ in range(lo):
            start = self._compile(body, start)
        return start

    def matches(self, name: str, budget: list[int]) -> bool:
        r"""``re.match(rf"(.*\.)?({key})$", name)``: the key matches a '.'-separated tail of name."""
        n = len(name)
        if self.literal:  # the common case, without the automaton: '.' still matches any character
            p = n - len(self.key)
            return (p == 0 or (p > 0 and name[p - 1] == ".")) and all(
                k == c or (k == "." and c != "\n") for k, c in zip(self.key, name[p:])
            )
        kind, outs, preds = self.kind, self.outs, self.preds
        current: set[int] = set()

        def close(state: int, pos: int, into: set[int]) -> None:
            stack = [state]
            while stack:
                s = stack.pop()
                if s in into:
                    continue
                budget[0] -= 1
                k = kind[s]
                if k == _BOL and pos != 0 or k == _EOL and pos != n:
                    continue
                into.add(s)
                if k in (_SPLIT, _BOL, _EOL):
                    stack.extend(outs[s])

        for pos in range(n + 1):
            if pos == 0 or name[pos - 1] == ".":
                close(self.start, pos, current)
            if budget[0] < 0:
                raise _PatternError("matching the patterns takes too long")
            if pos == n:
                break
            ch, following = name[pos], set()
            for s in current:
                if kind[s] == _PRED and preds[s](ch):
                    close(outs[s][0], pos + 1, following)
            current = following
        return any(kind[s] == _MATCH for s in current)


def _compile_patterns(patterns: dict, field: str) -> list[tuple[_Pattern, object]]:
    compiled = []
    for key, value in patterns.items():
        try:
            compiled.append((_Pattern(key), value))
        except _PatternError as exc:
            raise ValueError(f"{ADAPTER_CONFIG}: {field} key {key!r}: {exc}") from None
    return compiled


def _pattern_value(patterns: list[tuple[_Pattern, object]], name: str, default, budget: list[int]):
    """PEFT's rank_pattern/alpha_pattern lookup: the value of the first key that matches."""
    for pattern, value in patterns:
        try:
            if pattern.matches(name, budget):
                return value
        except _PatternError as exc:
            raise ValueError(f"{ADAPTER_CONFIG}: pattern key {pattern.key!r}: {exc}") from None
    return default


def _read_adapter(directory: str | os.PathLike) -> tuple[object, dict[str, torch.Tensor]]:
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: not a PEFT adapter directory")
    with open(cfg_path, "rb") as f:
        raw = f.read()
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{cfg_path} is not UTF-8 JSON: {exc}") from None
    st_path, bin_path = os.path.join(directory, ADAPTER_WEIGHTS), os.path.join(directory, ADAPTER_WEIGHTS_BIN)
    if os.path.isfile(st_path):
        tensors = _safetensors().load_file(st_path)
    elif os.path.isfile(bin_path):
        tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise ValueError(f"{bin_path} does not hold a dict of named tensors")
    else:
        raise FileNotFoundError(f"neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN} in {directory}")
    return config, tensors


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _checked_config(config, directory) -> dict:
    """adapter_config.json's fields that load_adapter uses, type-checked (the file is input):
    a wrong type raises ValueError naming the field instead of being read loosely (the string
    "false" is truthy). Absent fields take PEFT's defaults."""
    where = f"{ADAPTER_CONFIG} in {directory}"
    if not isinstance(config, dict):
        raise ValueError(f"{where} must hold a JSON object, got a JSON {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory} holds a {config.get('peft_type')!r} adapter; load_adapter reads LoRA adapters"
        )

    def field(key, default, ok, want):
        value = config.get(key, default)
        if not ok(value):
            raise ValueError(f"{where}: {key!r} must be {want}, got {value!r}")
        return value

    def is_pos_int(v):
        return type(v) is int and v > 0

    def is_alpha(v):
        return _is_number(v) and v >= 0

    def is_names(v):
        return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, str) for t in v))

    out = {
        "r": field("r", 8, is_pos_int, "a positive integer"),
        "lora_alpha": field("lora_alpha", 8, is_alpha, "a finite number >= 0"),
        "lora_dropout": field(
            "lora_dropout", 0.0, lambda v: v is None or (_is_number(v) and 0 <= v < 1), "a number in [0, 1)"
        )
        or 0.0,
        "use_rslora": field("use_rslora", False, lambda v: type(v) is bool, "true or false"),
        "use_dora": field("use_dora", False, lambda v: type(v) is bool, "true or false"),
        "fan_in_fan_out": field("fan_in_fan_out", False, lambda v: type(v) is bool, "true or false"),
        "lora_bias": field("lora_bias", False, lambda v: type(v) is bool, "true or false"),
        "bias": field(
            "bias", "none", lambda v: v in ("none", "all", "lora_only"), '"none", "all" or "lora_only"'
        ),
        "target_modules": field("target_modules", None, is_names, "a string or a list of strings"),
        "modules_to_save": field("modules_to_save", None, is_names, "a list of strings"),
        "task_type": field("task_type", None, lambda v: v is None or isinstance(v, str), "a string or null"),
    }
    for key, ok, want in (
        ("rank_pattern", is_pos_int, "positive integers"),
        ("alpha_pattern", is_alpha, "finite numbers >= 0"),
    ):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"{where}: {key!r} must be an object mapping module names to values")
        if len(patterns) > _PATTERN_MAX_KEYS:
            raise ValueError(f"{where}: {key!r} has {len(patterns)} keys, more than {_PATTERN_MAX_KEYS}")
        for k, v in patterns.items():
            if not k or len(k) > _PATTERN_MAX_LEN:
                raise ValueError(f"{where}: {key!r} key of length {len(k)} (must be 1..{_PATTERN_MAX_LEN})")
            if not ok(v):
                raise ValueError(f"{where}: {key}[{k!r}] must be one of {want}, got {v!r}")
        out[key] = _compile_patterns(patterns, key)
    if out["lora_bias"]:
        raise ValueError(f"{where}: {_LORA_BIAS}")
    if out["fan_in_fan_out"]:
        raise ValueError("fan_in_fan_out adapters (GPT-2 style Conv1D layers) are not supported")
    return out


def _check_tensor(key: str, t: torch.Tensor, like: torch.Tensor | None, allow_nonfinite: bool) -> None:
    """An adapter-file tensor bound for a floating-point parameter must be floating point
    (copy_ would silently turn bools and integers into numbers) and finite unless the caller
    opts in; one bound for a non-floating tensor (e.g. an integer buffer of a module in
    modules_to_save) must have its dtype."""
    if like is not None and not like.is_floating_point():
        if t.dtype != like.dtype:
            raise TypeError(f"{key}: the file has {t.dtype} but the model's tensor is {like.dtype}")
        return
    if not t.is_floating_point():
        raise TypeError(f"{key}: the file holds a {t.dtype} tensor; adapter weights must be floating point")
    if not allow_nonfinite and not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{key}: the file holds NaN or infinite values (pass allow_nonfinite=True to load them anyway)"
        )


@dataclass
class _Planned:
    layer: QLoRALinear
    adapter: LoRAAdapter
    bias: torch.Tensor | None


def load_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    activate: bool = True,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``)
    into the QLoRALinear layers of a converted ``model`` as adapter ``adapter_name``.

    Each ``<path>.lora_A/lora_B`` pair must name a QLoRALinear of the model with matching
    in/out features. The file defines the adapter: an existing adapter of that name is
    replaced (its rank, alpha and flavour come from the file), and layers the file does not
    cover lose an adapter of that name, so they run their base alone while it is active.
    Tensors of the config's ``modules_to_save`` (plus the heads PEFT's task model adds for
    its ``task_type``) are copied into those modules; as in PEFT, a name the model lacks is
    skipped, unless the file holds tensors under it (ValueError: they would be lost).
    Modules that share a tensor (tied embeddings: ``embed_tokens`` and ``lm_head``) are
    untied as PEFT unties them (it trains a copy of each module named in modules_to_save):
    where the file's tensors for them differ, or the file holds only some of them, each
    loaded module gets its own tensor and the others keep the original.

    The files are input: config fields of the wrong type, non-floating tensors, NaN/Inf
    values (unless ``allow_nonfinite=True``) and ranks that disagree with ``r`` /
    ``rank_pattern`` raise ValueError/TypeError naming the key. Everything is checked
    before anything changes, so a failing load leaves the model as it was. Returns ``model``.
    """
    raw_config, tensors = _read_adapter(directory)
    config = _checked_config(raw_config, directory)
    modules = dict(model.named_modules())
    # PEFT's modules_to_save: the config's names and its task model's heads. As PEFT does,
    # names the model lacks are skipped, unless the file holds tensors under them: those
    # would be lost.
    names = config["modules_to_save"] or []
    names = [names] if isinstance(names, str) else list(names)
    names += [t for t in TASK_HEADS.get(config["task_type"], ()) if t not in names]
    stored = [k[len(PREFIX) :] if k.startswith(PREFIX) else k for k in tensors]
    stored = [k for k in stored if _KEY.match(k) is None]
    held = {t for t in names if any(_names_tensor(k, t) for k in stored)}
    saved = _modules_to_save(model, names, optional=set(names) - held)
    by_length = sorted(saved, key=len, reverse=True)
    whole: dict[str, tuple[str, str, torch.Tensor]] = {}  # key -> (module path, its state-dict key, tensor)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[tuple[str, str], str] = {}  # (path, kind) -> the file's key, for messages
    bad, unknown = [], []
    biases: dict[str, tuple[str, torch.Tensor]] = {}  # module path -> (the file's key, tensor)
    for key, t in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        try:
            lora = _lora_key(name)
        except ValueError as exc:
            unknown.append(str(exc).replace(name, key, 1))
            continue
        if lora is not None:
            if lora in keys:  # e.g. "lora_A.weight" and "lora_A.default.weight"
                unknown.append(f"{key} and {keys[lora]} both hold {lora[1]} of {lora[0]}")
                continue
            grouped.setdefault(lora[0], {})[lora[1]] = t
            keys[lora] = key
            continue
        owner = next((n for n in by_length if name.startswith(n + ".")), None)
        if owner is not None:
            attr = name[len(owner) + 1 :]
            if config["bias"] == "all" and attr.endswith(".bias") and attr.split(".")[0] in _WRAPPER_PARTS:
                continue  # PEFT's wrapper copies; the trained bias is <owner>.<...>.bias
            whole[name] = (owner, name[len(owner) + 1 :], t)
            keys[name, ""] = key
            continue
        b = _BIAS_KEY.match(name)
        if b and config["bias"] in ("lora_only", "all") and b["path"] in modules:
            biases[b["path"]] = (key, t)
            continue
        bad.append(key)
    # the biases of this adapter's LoRA layers train with it; bias="all" also saved every
    # other bias of the model (LayerNorms, untargeted linears), loaded into those modules
    other_biases: dict[str, tuple[str, torch.Tensor]] = {}
    for path, (key, t) in biases.items():
        if path in grouped:
            grouped[path]["bias"] = t
            keys[path, "bias"] = key
        elif config["bias"] == "all":
            other_biases[path] = (key, t)
        else:
            bad.append(key)
    if unknown:
        raise ValueError(
            f"cannot load the adapter in {directory}:\n  "
            + "\n  ".join(unknown[:8])
            + ("\n  ..." if len(unknown) > 8 else "")
        )
    if bad:
        raise ValueError(
            f"adapter file has entries that are not LoRA weights: {bad[:5]}{' ...' if len(bad) > 5 else ''}"
        )
    if not grouped:
        raise ValueError(f"adapter file in {directory} holds no LoRA weights")
    planned: dict[str, _Planned] = {}
    errors = []
    targets: dict[str, tuple[str, str, torch.Tensor]] = {}
    budget = [_PATTERN_BUDGET]
    for name, (owner, attr, t) in whole.items():
        current = saved[owner].state_dict().get(attr)
        if current is None or current.shape != t.shape:
            have = None if current is None else tuple(current.shape)
            errors.append(f"{name}: the file has shape {tuple(t.shape)} but the model's is {have}")
            continue
        try:
            _check_tensor(keys[name, ""], t, current, allow_nonfinite)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
            continue
        targets[name] = (owner, attr, t)
    bias_targets: list[tuple[torch.Tensor, torch.Tensor]] = []
    for path, (key, t) in other_biases.items():
        module = modules[path]
        holder = module.base_layer if isinstance(module, (QLoRALinear, IA3Linear)) else module
        dst = holder._parameters.get("bias")
        if dst is None:
            dst = holder._buffers.get("bias")
        if dst is None or dst.shape != t.shape:
            have = "no bias" if dst is None else f"a bias of shape {tuple(dst.shape)}"
            errors.append(f'{key}: bias="all" bias of shape {tuple(t.shape)}, but {path} has {have}')
            continue
        try:
            _check_tensor(key, t, dst, allow_nonfinite)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
            continue
        bias_targets.append((dst, t))
    for path, parts in grouped.items():
        layer = modules.get(path)
        if not isinstance(layer, QLoRALinear):
            what = "no such module" if layer is None else f"a {type(layer).__name__}, not a QLoRALinear"
            errors.append(f"{path}: {what} (convert the model with qpeft.convert first)")
            continue
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None:
            errors.append(f"{path}: the file has {'lora_B' if a is None else 'lora_A'} but not its partner")
            continue
        bias = parts.get("bias")
        try:
            for kind, t in parts.items():
                like = layer.base_layer.bias if kind == "bias" else None
                _check_tensor(keys[path, kind], t, like, allow_nonfinite)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            errors.append(
                f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] and [out, r]"
            )
            continue
        r = a.shape[0]
        if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            errors.append(
                f"{path}: adapter shapes lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not match the layer "
                f"(in_features={layer.in_features}, out_features={layer.out_features})"
            )
            continue
        want_r = _pattern_value(config["rank_pattern"], path, config["r"], budget)
        if r != want_r:
            errors.append(
                f"{path}: lora_A has rank {r} but {ADAPTER_CONFIG} gives r = {want_r} for this layer"
            )
            continue
        use_dora = config["use_dora"]
        mag = parts.get("lora_magnitude_vector")
        if use_dora and (mag is None or tuple(mag.shape) != (layer.out_features,)):
            errors.append(f"{path}: use_dora needs lora_magnitude_vector of shape ({layer.out_features},)")
            continue
        if bias is not None and (layer.base_layer.bias is None or bias.shape != layer.base_layer.bias.shape):
            errors.append(f"{path}: bias {tuple(bias.shape)} does not fit the layer")
            continue
        alpha = _pattern_value(config["alpha_pattern"], path, config["lora_alpha"], budget)
        device = layer.base_layer.weight.device
        # the initial values are overwritten below; fork_rng keeps the load from moving the
        # caller's random stream (the constructor draws lora_A)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            ad = LoRAAdapter(
                layer.in_features,
                layer.out_features,
                r,
                alpha,
                float(config["lora_dropout"]),
                "default",
                config["use_rslora"],
                use_dora,
                device,
            )
        ad.bias = config["bias"]
        with torch.no_grad():
            ad.lora_A.copy_(a)
            ad.lora_B.copy_(b)
            if use_dora:
                ad.magnitude.copy_(mag)
        planned[path] = _Planned(layer, ad, bias)
    if errors:
        raise ValueError(f"cannot load the adapter in {directory}:\n  " + "\n  ".join(errors))
    covered = {id(p.layer) for p in planned.values()}
    others = [m for m in modules.values() if isinstance(m, QLoRALinear) and id(m) not in covered]
    busy = [m for m in [p.layer for p in planned.values()] + others if m.merged_adapter == adapter_name]
    if busy:
        raise RuntimeError(
            f"adapter {adapter_name!r} is merged into some layers; unmerge before loading over it"
        )
    # Tied modules_to_save (embed_tokens and lm_head of a tied model hold one Parameter): PEFT
    # trains a copy of each module it names and leaves the others as they are. A tie is kept
    # where the file loads every holder of the tensor with equal values (loaded once); else
    # the loaded modules get Parameters of their own (where the file covers every holder the
    # first one loads in place) and the others keep the original: untied, as under PEFT.
    tied: dict[int, list[tuple[str, str, torch.Tensor]]] = {}
    for owner, attr, t in targets.values():
        tied.setdefault(id(saved[owner].state_dict(keep_vars=True)[attr]), []).append((owner, attr, t))
    holders = collections.Counter(
        id(t)
        for m in model.modules()
        for t in [*m._parameters.values(), *m._buffers.values()]
        if t is not None
    )
    partial = {key: len(g) < holders[key] for key, g in tied.items()}
    untie = {
        key: partial[key] or any(not torch.equal(t, g[0][2]) for _, _, t in g[1:]) for key, g in tied.items()
    }
    sharded = any(is_dtensor(t) for t in model.parameters())
    if sharded:
        _check_sharded_load(planned, others, adapter_name, untie)
    # Everything is checked: from here on only copies of validated tensors into tensors of
    # the same shape and dict updates, none of which can fail on input.
    with torch.no_grad():
        for key, group in tied.items():
            for i, (owner, attr, t) in enumerate(group if untie[key] else group[:1]):
                dst = saved[owner].state_dict(keep_vars=True)[attr]
                if i == 0 and not partial[key]:
                    _copy_into(dst, t)
                    continue
                holder_name, _, leaf = attr.rpartition(".")
                holder = saved[owner].get_submodule(holder_name)
                own = torch.empty_like(dst).copy_(t)
                if leaf in holder._parameters:
                    holder._parameters[leaf] = nn.Parameter(own, requires_grad=dst.requires_grad)
                else:
                    holder._buffers[leaf] = own
    for p in planned.values():
        ad = p.adapter
        if sharded:  # into the parameters FSDP2 manages (_check_sharded_load: same shapes)
            _load_in_place(p.layer.adapters[adapter_name], ad)
        else:
            ad.requires_grad_(False)
            p.layer.adapters[adapter_name] = ad
        if p.bias is not None:
            with torch.no_grad():
                _copy_into(p.layer.base_layer.bias, p.bias)
    with torch.no_grad():
        for dst, t in bias_targets:
            _copy_into(dst, t)
    if activate:  # PEFT's bias="all" trains every bias of the model
        for dst, _ in bias_targets:
            if isinstance(dst, nn.Parameter):
                dst.requires_grad_(True)
    for m in others:
        if adapter_name in m.adapters:
            if m.active_adapter == adapter_name:
                m.active_adapter = None
            del m.adapters[adapter_name]
    if activate:
        for m in modules.values():
            if isinstance(m, QLoRALinear):
                m.set_adapter(adapter_name if adapter_name in m.adapters else None)
    return model


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) where dst may be a DTensor (a parameter FSDP2 shards): each rank copies
    its own part of the whole ``src`` (no communication; every rank read the same file)."""
    if is_dtensor(dst):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(src)


def _check_sharded_load(planned, others, adapter_name, untie) -> None:
    """RuntimeError unless load_adapter can load into a model sharded by FSDP2 in place.

    FSDP2 all-gathers and reduce-scatters the parameters that existed at fully_shard: a new
    adapter (or an untied copy of a modules_to_save tensor) would be a plain parameter on
    every rank, never reduced, so the ranks would train apart. In place, the file's values
    go into the existing (sharded) parameters: an adapter of this name on every layer the
    file covers, with the file's rank and flavour, and on no other layer."""
    why = []
    for path, p in planned.items():
        have = p.layer.adapters[adapter_name] if adapter_name in p.layer.adapters else None
        if have is None:
            why.append(f"{path} has no adapter {adapter_name!r}")
        elif have.r != p.adapter.r or have.use_dora != p.adapter.use_dora:
            why.append(
                f"{path}: the file's adapter (r={p.adapter.r}, use_dora={p.adapter.use_dora}) differs from the "
                f"model's {adapter_name!r} (r={have.r}, use_dora={have.use_dora})"
            )
    if any(adapter_name in m.adapters for m in others):
        why.append(f"layers the file does not cover have adapter {adapter_name!r}")
    if any(untie.values()):
        why.append("the file's modules_to_save would untie tied tensors")
    if why:
        raise RuntimeError(
            "qpeft.load_adapter into a model sharded by FSDP2 (fully_shard) can only load in place: into "
            f"an existing adapter {adapter_name!r} of the same rank and flavour on exactly the layers the "
            "file covers (a new parameter would not be managed by FSDP2, and the ranks would train apart). "
            "Load the adapter before fully_shard. Here: "
            + "; ".join(why[:4])
            + (" ..." if len(why) > 4 else "")
        )


def _load_in_place(have: LoRAAdapter, new: LoRAAdapter) -> None:
    """The values and settings of ``new`` into ``have`` (same r and flavour), keeping
    ``have``'s parameter objects (and their requires_grad)."""
    with torch.no_grad():
        _copy_into(have.lora_A, new.lora_A)
        _copy_into(have.lora_B, new.lora_B)
        if new.magnitude is not None:
            _copy_into(have.magnitude, new.magnitude)
    have.alpha, have.use_rslora, have.scaling, have.bias = new.alpha, new.use_rslora, new.scaling, new.bias
    have.dropout_p, have.dropout = new.dropout_p, new.dropout


# --- 4-bit base weights ----------------------------------------------------------------------
def _wrapper_paths(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (QLoRALinear, IA3Linear))]


def _base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as the unwrapped model names it: ``<w>.base_layer.X`` -> ``<w>.X``,
    adapters left out."""
    wrappers = _wrapper_paths(model)
    out = {}
    for key, t in model.state_dict().items():
        w = next((w for w in wrappers if key.startswith(w + ".")), None)
        if w is None:
            out[key] = t
            continue
        rest = key[len(w) + 1 :]
        if rest.startswith("base_layer."):
            out[w + "." + rest[len("base_layer.") :]] = t
    return out


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Save the model without its adapters to one safetensors file, 4-bit layers in the
    bitsandbytes layout. Tied tensors (shared storage) are stored once; the file's metadata
    records the other names, which ``load_quantized`` fills in."""
    st = _safetensors()
    state = _base_state_dict(model)
    sharded = [k for k, t in state.items() if hasattr(t, "full_tensor")]
    if sharded:  # FSDP2's DTensors: no rank holds the whole model
        raise RuntimeError(
            f"save_quantized needs an unsharded model; {sharded[0]} (and {len(sharded) - 1} more) are "
            "sharded by FSDP2. Save before fully_shard, or gather a full state dict "
            "(torch.distributed.checkpoint.state_dict.get_model_state_dict with "
            "StateDictOptions(full_state_dict=True)) and save that on one rank "
            "(docs/distributed.md, 'Checkpoints of a sharded model')"
        )
    tensors, tied, seen = {}, {}, {}
    for key, t in state.items():
        ident = (
            (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if t.numel()
            else None
        )
        if ident is not None and ident in seen:
            tied[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.detach().contiguous().cpu()
    target = os.path.realpath(path)
    _remove_stale_temporaries(target)
    tmp = _temp_name(target)
    _new_file(tmp)
    try:
        st.save_file(tensors, tmp, metadata={"format": "pt", "qpeft_tied": json.dumps(tied)})
        _fsync(tmp)
        os.replace(tmp, target)  # readers see the old file or the new one, never a torn one
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync(os.path.dirname(target))


def _read_quantized(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    st = _safetensors()
    with st.safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    try:
        tied = json.loads(meta.get("qpeft_tied", "{}"))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{path}: metadata 'qpeft_tied' is not JSON: {exc}") from None
    if not isinstance(tied, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tied.items()
    ):
        raise ValueError(f"{path}: metadata 'qpeft_tied' must map tensor names to tensor names")
    for key, src in tied.items():
        if src not in state or key in state:
            raise ValueError(
                f"{path}: metadata 'qpeft_tied' ties {key!r} to {src!r}, which the file does not allow"
            )
        state[key] = state[src]
    return state


def load_quantized(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a file written by ``save_quantized`` (or a bitsandbytes/transformers 4-bit
    state dict saved as safetensors) into ``model``: layers that are still ``nn.Linear`` where
    the file holds a 4-bit weight become ``Linear4bit`` (inside a QLoRALinear/IA3Linear the
    base layer is swapped), then every tensor is loaded. Adapter parameters are not in the
    file and are left as they are. Returns ``model``.

    Into a model built on the meta device, meta tensors take the file's tensors (as
    ``load_state_dict(assign=True)``; tied ones stay tied), and what the file does not hold
    is initialized as ``load_safetensors`` initializes it (adapters, rotary buffers...).

    Everything is checked before anything changes (each 4-bit state in full: sizes, dtypes,
    finite statistics; every other tensor's shape and kind), so a failing load raises
    ValueError/TypeError naming the key and leaves the model as it was."""
    state = _read_quantized(path)
    wrappers = _wrapper_paths(model)
    mapped, file_keys = {}, {}  # model key -> tensor, model key -> the file's key (for messages)
    for key, t in state.items():
        w = next((w for w in wrappers if key.startswith(w + ".")), None)
        model_key = key if w is None else f"{w}.base_layer.{key[len(w) + 1 :]}"
        mapped[model_key], file_keys[model_key] = t, key
    four_bit = sorted(
        {k.split(".weight.quant_state.")[0] for k in mapped if ".weight.quant_state.bitsandbytes__" in k}
    )
    swaps = []
    for path_ in four_bit:
        try:
            module = model.get_submodule(path_)
        except AttributeError:
            raise ValueError(
                f"the file has a 4-bit weight for {path_!r}, which is not a module of the model"
            ) from None
        if isinstance(module, Linear4bit):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"the file has a 4-bit weight for {path_!r}, a {type(module).__name__} (expected a linear)"
            )
        new = Linear4bit(
            module.in_features, module.out_features, module.bias is not None, device=module.weight.device
        )
        swaps.append((path_, new))

    def put(path_: str, module: nn.Module) -> nn.Module:
        parent_name, _, attr = path_.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        setattr(parent, attr, module)
        return old

    # The swaps go in first (so the model's state dict has the keys the file has) and come
    # back out if anything fails; they change no tensor of the model.
    originals = [(path_, put(path_, new)) for path_, new in swaps]
    try:
        quant4, rest = _plan_quantized(model, mapped, file_keys, strict)
        owners = _tensor_owners(model) if any(dst.is_meta for dst, _ in rest) else {}
        if any(dst.is_meta and id(dst) not in owners for dst, _ in rest):
            raise TypeError(
                "load_quantized: a meta-device tensor of the model's state dict is not one of its "
                "parameters or buffers (a module's own _save_to_state_dict), so it cannot be assigned; "
                "materialize the model (to_empty) before loading"
            )
        for layer, packed, qstate in quant4:
            layer.commit_weight(packed, qstate)
        assigned: set[int] = set()
        with torch.no_grad():
            for dst, src in rest:
                if dst.is_meta:
                    _assign_loaded(owners[id(dst)], dst, src, assigned)
                else:
                    dst.copy_(src)
    except BaseException:
        for path_, old in originals:
            put(path_, old)
        raise
    if owners:
        # what the file does not hold and is still on the meta device: adapters initialized,
        # non-persistent buffers (rotary embeddings...) computed, as load_safetensors does
        from .loading import _materialize_leftovers

        still_meta = {
            (id(m), n)
            for m in model.modules()
            for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
            if t is not None and t.is_meta
        }
        _materialize_leftovers(model, still_meta, torch.device("cpu"))
    return model


def _tensor_owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """``id(tensor) -> [(module, name, is_buffer)]`` for every parameter and buffer (a tied
    tensor has several owners)."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for m in model.modules():
        for n, t in m._parameters.items():
            if t is not None:
                owners.setdefault(id(t), []).append((m, n, False))
        for n, t in m._buffers.items():
            if t is not None:
                owners.setdefault(id(t), []).append((m, n, True))
    return owners


def _assign_loaded(owners, dst: torch.Tensor, src: torch.Tensor, assigned: set[int]) -> None:
    """A meta-device tensor has no storage to copy into: its owners take the file's tensor
    (in ``dst``'s dtype, where the file's tensors are), as ``load_state_dict(assign=True)``
    does; a file tensor that fills two untied tensors is copied for the second."""
    value = src.to(dtype=dst.dtype)
    if id(value) in assigned:
        value = value.clone()
    assigned.add(id(value))
    if owners[0][2]:
        for m, n, _ in owners:
            m._buffers[n] = value
    else:
        p = nn.Parameter(value, requires_grad=dst.requires_grad)
        for m, n, _ in owners:
            m._parameters[n] = p


def _plan_quantized(
    model: nn.Module, mapped: dict[str, torch.Tensor], file_keys: dict[str, str], strict: bool
):
    """Check every entry of the file against the model; return the 4-bit weights to install
    as ``(layer, packed, state)`` and the other copies as ``(model tensor, file tensor)``."""
    adapter_like = re.compile(r"\.(adapters\..+|ia3_l)$")
    current = model.state_dict(keep_vars=True)
    quant4, missing = [], []
    planned: set[str] = set()  # the 4-bit weights and their quantization entries
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, Linear4bit):
            continue
        prefix = f"{name}." if name else ""
        w_key = prefix + "weight"
        quant_keys = [k for k in mapped if k.startswith(w_key + ".")]
        planned.update(quant_keys, (k for k in current if k.startswith(w_key + ".")), (w_key,))
        if w_key not in mapped:
            missing.append(w_key)
            continue
        quant = {k[len(prefix) :]: mapped[k] for k in quant_keys}
        named = file_keys.get(w_key, w_key)[: -len("weight")]
        packed, qstate = module.prepare_weight(mapped[w_key], quant, named)
        quant4.append((module, packed, qstate))
    # tied tensors (one Parameter under several names, e.g. lm_head.weight and
    # model.embed_tokens.weight): transformers writes one of the names, so the group is loaded
    # when the file has any of them (as load_safetensors groups them)
    tied: dict[int, list[str]] = {}
    for key, dst in current.items():
        tied.setdefault(id(dst), []).append(key)
    rest = []
    for key, dst in current.items():
        if key in planned:
            continue
        if key not in mapped:
            if not adapter_like.search(key) and not any(k in mapped for k in tied[id(dst)]):
                missing.append(key)
            continue
        src, named = mapped[key], file_keys.get(key, key)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"{named}: the file has shape {tuple(src.shape)} but the model's is {tuple(dst.shape)}"
            )
        if dst.is_floating_point() != src.is_floating_point() or (
            not dst.is_floating_point() and dst.dtype != src.dtype
        ):
            raise TypeError(f"{named}: the file has {src.dtype} but the model's tensor is {dst.dtype}")
        rest.append((dst, src))
    unexpected = sorted(file_keys.get(k, k) for k in set(mapped) - planned - set(current))
    if strict and (missing or unexpected):
        raise ValueError(f"load_quantized: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return quant4, rest
