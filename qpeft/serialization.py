"""Adapters in HF PEFT's format, and 4-bit base weights in the bitsandbytes layout.

``save_adapter(model, dir)`` writes what ``PeftModel.save_pretrained`` writes for LoRA:
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight``
([r, in]), ``...lora_B.weight`` ([out, r]), DoRA's ``...lora_magnitude_vector`` ([out]),
and ``adapter_config.json`` (peft_type LORA, r, lora_alpha, target_modules, rank_pattern /
alpha_pattern for layers that differ, use_rslora, use_dora, lora_dropout). So
``peft.PeftModel.from_pretrained(base, dir)`` loads it on the same unquantized base model,
and ``load_adapter`` loads a PEFT-saved LoRA adapter into a converted model.

``save_quantized`` / ``load_quantized`` write and read the base model (no adapters) with
the keys transformers + bitsandbytes use for a 4-bit model: ``<path>.weight`` (packed
uint8), ``<path>.weight.absmax``, ``...quant_map``, ``...nested_absmax``,
``...nested_quant_map``, ``...quant_state.bitsandbytes__nf4``, ``<path>.bias``.

safetensors is optional (a test extra): it is imported when a function needs it, and a
missing package raises an ImportError saying how to install it. ``load_adapter`` also
reads PEFT's older ``adapter_model.bin``.
"""

from __future__ import annotations

import collections
import json
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from .nn import IA3Linear, Linear4bit, QLoRALinear
from .nn.lora import LoRAAdapter

__all__ = ["load_adapter", "load_quantized", "save_adapter", "save_quantized"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
_KEY = re.compile(
    r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_magnitude_vector)(?:\.(?!weight$)[^.]+)?(?:\.weight)?$"
)
_BIAS_KEY = re.compile(r"^(?P<path>.+?)(?:\.base_layer)?\.bias$")


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError(
            "saving and loading .safetensors files needs the safetensors package: pip install safetensors "
            "(or pip install 'qpeft[test]')"
        ) from None
    return st


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (
        ("ForCausalLM", "CAUSAL_LM"),
        ("ForSequenceClassification", "SEQ_CLS"),
        ("ForTokenClassification", "TOKEN_CLS"),
        ("ForQuestionAnswering", "QUESTION_ANS"),
        ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ):
        if name.endswith(suffix):
            return task
    return None


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


def _modules_to_save(model: nn.Module, names) -> dict[str, nn.Module]:
    """PEFT's modules_to_save matching (equal or '.'-suffix) over the model's modules."""
    if not names:
        return {}
    names = [names] if isinstance(names, str) else list(names)
    found = {
        n: m for n, m in model.named_modules() if n and any(n == t or n.endswith("." + t) for t in names)
    }
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save names no module of the model: {missing}")
    wrapped = [n for n, m in found.items() if isinstance(m, (QLoRALinear, IA3Linear, Linear4bit))]
    if wrapped:
        raise ValueError(
            f"modules_to_save must be plain modules (e.g. embeddings, heads), not qpeft layers: {wrapped}"
        )
    return found


def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    modules_to_save=None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write adapter ``adapter_name`` (default: the active one) of every QLoRALinear of ``model``
    in PEFT's LoRA format (see the module doc). Layers without that adapter are left out.
    ``modules_to_save``: names of other modules trained in full (e.g. ``["embed_tokens",
    "lm_head"]`` after adding tokens), saved whole as PEFT saves its modules_to_save."""
    st = _safetensors()
    extra = _modules_to_save(model, modules_to_save)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    if not layers:
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
    for n, m, ad in chosen:
        key = PREFIX + n
        tensors[key + ".lora_A.weight"] = ad.lora_A.detach().contiguous().cpu()
        tensors[key + ".lora_B.weight"] = ad.lora_B.detach().contiguous().cpu()
        if ad.use_dora:
            tensors[key + ".lora_magnitude_vector"] = ad.magnitude.detach().contiguous().cpu()
        if m.train_bias:
            tensors[key + ".base_layer.bias"] = m.base_layer.bias.detach().contiguous().cpu()
        ranks[n], alphas[n] = ad.r, ad.alpha
    for n, module in extra.items():
        for pname, t in module.state_dict().items():
            tensors[f"{PREFIX}{n}.{pname}"] = t.detach().contiguous().cpu()
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA",
        "task_type": task_type if task_type is not None else _task_type(model),
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
        "bias": "lora_only" if any(m.train_bias for _, m, _ in chosen) else "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": sorted({n.rsplit(".", 1)[-1] for n in extra}) or None,
        "inference_mode": True,
    }
    os.makedirs(save_directory, exist_ok=True)
    st.save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(save_directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name it ends (as a
    regular expression) at a '.' boundary."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    cfg_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: not a PEFT adapter directory")
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    st_path, bin_path = os.path.join(directory, ADAPTER_WEIGHTS), os.path.join(directory, ADAPTER_WEIGHTS_BIN)
    if os.path.isfile(st_path):
        tensors = _safetensors().load_file(st_path)
    elif os.path.isfile(bin_path):
        tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"neither {ADAPTER_WEIGHTS} nor {ADAPTER_WEIGHTS_BIN} in {directory}")
    return config, tensors


@dataclass
class _Planned:
    layer: QLoRALinear
    adapter: LoRAAdapter
    bias: torch.Tensor | None


def load_adapter(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default", *, activate: bool = True
) -> nn.Module:
    """Load a PEFT LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``/``.bin``)
    into the QLoRALinear layers of a converted ``model`` as adapter ``adapter_name``.

    Each ``<path>.lora_A/lora_B`` pair must name a QLoRALinear of the model with matching
    in/out features. The file defines the adapter: an existing adapter of that name is
    replaced (its rank, alpha and flavour come from the file), and layers the file does not
    cover lose an adapter of that name, so they run their base alone while it is active.
    Everything is checked before anything changes. Returns ``model``.
    """
    config, tensors = _read_adapter(directory)
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory} holds a {config.get('peft_type')!r} adapter; load_adapter reads LoRA adapters"
        )
    if config.get("fan_in_fan_out"):
        raise ValueError("fan_in_fan_out adapters (GPT-2 style Conv1D layers) are not supported")
    modules = dict(model.named_modules())
    saved = _modules_to_save(model, config.get("modules_to_save"))
    whole: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    bad = []
    for key, t in tensors.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = _KEY.match(name)
        if m:
            grouped.setdefault(m["path"], {})[m["kind"]] = t
            continue
        owner = name.rsplit(".", 1)[0]
        if owner in saved:
            whole[name] = t
            continue
        b = _BIAS_KEY.match(name)
        if b and config.get("bias") in ("lora_only", "all") and b["path"] in modules:
            grouped.setdefault(b["path"], {})["bias"] = t
            continue
        bad.append(key)
    if bad:
        raise ValueError(
            f"adapter file has entries that are not LoRA weights: {bad[:5]}{' ...' if len(bad) > 5 else ''}"
        )
    if not grouped:
        raise ValueError(f"adapter file in {directory} holds no LoRA weights")
    planned: dict[str, _Planned] = {}
    errors = []
    targets: dict[str, torch.Tensor] = {}
    for name, t in whole.items():
        owner, _, attr = name.rpartition(".")
        current = saved[owner].state_dict().get(attr)
        if current is None or current.shape != t.shape:
            have = None if current is None else tuple(current.shape)
            errors.append(f"{name}: the file has shape {tuple(t.shape)} but the model's is {have}")
        else:
            targets[name] = t
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
        use_dora = bool(config.get("use_dora", False))
        mag = parts.get("lora_magnitude_vector")
        if use_dora and (mag is None or tuple(mag.shape) != (layer.out_features,)):
            errors.append(f"{path}: use_dora needs lora_magnitude_vector of shape ({layer.out_features},)")
            continue
        bias = parts.get("bias")
        if bias is not None and (layer.base_layer.bias is None or bias.shape != layer.base_layer.bias.shape):
            errors.append(f"{path}: bias {tuple(bias.shape)} does not fit the layer")
            continue
        alpha = _pattern_value(config.get("alpha_pattern") or {}, path, config.get("lora_alpha", 8))
        device = layer.base_layer.weight.device
        ad = LoRAAdapter(
            layer.in_features,
            layer.out_features,
            r,
            alpha,
            float(config.get("lora_dropout") or 0.0),
            "default",
            bool(config.get("use_rslora", False)),
            use_dora,
            device,
        )
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
    with torch.no_grad():
        for name, t in targets.items():
            owner, _, attr = name.rpartition(".")
            dst = saved[owner].state_dict(keep_vars=True)[attr]
            dst.copy_(t)
    for p in planned.values():
        ad = p.adapter
        ad.requires_grad_(False)
        p.layer.adapters[adapter_name] = ad
        if p.bias is not None:
            with torch.no_grad():
                p.layer.base_layer.bias.copy_(p.bias)
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
    st.save_file(tensors, os.fspath(path), metadata={"format": "pt", "qpeft_tied": json.dumps(tied)})


def load_quantized(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a file written by ``save_quantized`` (or a bitsandbytes/transformers 4-bit
    state dict saved as safetensors) into ``model``: layers that are still ``nn.Linear`` where
    the file holds a 4-bit weight become ``Linear4bit`` (inside a QLoRALinear/IA3Linear the
    base layer is swapped), then every tensor is loaded. Adapter parameters are not in the
    file and are left as they are. Returns ``model``."""
    st = _safetensors()
    with st.safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    for key, src in json.loads(meta.get("qpeft_tied", "{}")).items():
        state[key] = state[src]
    wrappers = _wrapper_paths(model)
    mapped = {}
    for key, t in state.items():
        w = next((w for w in wrappers if key.startswith(w + ".")), None)
        mapped[key if w is None else f"{w}.base_layer.{key[len(w) + 1 :]}"] = t
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

    originals = [(path_, put(path_, new)) for path_, new in swaps]
    try:
        result = model.load_state_dict(mapped, strict=False)
    except BaseException:
        for path_, old in originals:  # the swapped layers go back (tensors already copied stay copied)
            put(path_, old)
        raise
    adapter_like = re.compile(r"\.(adapters\..+|ia3_l)$")
    missing = [k for k in result.missing_keys if not adapter_like.search(k)]
    if strict and (missing or result.unexpected_keys):
        raise ValueError(
            f"load_quantized: missing keys {missing[:8]}, unexpected keys {result.unexpected_keys[:8]}"
        )
    return model
