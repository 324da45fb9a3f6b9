"""Model conversion: swap ``nn.Linear`` layers of any PyTorch model for qpeft modules, in place.

``convert(model)`` replaces every targeted linear layer by a ``QLoRALinear`` (4-bit NF4 base
plus a LoRA adapter), an ``IA3Linear`` (``method="ia3"``) or a bare ``Linear4bit``
(``method="quantize"``), freezes everything but the adapters, and reports trainable
parameters and weight memory before and after. Target and exclude patterns follow PEFT:
a string is a regular expression matched against the whole module name, a list matches
names equal to an entry or ending in ``"." + entry``; ``"all-linear"`` takes every
``nn.Linear`` (``exclude`` removes the output head: by default ``lm_head`` and, as PEFT's
all-linear, the model's ``get_output_embeddings()`` whatever its name) but those whose
weight is tied to another module's (quantizing would untie them; a tied layer named in
``target_modules`` is refused).

Layers a transformers model keeps out of quantization (``model._keep_in_fp32_modules``,
T5's ``wo``) stay dense, as transformers + bitsandbytes keeps them, so ``save_quantized``'s
file loads there: they get a 16-bit adapter (as PEFT gives them over a bitsandbytes model),
or are left alone by ``method="quantize"``. The summary lists them.

Task heads stay as they are, trained in full, where PEFT's task models keep them in
``modules_to_save``: ``classifier`` and ``score`` of a ``*ForSequenceClassification`` or
``*ForTokenClassification`` model, ``qa_outputs`` of a ``*ForQuestionAnswering`` one (a
freshly initialised head frozen in 4 bits could not learn), matched as PEFT matches them,
by plain string suffix (DistilBERT's ``pre_classifier`` too). ``save_adapter`` saves them
whole, so PEFT loads the directory.

Conversion is atomic: the replacements are all built (weights quantized) before the model
is touched, so an error midway (a non-finite weight, an unknown option, ...) leaves the
model exactly as it was. Peak memory is therefore the original weights plus their
quantized copies (a 4-bit copy is 28% of a 16-bit weight with double quantization).
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .nn import IA3Linear, Linear4bit, MergeReport, QLoRALinear
from .nn.lora import check_alpha, check_dropout, check_rank
from .weight4bit import Weight4bit, ddp_ignore_4bit

__all__ = [
    "ConversionSummary",
    "add_adapter",
    "convert",
    "disable_adapters",
    "merge_adapters",
    "set_adapter",
    "unmerge_adapters",
    "weight_bytes",
]

# PEFT's task models add these to modules_to_save whatever the config says
# (PeftModelForSequenceClassification, ...TokenClassification, ...QuestionAnswering), and
# skip names the model lacks.
TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model, from its class name (None if unknown)."""
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


def names_module(path: str, name: str) -> bool:
    """PEFT's modules_to_save matching (``_set_trainable``: ``key.endswith(target_key)``), a
    plain string suffix: "classifier" also names DistilBERT's ``pre_classifier``, which PEFT's
    SEQ_CLS model therefore trains and saves in full too."""
    return path.endswith(name)


def task_heads(model: nn.Module, task: str | None = None) -> dict[str, nn.Module]:
    """The modules PEFT trains in full for the model's task (``task``, default from the
    class name): path -> module, outermost only; names the model lacks are skipped."""
    names = TASK_HEADS.get(task if task is not None else task_type(model), ())
    found: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if path and any(names_module(path, t) for t in names):
            if not any(path.startswith(f + ".") for f in found):
                found[path] = module
    return found


WRAPPERS = (QLoRALinear, IA3Linear)
QPEFT_MODULES = (QLoRALinear, IA3Linear, Linear4bit)
METHODS = ("lora", "ia3", "quantize")
DEFAULT_EXCLUDE = ("lm_head",)
_QUANT_OPTIONS = {"quant_type", "blocksize", "double_quant", "compute_dtype"}
_OPTIONS = {
    "lora": _QUANT_OPTIONS | {"init", "use_rslora", "use_dora", "train_bias"},
    "ia3": _QUANT_OPTIONS,
    "quantize": _QUANT_OPTIONS,
}


@dataclass
class ConversionSummary:
    """What ``convert`` did: layer count, parameter counts and weight bytes (parameters,
    buffers and 4-bit quantization statistics, shared tensors counted once)."""

    method: str
    converted: int
    trainable_params: int
    total_params: int
    weight_bytes_before: int
    weight_bytes_after: int
    seconds: float
    # layers kept in 16 bits (adapted, not quantized, or left alone with method="quantize"):
    # those matching a transformers model's _keep_in_fp32_modules, as transformers+bitsandbytes
    # leaves them unquantized
    kept_dense: tuple[str, ...] = ()
    # linears "all-linear" left alone: their weight is tied to another module's (quantizing
    # would untie it)
    tied: tuple[str, ...] = ()

    def __str__(self) -> str:
        mib = 2.0**20
        pct = 100.0 * self.trainable_params / max(1, self.total_params)
        ratio = self.weight_bytes_after / max(1, self.weight_bytes_before)
        if self.weight_bytes_before == self.weight_bytes_after == 0:  # a meta-device model
            memory = "weight memory: none allocated yet (meta device)"
        else:
            memory = (
                f"weight memory {self.weight_bytes_before / mib:.2f} MiB -> "
                f"{self.weight_bytes_after / mib:.2f} MiB ({ratio:.1%})"
            )
        notes = ""
        if self.kept_dense:
            notes += f"; kept dense (model._keep_in_fp32_modules): {_listed(self.kept_dense)}"
        if self.tied:
            notes += f"; left unconverted (weight tied to another module's): {_listed(self.tied)}"
        return (
            f"qpeft.convert ({self.method}): {self.converted} linear layers in {self.seconds:.1f} s; trainable "
            f"parameters {self.trainable_params:,} of {self.total_params:,} ({pct:.3f}%); {memory}{notes}"
        )


def _listed(names, n: int = 5) -> str:
    names = list(names)
    return f"{', '.join(names[:n])}{' ...' if len(names) > n else ''}"


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        if isinstance(t, Weight4bit):  # its codes and statistics, not its logical size
            total += _tensor_bytes([t.packed, t.absmax, t.nested_absmax, t.offset])
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _quant_state_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    for m in model.modules():
        if isinstance(m, Linear4bit) and not isinstance(m.weight, Weight4bit):
            st = m.quant_state
            yield st.absmax
            if st.nested:
                yield st.state2.absmax
                yield st.offset


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters, buffers and 4-bit statistics (each tensor once)."""
    return _tensor_bytes([*model.parameters(), *model.buffers(), *_quant_state_tensors(model)])


def _param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a packed 4-bit buffer counts 2 parameters per byte."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total  # a Weight4bit counts its logical out * in elements


def _matcher(spec, what: str):
    """PEFT's matching: str -> re.fullmatch on the name; list -> equal or '.'-suffix."""
    if spec is None:
        return lambda name: False
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise ValueError(f"{what} {spec!r} is not a valid regular expression: {exc}") from None
        return lambda name: pattern.fullmatch(name) is not None
    entries = list(spec)
    if not all(isinstance(e, str) for e in entries):
        raise TypeError(f"{what} must be a string or a list of strings, got {spec!r}")
    return lambda name: any(name == e or name.endswith("." + e) for e in entries)


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """A transformers model's output (vocabulary) layer, ``model.get_output_embeddings()``,
    whatever it is named (``lm_head``, ``lm_head.decoder``, ``cls.predictions.decoder``):
    PEFT's "all-linear" leaves it out. None for other models."""
    get = getattr(model, "get_output_embeddings", None)
    if not callable(get):
        return None
    try:
        out = get()
    except (AttributeError, NotImplementedError):
        return None
    return out if isinstance(out, nn.Module) else None


def keep_dense_matcher(model: nn.Module):
    """Module name -> whether transformers keeps it out of bitsandbytes quantization for
    ``model._keep_in_fp32_modules`` (T5's ``wo``), matched as transformers matches it
    (quantizers_utils.should_convert_module): a pattern from the start up to a module
    boundary, as a regular expression with that boundary, or as a suffix."""
    patterns = getattr(model, "_keep_in_fp32_modules", None)
    if not patterns:
        return lambda name: False
    if isinstance(patterns, str):
        patterns = [patterns]
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    compiled = []
    for key in patterns:
        try:
            compiled.append((key, re.compile(rf"(?:{key}){boundary}")))
        except re.error:
            compiled.append((key, None))
    return lambda name: any(
        (rx is not None and rx.match(name) is not None) or name.endswith(key) for key, rx in compiled
    )


def _tied_elsewhere(model: nn.Module, targets: dict[int, tuple[nn.Linear, list[str]]]) -> dict[int, str]:
    """id(module) -> a description of the tie, for the targets holding a parameter that another
    module holds too (``lm_head.weight`` tied to the input embedding): quantizing it would
    untie them, silently, and ``model.tie_weights()`` could not tie them again."""
    names_of: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(n)
    tied = {}
    for key, (linear, names) in targets.items():
        for attr, p in linear.named_parameters(recurse=False):
            own = {f"{n}.{attr}" for n in names}
            others = [n for n in names_of.get(id(p), []) if n not in own]
            if others:
                tied[key] = f"{names[0]}.{attr} is tied to {others[0]}"
                break
    return tied


def _inside_qpeft_module(name: str, qpeft_prefixes: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in qpeft_prefixes)


def _targets(
    model: nn.Module, target_modules, exclude, heads: Iterable[str] = (), skip: Iterable[nn.Module] = ()
) -> dict[int, tuple[nn.Linear, list[str]]]:
    """id(module) -> (module, every name it is reachable under), for the modules to convert
    (none inside the task ``heads``, given by path, and none of the modules ``skip``)."""
    if isinstance(target_modules, str) and target_modules != "all-linear":
        wanted = _matcher(target_modules, "target_modules")
    elif target_modules == "all-linear":
        wanted = None
    else:
        if not target_modules:
            raise ValueError("target_modules is empty")
        wanted = _matcher(target_modules, "target_modules")
    matched = _matcher(exclude, "exclude")
    heads = tuple(heads)
    skipped = {id(m) for m in skip}

    def excluded(name: str) -> bool:
        return matched(name) or any(name == h or name.startswith(h + ".") for h in heads)

    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if n]
    qpeft_prefixes = [n for n, m in named if isinstance(m, QPEFT_MODULES)]
    # nn.MultiheadAttention reads out_proj.weight directly (F.multi_head_attention_forward):
    # its projection cannot be swapped for a module with a packed weight.
    mha_children = {id(c) for _, m in named if isinstance(m, nn.MultiheadAttention) for c in m.children()}
    names_of: dict[int, list[str]] = {}
    for n, m in named:
        names_of.setdefault(id(m), []).append(n)
    chosen: dict[int, tuple[nn.Linear, list[str]]] = {}
    wrong, already, converted, bnb = [], [], [], []
    for n, m in named:
        if _inside_qpeft_module(n, qpeft_prefixes) or id(m) in chosen:
            continue
        if wanted is None:
            hit = isinstance(m, nn.Linear)
            if isinstance(m, QPEFT_MODULES) and not any(excluded(a) for a in names_of[id(m)]):
                converted.append(n)  # "all-linear" skips these; an error only if nothing is left
        else:
            hit = wanted(n)
        if not hit:
            continue
        if id(m) in skipped or any(excluded(alias) for alias in names_of[id(m)]):
            continue
        if isinstance(m, QPEFT_MODULES):
            already.append(n)
        elif type(m).__module__.split(".")[0] == "bitsandbytes":  # bnb's Linear4bit subclasses nn.Linear
            bnb.append(f"{n} ({type(m).__name__})")
        elif id(m) in mha_children:
            if wanted is not None:
                wrong.append(f"{n} (inside nn.MultiheadAttention, which reads its weight directly)")
        elif not isinstance(m, nn.Linear):
            wrong.append(f"{n} ({type(m).__name__})")
        else:
            chosen[id(m)] = (m, names_of[id(m)])
    if bnb:
        raise TypeError(
            f"{', '.join(bnb[:5])}{' ...' if len(bnb) > 5 else ''} are already bitsandbytes 4-bit (or 8-bit) layers "
            "(the model was loaded with a BitsAndBytesConfig); qpeft.convert quantizes full-precision nn.Linear "
            "weights. Save that model (model.save_pretrained(dir)), build it without quantization (e.g. "
            "from_config(model.config)), convert that and load the 4-bit weights into it: "
            "qpeft.load_quantized(qpeft.convert(model), 'dir/model.safetensors')"
        )
    if already:
        raise ValueError(
            f"already converted: {', '.join(already[:5])}{' ...' if len(already) > 5 else ''}; use "
            "qpeft.add_adapter(model, name, ...) to add another adapter to converted layers"
        )
    if wrong:
        raise TypeError(
            "target_modules must select torch.nn.Linear layers only; these are not: "
            + ", ".join(wrong[:8])
            + (" ..." if len(wrong) > 8 else "")
        )
    if not chosen and converted:
        raise ValueError(
            f"the model is already converted ({', '.join(converted[:5])}"
            f"{' ...' if len(converted) > 5 else ''} are qpeft layers) and has no nn.Linear layer left "
            "to convert; use qpeft.add_adapter(model, name, ...) to add another adapter"
        )
    if not chosen:
        kept = f"; the task heads {list(heads)} stay unconverted" if heads else ""
        conv1d = [n for n, m in named if type(m).__name__ == "Conv1D"]
        if conv1d:
            kept += (
                f"; the model's projections ({_listed(conv1d)}) are transformers Conv1D layers (GPT-2 style, "
                "weight stored [in, out]), which qpeft does not convert: replace each by an nn.Linear holding "
                "its weight transposed first"
            )
        raise ValueError(
            f"target_modules={target_modules!r} (exclude={exclude!r}) selects no nn.Linear layer{kept}"
        )
    return chosen


def _dense_and_tied(
    model: nn.Module, targets: dict[int, tuple[nn.Linear, list[str]]], target_modules, method: str
) -> tuple[dict[int, tuple[nn.Linear, list[str]]], set[int], list[str], list[str]]:
    """The targets to build with quantize=True, split: (targets, the ids of those to build
    dense, the names of the modules kept dense, the names of the tied linears "all-linear"
    leaves alone).

    Kept dense: the modules a transformers model keeps out of 4-bit quantization
    (``_keep_in_fp32_modules``, T5's ``wo``), which transformers + bitsandbytes builds dense,
    so that ``save_quantized``'s file loads there; PEFT adapts them as 16-bit layers, and so
    does convert (method "quantize" leaves them alone). Tied: a linear whose weight another
    module holds too (a tied ``lm_head``) would be untied by quantization; "all-linear" leaves
    it alone, as it does a projection nn.MultiheadAttention reads, and a target named
    explicitly is refused."""
    keep = keep_dense_matcher(model)
    dense = {k for k, (_, names) in targets.items() if any(keep(n) for n in names)}
    kept = [targets[k][1][0] for k in dense]
    if method == "quantize":
        targets = {k: v for k, v in targets.items() if k not in dense}
        dense = set()
    ties = _tied_elsewhere(model, {k: v for k, v in targets.items() if k not in dense})
    if ties and target_modules != "all-linear":
        names = [targets[k][1][0] for k in ties]
        raise ValueError(
            f"{'; '.join(ties.values())}: quantizing it would untie them (transformers ties an output "
            "layer to the input embedding, tie_word_embeddings) and model.tie_weights() could not tie them "
            f"again; leave it out (exclude={names!r}), untie the weights first, or convert with quantize=False"
        )
    tied = [targets[k][1][0] for k in ties]
    targets = {k: v for k, v in targets.items() if k not in ties}
    if not targets:
        why = [f"kept dense (model._keep_in_fp32_modules): {_listed(kept)}"] if kept else []
        why += [f"weight tied to another module's: {_listed(tied)}"] if tied else []
        raise ValueError(
            f"target_modules={target_modules!r} selects no nn.Linear layer to quantize; {'; '.join(why)}"
        )
    return targets, dense, kept, tied


def _refuse_meta(targets: dict[int, tuple[nn.Linear, list[str]]], method: str, options) -> None:
    # A meta model converts to meta 4-bit layers (shapes and formats, no values) that
    # qpeft.load_safetensors fills (docs/distributed.md, "Loading on the meta device"). What
    # needs the weight's values at conversion is refused: DoRA's magnitude starts at the row
    # norms of the base weight, and a layer half on the meta device would be quantized from
    # its real values into a layer the loader then overwrites.
    meta = [names[0] for linear, names in targets.values() if linear.weight.device.type == "meta"]
    if not meta:
        return
    listed = f"{', '.join(meta[:5])}{' ...' if len(meta) > 5 else ''}"
    if method == "lora" and options.get("use_dora"):
        raise ValueError(
            f"use_dora=True needs the base weights' values (DoRA's magnitude starts at their row norms), but "
            f"{listed} hold their weights on the meta device; load the weights first (or convert without "
            "DoRA, then load with qpeft.load_safetensors)"
        )
    partial = [
        names[0]
        for linear, names in targets.values()
        if linear.weight.device.type == "meta"
        and linear.bias is not None
        and linear.bias.device.type != "meta"
    ]
    if partial:
        raise ValueError(
            f"{', '.join(partial[:5])} hold their weight on the meta device but their bias elsewhere: "
            "build the whole model on the meta device (with torch.device('meta'): ...) or materialize it"
        )


def _build_meta(linear: nn.Linear, method: str, r, alpha, dropout, adapter_name: str, options) -> nn.Module:
    """The layer ``_build`` makes, with a meta-device 4-bit weight of the right shape, dtype and
    format (no values; qpeft.load_safetensors fills it). Adapters are built on the meta device
    too; the loader initializes them (``_qpeft_init`` records PEFT's init to apply)."""
    opts = dict(options)
    quant = {
        k: opts.pop(k) for k in ("quant_type", "blocksize", "double_quant", "compute_dtype") if k in opts
    }
    dtype = linear.weight.dtype if linear.weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    base = Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        device="meta",
        dtype=dtype,
        **quant,
    )
    if linear.bias is not None and linear.bias.dtype != dtype:
        base.bias = nn.Parameter(torch.empty_like(linear.bias), requires_grad=False)
    if method == "lora":
        layer = QLoRALinear(base, adapter_name, r, alpha, dropout, **opts)
        for ad in layer.adapters.values():
            ad._qpeft_init = opts.get("init", "default")
        return layer
    if method == "ia3":
        return IA3Linear(base)
    return base


class _Progress:
    """A one-line stderr progress bar (no tqdm needed); silent unless enabled."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.t0 = total, enabled, time.perf_counter()

    def update(self, done: int, name: str) -> None:
        if not self.enabled:
            return
        width = 30
        fill = int(width * done / self.total)
        sys.stderr.write(
            f"\rqpeft.convert [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
            f"{time.perf_counter() - self.t0:5.1f}s {name[-40:]:<40}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _build(
    linear: nn.Linear, method: str, r, alpha, dropout, quantize: bool, adapter_name: str, options
) -> nn.Module:
    if quantize and linear.weight.device.type == "meta":
        return _build_meta(linear, method, r, alpha, dropout, adapter_name, options)
    if method == "lora":
        return QLoRALinear.from_linear(
            linear, r, alpha, dropout, quantize, adapter_name=adapter_name, **options
        )
    if method == "ia3":
        return IA3Linear.from_linear(linear, quantize, **options)
    return Linear4bit.from_linear(linear, **options)


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def convert(
    model: nn.Module,
    target_modules: str | Iterable[str] = "all-linear",
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    quantize: bool = True,
    exclude: str | Iterable[str] | None = DEFAULT_EXCLUDE,
    *,
    method: str = "lora",
    adapter_name: str = "default",
    verbose: bool = True,
    progress: bool | None = None,
    **options: Any,
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` layers of ``model`` in place and return ``model``.

    method "lora": ``QLoRALinear.from_linear(linear, r, alpha, dropout, quantize, **options)``
    (options: quant_type, blocksize, double_quant, compute_dtype, init, use_rslora, use_dora,
    train_bias); "ia3": ``IA3Linear`` (quantize and quant options); "quantize": a frozen
    ``Linear4bit`` (quant options; nothing trainable: for PEFT's prompt methods). Every
    parameter but the new adapters (and BitFit biases) is frozen. Task heads (``classifier``
    / ``score`` of a sequence or token classification model, ``qa_outputs`` of a question
    answering one: PEFT's modules_to_save for the task) are never converted, whatever
    ``target_modules`` says, and stay trainable with "lora" and "ia3" ("quantize" freezes
    them too: PEFT's task model makes its own trainable copy). Layers an earlier ``convert``
    made keep their trainable parameters trainable. The summary
    (:class:`ConversionSummary`) is stored as ``model.qpeft_summary`` and printed when
    ``verbose``. ``progress``: a stderr progress bar (default: when stderr is a terminal
    and more than 16 layers are converted).

    On a model built on the meta device the layers are built with meta 4-bit weights (shapes
    and formats, no values) for ``qpeft.load_safetensors`` to fill; DoRA is refused there
    (docs/distributed.md, "Loading on the meta device").
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert needs a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "lora":
        check_rank(r)
        check_alpha(alpha)
        check_dropout(dropout)
    elif method == "quantize" and not quantize:
        raise ValueError("method='quantize' with quantize=False would change nothing")
    unknown = set(options) - _OPTIONS[method]
    if unknown:
        raise TypeError(
            f"unknown option(s) for method {method!r}: {sorted(unknown)}; known: {sorted(_OPTIONS[method])}"
        )
    t0 = time.perf_counter()
    heads = task_heads(model)
    if exclude is not None and not isinstance(exclude, str):
        exclude = tuple(exclude)
    skip = ()
    if target_modules == "all-linear" and exclude == DEFAULT_EXCLUDE:
        # PEFT's all-linear leaves out the output layer whatever its name (RoBERTa's
        # lm_head.decoder, BERT's cls.predictions.decoder), which is often tied to the input
        # embedding; an explicit exclude replaces the default, output layer included
        out = output_embeddings(model)
        skip = (out,) if out is not None else ()
    targets = _targets(model, target_modules, exclude, heads, skip)
    dense: set[int] = set()
    kept: list[str] = []
    tied: list[str] = []
    if quantize:
        targets, dense, kept, tied = _dense_and_tied(model, targets, target_modules, method)
        _refuse_meta(targets, method, options)
    before = weight_bytes(model)
    flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
    # the trainable parameters of layers an earlier convert made stay trainable
    earlier = [
        (p, p.requires_grad) for m in model.modules() if isinstance(m, QPEFT_MODULES) for p in m.parameters()
    ]
    show = progress if progress is not None else (sys.stderr.isatty() and len(targets) > 16)
    bar = _Progress(len(targets), show)
    built: list[tuple[list[str], nn.Module]] = []
    try:
        for i, (key, (linear, names)) in enumerate(targets.items(), 1):
            q = quantize and key not in dense
            try:
                module = _build(linear, method, r, alpha, dropout, q, adapter_name, options)
            except (ValueError, TypeError) as exc:  # name the layer: a model has many
                raise type(exc)(f"converting {names[0]!r}: {exc}") from exc
            built.append((names, module))
            bar.update(i, names[0])
    except BaseException:
        for p, flag in flags.values():  # quantize=False wrappers froze the original layers
            p.requires_grad_(flag)
        raise
    finally:
        bar.close()
    for names, module in built:
        for name in names:
            _set_child(model, name, module)
    for p in model.parameters():
        p.requires_grad_(False)
    for p, flag in earlier:
        p.requires_grad_(flag)
    for _, module in built:
        if isinstance(module, QLoRALinear):
            module.set_adapter(module.active_adapter)  # re-enables the adapter (and BitFit bias)
        elif isinstance(module, IA3Linear):
            module.ia3_l.requires_grad_(True)
    if method != "quantize":
        for head in heads.values():
            if not any(isinstance(m, QPEFT_MODULES) for m in head.modules()):
                head.requires_grad_(True)
    trainable, total = _param_counts(model)
    summary = ConversionSummary(
        method,
        len(built),
        trainable,
        total,
        before,
        weight_bytes(model),
        time.perf_counter() - t0,
        tuple(kept),
        tuple(tied),
    )
    model.qpeft_summary = summary
    ddp_ignore_4bit(model)  # DDP(model) skips the frozen 4-bit weights (docs/distributed.md)
    if verbose:
        print(summary)
    return model


# --- model-level adapter management ---------------------------------------------------------
def _lora_layers(model: nn.Module) -> list[QLoRALinear]:
    layers = [m for m in model.modules() if isinstance(m, QLoRALinear)]
    if not layers:
        raise ValueError("the model has no qpeft QLoRALinear layer; run qpeft.convert(model) first")
    return layers


def add_adapter(
    model: nn.Module,
    name: str,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    *,
    init: str = "default",
    use_rslora: bool = False,
    use_dora: bool = False,
) -> None:
    """Add adapter ``name`` to every QLoRALinear of the model (activate it with set_adapter)."""
    check_rank(r)
    check_alpha(alpha)
    check_dropout(dropout)
    layers = _lora_layers(model)
    clash = [m for m in layers if name in m.adapters]
    if clash:
        raise ValueError(f"adapter {name!r} already exists on {len(clash)} layer(s)")
    for m in layers:  # refused before any layer changes
        m.check_can_add()
    for m in layers:
        m.add_adapter(name, r, alpha, dropout, init, use_rslora, use_dora)


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the active (and only trainable) adapter of every QLoRALinear that has it;
    layers without it run their base alone."""
    layers = _lora_layers(model)
    if not any(name in m.adapters for m in layers):
        raise KeyError(f"no layer of the model has an adapter named {name!r}")
    for m in layers:
        m.set_adapter(name if name in m.adapters else None)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """``with qpeft.disable_adapters(model):`` the model computes its base (quantized) output."""
    layers = [m for m in model.modules() if isinstance(m, WRAPPERS)]
    states = [m.adapters_enabled for m in layers]
    try:
        for m in layers:
            m.disable_adapters()
        yield model
    finally:
        for m, on in zip(layers, states):
            if on:
                m.enable_adapters()


def merge_adapters(model: nn.Module, keep_original: bool | None = None) -> dict[str, MergeReport]:
    """Merge the active adapter of every QLoRALinear; returns each layer's MergeReport by name.
    Refused before any layer changes (RuntimeError): a model sharded by FSDP2 (naming the way:
    save the adapter, merge in one process on the unsharded model), a layer already merged or
    with its adapters disabled."""
    layers = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, QLoRALinear) and m.active_adapter is not None
    ]
    for n, m in layers:  # every refusal before any layer changes
        m.check_not_sharded("merge")
        if m.merged_adapter is not None:
            raise RuntimeError(f"{n}: adapter {m.merged_adapter!r} is already merged; unmerge first")
        if not m.adapters_enabled:
            raise RuntimeError(f"{n}: adapters are disabled; enable them before merging")
    return {n: m.merge(keep_original=keep_original) for n, m in layers}


def unmerge_adapters(model: nn.Module) -> dict[str, MergeReport]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear) and m.merged_adapter]
    for _, m in layers:
        m.check_not_sharded("unmerge")
    return {n: m.unmerge() for n, m in layers}
