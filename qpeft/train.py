"""QLoRA fine-tuning of a transformers causal LM on one or many processes.

    torchrun --nproc-per-node N -m qpeft.train --config tiny-llama --strategy fsdp2 --steps 100
    python -m qpeft.train --strategy none ...          # one process, no process group

The model is built from a transformers config (``--config tiny-llama``: a small LlamaConfig,
random weights; or ``--config path/to/config.json``) or loaded from a local directory
(``--model DIR``, ``from_pretrained``; nothing is downloaded), converted by
``qpeft.convert`` (4-bit base + LoRA adapters), and trained on a text file (``--data``;
default qpeft/data/river_town.txt, as in ``python -m qpeft demo``).

Strategies: ``fsdp2`` (``fully_shard`` on every decoder layer, then on the root, with an
optional ``MixedPrecisionPolicy``), ``ddp`` (``DistributedDataParallel``), ``none`` (one
process). The process-group backend follows the device: NCCL on CUDA, gloo on CPU.
``--batch-size`` is the global batch: rank r of W takes rows [r B/W, (r+1) B/W) of each
step's batch, and ``--grad-accum K`` splits a rank's rows into K micro-batches (backward of
loss / K each), so ``--strategy none --grad-accum W`` computes what W ranks compute. The
loss logged on rank 0 is the mean over ranks (and micro-batches) of the per-micro-batch
mean token loss. ``--save DIR`` writes the trainable parameters and the optimizer state
with torch.distributed.checkpoint (``get_state_dict``); ``--resume DIR`` continues from it
(same base model and arguments). docs/distributed.md, "The training recipe".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import qpeft
import qpeft.optim as qo

STRATEGIES = ("fsdp2", "ddp", "none")
OPTIMIZERS = {"adamw": qo.AdamW, "adamw8bit": qo.AdamW8bit, "paged_adamw8bit": qo.PagedAdamW8bit}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# A small LlamaConfig for tests and smoke runs: byte-level vocabulary (the demo's tokens).
TINY_LLAMA = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=10,
    eos_token_id=10,
    tie_word_embeddings=False,
)
PRESETS = {"tiny-llama": TINY_LLAMA}
CKPT_META = "qpeft_train.json"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


# torch.manual_seed takes 64 bits, and the batches' seed is seed * 1_000_003 + step
MAX_SEED = 2**32 - 1


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m qpeft.train", description=__doc__.split("\n\n")[0] + " (see docs/distributed.md)"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="'tiny-llama' or a transformers config.json (random init)")
    src.add_argument("--model", help="local directory for from_pretrained (no downloads)")
    p.add_argument("--data", help="UTF-8 text file (default: qpeft/data/river_town.txt)")
    p.add_argument(
        "--tokenizer",
        choices=("auto", "bytes", "model"),
        default="auto",
        help="bytes: UTF-8 bytes as tokens (needs vocab >= 256); model: --model DIR's tokenizer; "
        "auto: model with --model, bytes with --config",
    )
    p.add_argument("--strategy", choices=STRATEGIES, default="fsdp2")
    p.add_argument("--r", type=_positive, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=_positive_float, default=16.0, help="LoRA alpha")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (0: the fused path)")
    p.add_argument(
        "--targets", default="all-linear", help="comma-separated module names or 'all-linear' (PEFT's rules)"
    )
    p.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    p.add_argument("--double-quant", action="store_true", help="quantize the absmax too (QLoRA's DQ)")
    p.add_argument("--optim", choices=sorted(OPTIMIZERS), default="adamw")
    p.add_argument("--steps", type=_positive, default=20, help="optimizer steps in total (a resume included)")
    p.add_argument("--batch-size", type=_positive, default=8, help="global sequences per step")
    p.add_argument("--grad-accum", type=_positive, default=1, help="micro-batches per rank per step")
    p.add_argument("--seq-len", type=_positive, default=64, help="tokens per sequence")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.0)
    p.add_argument("--seed", type=_seed, default=0, help="seed of the random init and the batches")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layers in backward")
    p.add_argument("--param-dtype", choices=sorted(DTYPES), help="fsdp2 MixedPrecisionPolicy param_dtype")
    p.add_argument("--reduce-dtype", choices=sorted(DTYPES), help="fsdp2 MixedPrecisionPolicy reduce_dtype")
    p.add_argument("--compute-dtype", choices=sorted(DTYPES), help="dtype of the 4-bit layers' compute")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--save", help="directory for a DCP checkpoint at the end (or at --save-at)")
    p.add_argument("--save-at", type=_positive, help="step after which --save is written (default: last)")
    p.add_argument("--resume", help="DCP checkpoint directory written by --save")
    p.add_argument(
        "--threads", type=_non_negative, default=0, help="torch CPU threads per process (0: torch's)"
    )
    p.add_argument("--log-file", help="rank 0 also writes the per-step losses here as JSON")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.config is None and args.model is None:
        p.error("give the model: --config tiny-llama, --config path/to/config.json or --model DIR")
    if args.config is not None and args.config not in PRESETS and not os.path.isfile(args.config):
        p.error(f"--config {args.config!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    if args.config is not None and args.config not in PRESETS:
        try:
            config = json.loads(Path(args.config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            p.error(f"--config {args.config!r} is not a readable JSON config.json ({exc})")
        if not isinstance(config, dict):
            p.error(f"--config {args.config!r} is not a config.json (its JSON is not an object)")
    if args.model is not None and not os.path.isdir(args.model):
        p.error(f"--model {args.model!r} is not a directory (only local models can be loaded)")
    if args.model is not None and not os.path.isfile(os.path.join(args.model, "config.json")):
        p.error(f"--model {args.model!r} has no config.json: give a directory written by save_pretrained")
    if args.device is not None:
        from .__main__ import UsageError, check_device

        try:
            check_device(args.device)
        except UsageError as exc:
            p.error(str(exc))
    if args.targets != "all-linear" and not [t for t in args.targets.split(",") if t]:
        p.error(
            f"--targets {args.targets!r} names no module: give module names (q_proj,v_proj) or all-linear"
        )
    if args.tokenizer == "model" and args.model is None:
        p.error("--tokenizer model needs --model DIR (a config-built model has no tokenizer)")
    if args.data is not None and not os.path.isfile(args.data):
        p.error(f"--data {args.data!r} is not a file")
    if args.strategy != "fsdp2" and (args.param_dtype or args.reduce_dtype):
        p.error("--param-dtype/--reduce-dtype set FSDP2's MixedPrecisionPolicy: they need --strategy fsdp2")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.save_at is not None and args.save is None:
        p.error("--save-at needs --save DIR")
    if args.save_at is not None and args.save_at > args.steps:
        p.error(f"--save-at {args.save_at} is after the last step (--steps {args.steps})")
    if args.resume is not None and not os.path.isfile(os.path.join(args.resume, CKPT_META)):
        p.error(f"--resume {args.resume!r} is not a checkpoint written by --save (no {CKPT_META})")
    if args.resume is not None:
        differ = _differs_from_checkpoint(args)
        if differ:
            p.error(
                f"--resume {args.resume!r} was saved by a run with other arguments that define the model "
                f"and its training state ({'; '.join(differ)}): the checkpoint holds only the adapters and "
                "optimizer state, the base is rebuilt from these arguments, so resume with the saved values"
            )
        try:
            start = _checkpoint_step(args.resume)
        except (OSError, ValueError, KeyError, TypeError):
            p.error(f"--resume {args.resume!r}: its {CKPT_META} has no readable 'step'")
        if start >= args.steps:
            p.error(f"--resume {args.resume!r} is at step {start}; --steps {args.steps} leaves nothing to do")
        if args.save is not None and (args.save_at or args.steps) <= start:
            p.error(
                f"--save-at {args.save_at or args.steps}: the checkpoint --resume {args.resume!r} is at step "
                f"{start} and this run trains steps {start + 1}..{args.steps}, so nothing would be saved; "
                f"give --save-at in {start + 1}..{args.steps}"
            )
    # Outputs are checked before any work (on every rank), not found unwritable after training.
    if args.save is not None:
        problem = _unwritable_dir(args.save)
        if problem:
            p.error(f"--save {args.save!r}: {problem}")
    if args.log_file is not None:
        problem = _unwritable_file(args.log_file)
        if problem:
            p.error(f"--log-file {args.log_file!r}: {problem}")
    return args


def _unwritable_dir(path: str) -> str | None:
    """Why the directory ``path`` cannot be written (it is created if missing), or None."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a directory"
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as exc:
        return f"cannot create or write the directory ({exc.strerror or exc})"
    return None


def _unwritable_file(path: str) -> str | None:
    """Why the file ``path`` cannot be written, or None (nothing is created)."""
    if os.path.isdir(path):
        return "is a directory; give a file name"
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        return f"the directory {parent!r} does not exist"
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        return f"cannot write in {parent!r} ({exc.strerror or exc})"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "is not writable"
    return None


def _checkpoint_step(path: str) -> int:
    return int(json.loads(Path(path, CKPT_META).read_text(encoding="utf-8"))["step"])


# Arguments that define the frozen base (rebuilt on resume, not saved), the adapters' shapes and
# the optimizer state's layout: a resume must use the values the checkpoint was saved with.
RESUME_FIXED = ("config", "model", "seed", "quant_type", "double_quant", "targets", "r", "alpha", "optim")


def _differs_from_checkpoint(args) -> list[str]:
    """``--flag saved X, now Y`` for each RESUME_FIXED argument that differs from the one
    recorded in the checkpoint's CKPT_META (arguments it does not record are not compared)."""
    try:
        saved = json.loads(Path(args.resume, CKPT_META).read_text(encoding="utf-8"))["args"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{CKPT_META} is unreadable or has no 'args'"]
    return [
        f"--{k.replace('_', '-')} saved {saved[k]!r}, now {getattr(args, k)!r}"
        for k in RESUME_FIXED
        if k in saved and saved[k] != getattr(args, k)
    ]


# --- model and data ------------------------------------------------------------------------


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit("qpeft.train needs Hugging Face transformers: pip install transformers") from None
    return transformers


def build_model(args) -> nn.Module:
    tf = _transformers()
    torch.manual_seed(args.seed)  # every rank builds the same random model
    if args.model is not None:
        return tf.AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True, dtype="auto")
    if args.config in PRESETS:
        config = tf.LlamaConfig(**PRESETS[args.config])
    else:
        config = tf.AutoConfig.from_pretrained(args.config, local_files_only=True)
    return tf.AutoModelForCausalLM.from_config(config)


def load_tokens(args, vocab_size: int) -> torch.Tensor:
    """Byte-level tokens (UTF-8 bytes, qpeft.demo's ByteTokenizer) for a config-built model
    (or ``--tokenizer bytes``); the directory's own tokenizer for ``--model DIR``."""
    if args.data is None:
        from .demo import load_text

        text = load_text()
    else:
        text = Path(args.data).read_text(encoding="utf-8")
    if args.tokenizer == "model" or (args.tokenizer == "auto" and args.model is not None):
        try:
            tok = _transformers().AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise SystemExit(
                f"cannot load a tokenizer from --model {args.model!r} ({exc}); add one to the directory or "
                "pass --tokenizer bytes"
            ) from None
        ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    else:
        from .demo import ByteTokenizer

        if vocab_size < 256:
            raise SystemExit(
                f"byte-level tokens need a vocabulary of at least 256, the config has {vocab_size}"
            )
        ids = ByteTokenizer().encode(text)
    if ids.numel() < args.seq_len + 2:
        raise SystemExit(f"--data has {ids.numel()} tokens, fewer than --seq-len {args.seq_len} + 2")
    return ids


def batch_for_step(tokens: torch.Tensor, step: int, args) -> torch.Tensor:
    """The global batch of ``step`` (1-based): a function of (seed, step) only, so every
    rank, world size and resumed run sees the same sequences."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, tokens.numel() - args.seq_len, (args.batch_size,), generator=gen)
    return torch.stack([tokens[s : s + args.seq_len] for s in starts.tolist()])


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 wraps one by one: the largest nn.ModuleList of the model
    (``model.model.layers`` in Llama, ``transformer.h`` in GPT-2)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError("the model has no nn.ModuleList of decoder layers to shard")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def unshardable_params(model: nn.Module) -> set[nn.Parameter]:
    """Parameters fully_shard cannot shard: non-floating-point ones (packed 4-bit weights,
    should they be parameters) unless their class implements FSDP2's all-gather extension
    (``fsdp_pre_all_gather``/``fsdp_post_all_gather``). They are passed as ``ignored_params``
    and stay whole on every rank. qpeft's 4-bit weights (``qpeft.Weight4bit``) implement the
    extension, so this set is empty for a converted model and the 4-bit base is sharded by
    rows (docs/distributed.md). A capability check, not a check of qpeft's storage."""
    return {
        p
        for p in model.parameters()
        if not p.dtype.is_floating_point and not hasattr(type(p.data), "fsdp_pre_all_gather")
    }


def wrap(model: nn.Module, args, device: torch.device, world: int) -> nn.Module:
    if args.activation_checkpointing:
        # Non-reentrant: composes with FSDP2's per-layer all-gathers and qpeft's autograd
        # functions. transformers 5 renamed the method (the old name warns, then goes).
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise SystemExit(
                "--activation-checkpointing needs a transformers model (activation_checkpointing_enable)"
            )
        model.config.use_cache = False  # no KV cache in training (transformers says so otherwise)
    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # The frozen base is the same on every rank (same seed or checkpoint): no buffer
        # broadcast per forward (it would send every 4-bit weight each step).
        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, broadcast_buffers=False)
    if args.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (world,))
        kw = {"mesh": mesh}
        if args.param_dtype or args.reduce_dtype:
            kw["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=DTYPES.get(args.param_dtype), reduce_dtype=DTYPES.get(args.reduce_dtype)
            )
        ignored = unshardable_params(model)
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer, ignored_params={p for p in layer.parameters() if p in ignored} or None, **kw)
        fully_shard(model, ignored_params=ignored or None, **kw)
        if torch.distributed.get_rank() == 0:
            print(
                f"fsdp2: {len(layers)} decoder layers + root sharded over {world} rank(s); "
                f"{len(ignored)} unshardable parameter(s) kept whole (ignored_params)",
                flush=True,
            )
    return model


# --- distributed setup ---------------------------------------------------------------------


def setup(args) -> tuple[int, int, torch.device, bool]:
    """(rank, world, device, whether this call created the process group). A group the
    caller made already (a test, a larger program) is used as it is and left open."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if args.strategy == "none" and world > 1:
        raise SystemExit(f"--strategy none runs one process, but WORLD_SIZE is {world}: use fsdp2 or ddp")
    if args.batch_size % (world * args.grad_accum):
        raise SystemExit(
            f"--batch-size {args.batch_size} must be a multiple of world size x --grad-accum = "
            f"{world} x {args.grad_accum}"
        )
    if args.strategy == "none":
        return 0, 1, device, False
    owned = not dist.is_initialized()
    if owned:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size(), device, owned


# --- checkpoints ---------------------------------------------------------------------------


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (DTensors under FSDP2; DDP's ``module.`` prefix
    dropped, so a checkpoint loads under any strategy), detached views that DCP loads into
    in place. Not ``get_model_state_dict``, which works on the converted model, sharded or
    not, but includes the frozen 4-bit base (docs/distributed.md, "Checkpoints of a sharded
    model"): a checkpoint holds only what training changes. The frozen base is not written:
    it is rebuilt from --config/--model (same seed) and quantized deterministically."""
    return {n.removeprefix("module."): p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save(path: str, model, opt, step: int, args, distributed: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = {"model": _adapter_state(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path, no_dist=not distributed)
    if not distributed or torch.distributed.get_rank() == 0:
        meta = {"step": step, "args": {k: v for k, v in vars(args).items() if k not in ("save", "resume")}}
        Path(path, CKPT_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if distributed:
        torch.distributed.barrier()


def resume(path: str, model, opt, distributed: bool) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"model": _adapter_state(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path, no_dist=not distributed)
    set_optimizer_state_dict(model, opt, state["optim"])
    return _checkpoint_step(path)


# --- the loop ------------------------------------------------------------------------------


def _grad_sync(model: nn.Module, strategy: str, sync: bool):
    """Reduce gradients across ranks only on a step's last micro-batch: DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync`` (earlier micro-batches accumulate locally)."""
    if strategy == "ddp" and not sync:
        return model.no_sync()
    if strategy == "fsdp2":
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def main(argv=None) -> list[float]:
    """Run the recipe; returns the per-step logged losses (the same on every rank)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device, owned = setup(args)
    distributed = args.strategy != "none"
    import torch.distributed as dist

    try:
        model = build_model(args)
        tokens = load_tokens(args, model.config.vocab_size)
        options = {"quant_type": args.quant_type, "double_quant": args.double_quant}
        if args.compute_dtype:
            options["compute_dtype"] = DTYPES[args.compute_dtype]
        targets = args.targets if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]
        torch.manual_seed(args.seed + 1)  # the adapters' init, however the base was obtained
        try:
            qpeft.convert(
                model.to(device),
                targets,
                r=args.r,
                alpha=args.alpha,
                dropout=args.dropout,
                verbose=rank == 0,
                **options,
            )
        except (ValueError, TypeError) as exc:
            if "target_modules" not in str(exc):
                raise
            # known only once the model is built; still before any training, on every rank
            build_parser().error(f"--targets {args.targets!r}: {exc}")
        model.train()
        model = wrap(model, args, device, world)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = OPTIMIZERS[args.optim](params, lr=args.lr, weight_decay=args.weight_decay)
        start = resume(args.resume, model, opt, distributed) if args.resume else 0
        if start >= args.steps:
            raise SystemExit(f"the checkpoint is at step {start}; --steps {args.steps} leaves nothing to do")
        per_rank = args.batch_size // world
        micro = per_rank // args.grad_accum
        if rank == 0:
            print(
                f"qpeft.train: strategy {args.strategy}, {world} process(es) on {device}, global batch "
                f"{args.batch_size} x {args.seq_len} tokens ({args.grad_accum} micro-batch(es) of {micro} per rank), "
                f"steps {start + 1}..{args.steps}",
                flush=True,
            )
        losses: list[float] = []
        t0 = time.perf_counter()
        for step in range(start + 1, args.steps + 1):
            torch.manual_seed(args.seed * 1_000_003 + step * 7919 + rank)  # LoRA dropout, if any
            rows = batch_for_step(tokens, step, args)[rank * per_rank : (rank + 1) * per_rank].to(device)
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for k in range(args.grad_accum):
                ids = rows[k * micro : (k + 1) * micro]
                with _grad_sync(model, args.strategy, k == args.grad_accum - 1):
                    loss = model(input_ids=ids, labels=ids).loss
                    (loss / args.grad_accum).backward()
                total += loss.detach().double()
            total /= args.grad_accum
            if distributed:
                dist.all_reduce(total)
                total /= world
            opt.step()
            losses.append(float(total))
            if rank == 0:
                print(f"step {step} loss {losses[-1]:.6f} ({time.perf_counter() - t0:.1f} s)", flush=True)
            if args.save and step == (args.save_at or args.steps):
                save(args.save, model, opt, step, args, distributed)
        if rank == 0 and args.log_file:
            Path(args.log_file).write_text(json.dumps({"start": start, "losses": losses}), encoding="utf-8")
        return losses
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
