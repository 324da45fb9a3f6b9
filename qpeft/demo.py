"""python -m qpeft demo: QLoRA fine-tuning of a small causal LM, end to end, offline.

A Llama-architecture model is built from a transformers config (random initialisation:
nothing is downloaded), every projection layer is quantized to NF4 with double quantization
and given a LoRA adapter by qpeft.convert, and the adapters are trained on the text that
ships with qpeft (qpeft/data/river_town.txt, byte-level tokens). It prints a progress
line, the loss curve, held-out loss before and after, weight + optimizer memory against full
16-bit fine-tuning, tokens per second, a greedy sample, and saves the adapter in HF PEFT's
format (plus demo_config.json, from which the random base is rebuilt exactly) under --out.

transformers is needed for the model class (it is a test/bench extra of qpeft, not a runtime
dependency): without it the demo stops with an install hint. This docstring is plain text
because its first paragraph is the subcommand's --help description.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from importlib import resources

import torch

import qpeft

# name: (hidden, layers, heads, kv heads, intermediate)
SIZES = {
    "tiny": (128, 2, 4, 2, 344),
    "small": (256, 4, 8, 4, 688),
    "medium": (512, 6, 8, 4, 1376),
}
VOCAB = 256  # byte-level
BOS = ord("\n")  # generation starts from a newline
# Relative to the current directory; the repository's .gitignore lists it, so a demo run
# from a checkout leaves `git status` clean.
DEFAULT_OUT = "qpeft_demo_out"


def make_optimizer(params, lr: float) -> torch.optim.Optimizer:
    """The demo's optimizer, chosen in this one place: QLoRA's paged AdamW with fp32 state
    (8 bytes per trainable parameter; in CUDA unified memory on a GPU, host memory here)."""
    return qpeft.optim.PagedAdamW(params, lr=lr, weight_decay=0.0)


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255: no vocabulary file, lossless for any text."""

    vocab_size = VOCAB

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_text() -> str:
    return resources.files("qpeft").joinpath("data/river_town.txt").read_text(encoding="utf-8")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit(
            "python -m qpeft demo builds its model with Hugging Face transformers, which is not installed: "
            "pip install transformers (or pip install 'qpeft[demo]')"
        ) from None
    return transformers


def build_model(size: str, seq_len: int, seed: int):
    transformers = _transformers()
    hidden, layers, heads, kv, inter = SIZES[size]
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=seq_len,
        bos_token_id=BOS,
        eos_token_id=BOS,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config), config


class UsageError(ValueError):
    """A demo option this run cannot use (python -m qpeft reports it in one line, exit 2)."""


def _batches(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=gen)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def _eval_loss(model, data: torch.Tensor, seq_len: int, device) -> float:
    """Mean loss over the held-out text in consecutive windows."""
    model.eval()
    n = (data.numel() - 1) // seq_len
    windows = data[: n * seq_len].reshape(n, seq_len).to(device)
    loss = float(model(input_ids=windows, labels=windows).loss)
    model.train()
    return loss


@torch.no_grad()
def _sample(model, tok: ByteTokenizer, prompt: str, n: int, seq_len: int, device) -> str:
    model.eval()
    ids = tok.encode(prompt).to(device)[None]
    for _ in range(n):
        logits = model(input_ids=ids[:, -seq_len:]).logits[0, -1]
        ids = torch.cat([ids, logits.argmax().reshape(1, 1)], dim=1)
    model.train()
    return tok.decode(ids[0, len(prompt.encode("utf-8")) :].tolist())


def bigram_entropy(data: torch.Tensor) -> float:
    """H(next byte | previous byte) of ``data`` in nats: the held-out loss a model reaches by
    knowing only which byte tends to follow which."""
    pairs = (
        torch.bincount(data[:-1] * VOCAB + data[1:], minlength=VOCAB * VOCAB).double().reshape(VOCAB, VOCAB)
    )
    joint = pairs / pairs.sum()
    given = joint / pairs.sum(1, keepdim=True).clamp_min(1) * pairs.sum()
    nz = joint > 0
    return float(-(joint[nz] * given[nz].log()).sum())


def sample_caveat(held_out_loss: float, bigram: float, steps: int) -> str | None:
    """A note for the greedy sample when the model has not yet learned more than which byte
    follows which: short runs (--steps 5, 30) then sample one letter or one pair of letters
    over and over, which reads like a bug but is what an untrained model does."""
    if held_out_loss <= bigram:
        return None
    return (
        f"(after only {steps} steps the model has not learned the text yet: held-out loss "
        f"{held_out_loss:.3f} is above the {bigram:.3f} of a byte-pair table; this sample is expected to "
        "be noise)"
    )


def _mib(n: float) -> str:
    return f"{n / 2**20:8.2f} MiB"


def _memory_table(model, trainable: int, total: int, weights_after: int) -> list[str]:
    """Weights + gradients + AdamW state: this run against full 16-bit fine-tuning of every
    parameter (bf16 weights and gradients, fp32 AdamW moments: 2 + 2 + 8 bytes/param). The
    run's optimizer state is PagedAdamW's 8 bytes per trainable parameter."""
    grads_q = 4 * trainable  # fp32 adapter gradients
    adam_q = 8 * trainable  # two fp32 moments per adapter parameter
    full_w, full_g, full_o = 2 * total, 2 * total, 8 * total
    rows = [
        f"  {'':22}{'weights':>14}{'gradients':>14}{'optimizer':>14}{'total':>14}",
        f"  {'QLoRA (this run)':22}{_mib(weights_after):>14}{_mib(grads_q):>14}{_mib(adam_q):>14}"
        f"{_mib(weights_after + grads_q + adam_q):>14}",
        f"  {'full 16-bit fine-tune':22}{_mib(full_w):>14}{_mib(full_g):>14}{_mib(full_o):>14}"
        f"{_mib(full_w + full_g + full_o):>14}",
    ]
    ratio = (weights_after + grads_q + adam_q) / (full_w + full_g + full_o)
    rows.append(
        f"  QLoRA needs {ratio:.1%} of the memory of full 16-bit fine-tuning for weights, gradients and optimizer"
    )
    return rows


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = ByteTokenizer()
    text = load_text()
    data = tok.encode(text)
    split = int(0.9 * data.numel())
    train, held_out = data[:split], data[split:]
    if args.seq_len >= held_out.numel():
        raise UsageError(
            f"--seq-len {args.seq_len}: the held-out text has {held_out.numel()} tokens; use at most "
            f"{held_out.numel() - 1}"
        )
    model, config = build_model(args.size, args.seq_len, args.seed)
    model.to(device)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"qpeft {qpeft.__version__} QLoRA demo: Llama-architecture '{args.size}' model, {total / 1e6:.2f}M "
        f"parameters (random init from a transformers config), byte-level tokens, {len(text):,} characters of "
        f"shipped text ({split:,} train / {data.numel() - split:,} held out), device {device}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    qpeft.convert(model, r=args.rank, alpha=2 * args.rank, dropout=args.dropout, verbose=False)
    summary = model.qpeft_summary
    print(f"  {summary}")
    trainable = summary.trainable_params
    if args.train_embeddings:
        # The tokenizer is new to the (random) base, so its token embeddings and output head
        # are trained in full, as PEFT's modules_to_save does when tokens are added.
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            layer.weight.requires_grad_(True)
            trainable += layer.weight.numel()
        print(
            f"  + token embeddings and lm_head trained in full (new byte tokenizer): {trainable:,} trainable parameters"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, args.lr)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    before = _eval_loss(model, held_out, args.seq_len, device)
    model.train()
    losses, tokens = [], 0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = _batches(train, args.batch, args.seq_len, gen).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        tokens += batch.numel()
        elapsed = time.perf_counter() - t0
        if sys.stderr.isatty() or step == args.steps or step % max(1, args.steps // 10) == 0:
            eta = elapsed / step * (args.steps - step)
            bar = "#" * (20 * step // args.steps)
            end = "\n" if step == args.steps or not sys.stderr.isatty() else ""
            sys.stderr.write(
                f"\r  [{bar:<20}] step {step}/{args.steps} loss {losses[-1]:.3f} "
                f"{tokens / elapsed:,.0f} tok/s eta {eta:4.0f}s{end}"
            )
            sys.stderr.flush()
    elapsed = time.perf_counter() - t0
    after = _eval_loss(model, held_out, args.seq_len, device)

    k = max(1, args.steps // 10)
    marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
    window = [losses[max(0, i - k + 1) : i + 1] for i in marks]
    curve = ", ".join(f"step {i + 1}: {sum(w) / len(w):.3f}" for i, w in zip(marks, window))
    print(
        f"  train loss (mean of the last {k} steps at each mark; ln 256 = {math.log(256):.3f} is a uniform "
        f"guess): {curve}"
    )
    print(
        f"  held-out loss: {before:.3f} before -> {after:.3f} after ({100 * (before - after) / before:.1f}% lower)"
    )
    print(
        f"  {args.steps} steps x {args.batch} x {args.seq_len} tokens in {elapsed:.1f} s: "
        f"{tokens / elapsed:,.0f} tokens/s (forward + backward + optimizer)"
    )
    for row in _memory_table(model, trainable, total, summary.weight_bytes_after):
        print(row)
    if args.sample > 0:
        prompt = "The ferry"
        print(
            f"  greedy sample: {prompt!r} -> {_sample(model, tok, prompt, args.sample, args.seq_len, device)!r}"
        )
        caveat = sample_caveat(after, bigram_entropy(train), args.steps)
        if caveat is not None:
            print(f"  {caveat}")
    if args.out:
        extra = ["embed_tokens", "lm_head"] if args.train_embeddings else None
        qpeft.save_adapter(model, args.out, modules_to_save=extra)
        with open(os.path.join(args.out, "demo_config.json"), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "size": args.size,
                    "seed": args.seed,
                    "seq_len": args.seq_len,
                    "llama_config": config.to_dict(),
                    "tokenizer": "utf-8 bytes",
                },
                f,
                indent=2,
                default=str,
            )
        print(
            f"  adapter saved to {os.path.abspath(args.out)}{os.sep} (adapter_model.safetensors, "
            "adapter_config.json: HF PEFT's format; demo_config.json rebuilds the base; --out sets the "
            "directory, --out '' skips saving)"
        )
    return 0


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its "invalid integer value" message
    return parse


def _float_in(low: float, high: float, *, closed_high: bool):
    """A float in [low, high) (closed_high: [low, high]), for argparse."""

    def parse(text: str) -> float:
        value = float(text)
        ok = low <= value <= high if closed_high else low <= value < high
        if not ok:  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(
                f"must be in [{low:g}, {high:g}{']' if closed_high else ')'}, got {text}"
            )
        return value

    parse.__name__ = "float"
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options; ``--device`` is added (and checked) by ``python -m qpeft``, as
    for every subcommand that takes one. Defaults appear in ``--help``."""
    p.add_argument(
        "--size", choices=sorted(SIZES), default="small", help="model size (small: ~3.0M parameters)"
    )
    p.add_argument("--steps", type=_at_least(1), default=300, help="optimizer steps")
    p.add_argument("--rank", type=_at_least(1), default=8, help="LoRA rank r (alpha = 2r)")
    p.add_argument(
        "--dropout",
        type=_float_in(0.0, 1.0, closed_high=False),
        default=0.0,
        help="LoRA dropout (0: the fully fused path)",
    )
    p.add_argument(
        "--lr",
        type=_float_in(1e-12, 10.0, closed_high=True),
        default=3e-3,
        help="peak learning rate (linear warm-up, cosine decay)",
    )
    p.add_argument(
        "--no-train-embeddings",
        dest="train_embeddings",
        action="store_false",
        help="train the LoRA adapters only (by default the new tokenizer's embeddings and lm_head train too)",
    )
    p.add_argument("--batch", type=_at_least(1), default=8, help="sequences per step")
    p.add_argument("--seq-len", type=_at_least(8), default=64, help="tokens (bytes) per sequence")
    p.add_argument(
        "--sample", type=_at_least(0), default=80, help="characters of greedy sample after training (0: none)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the batches")
    # torch's thread count by default. (Once qpeft's kernels ran on a pool of their own that
    # competed with torch's spin-waiting OpenMP threads, two threads were 9x slower than one;
    # now they run on torch's OpenMP team and 2 threads beat 1 on the 2-core VM: 6,500 vs
    # 4,260 tokens/s for the 'small' model.)
    p.add_argument(
        "--threads", type=_at_least(0), default=0, help="CPU threads for torch (0: torch's choice)"
    )
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help="directory to save the adapter and demo_config.json in, created if missing ('' to skip saving)",
    )
