"""The training recipe (qpeft.train; docs/distributed.md, "The training recipe") on CPU
with gloo: 2 ranks forked inside pytest (as tests/test_distributed_optim.py does: the
children inherit the imported torch, transformers and qpeft), one launch for every
distributed run, then single-process runs here.

What equality holds: rank r of 2 takes rows [2r, 2r + 2) of each step's global batch of 4;
``--strategy none --grad-accum 2`` takes the same rows as two micro-batches in one process
and backpropagates loss / 2 for each. Each half-batch forward is the same arithmetic in
both (same weights, same shapes, one thread). The 2-rank gradient is (g0 + g1) / 2 (FSDP2's
reduce-scatter and DDP's all-reduce average two summands: one correctly rounded add and an
exact halving); the accumulated one is g0 / 2 + g1 / 2, where g/2 comes from backpropagating
loss / 2: every backward op is a sum of products, and scaling one factor by 2^-1 scales the
result exactly (no underflow at these magnitudes). So the losses agree bit for bit, with no
tolerance, step after step (AdamW then gets identical inputs). Activation checkpointing
recomputes the same forward, so it changes no bit either.
"""

from __future__ import annotations

import json
import math
import os
import socket
import traceback

import pytest
import torch

pytest.importorskip("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is required", allow_module_level=True)

import torch.distributed.checkpoint  # noqa: E402
import torch.distributed.fsdp  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import transformers  # noqa: E402

# transformers imports its model classes lazily: import the ones the recipe uses here, once,
# so the forked ranks inherit them instead of each importing them (seconds on 2 cores).
transformers.AutoModelForCausalLM, transformers.LlamaConfig, transformers.LlamaForCausalLM  # noqa: B018

import qpeft  # noqa: E402
from qpeft import train  # noqa: E402

STEPS = 4
BASE = [
    "--config", "tiny-llama", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2",
    "--r", "4", "--alpha", "8", "--threads", "1", "--device", "cpu", "--double-quant",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ck = os.path.join(out, "ckpt")
        runs = {
            "fsdp2": train.main(
                [*BASE, "--strategy", "fsdp2", "--steps", str(STEPS), "--save", ck, "--save-at", "2"]
            ),
            "fsdp2_resumed": train.main(
                [
                    *BASE,
                    "--strategy",
                    "fsdp2",
                    "--steps",
                    str(STEPS),
                    "--resume",
                    ck,
                    "--activation-checkpointing",
                ]
            ),
            "fsdp2_bf16": train.main(
                [
                    *BASE,
                    "--strategy",
                    "fsdp2",
                    "--steps",
                    "3",
                    "--param-dtype",
                    "bf16",
                    "--reduce-dtype",
                    "fp32",
                    "--optim",
                    "paged_adamw8bit",
                    "--quant-type",
                    "fp4",
                ]
            ),  # fmt: skip
            "fsdp2_accum": train.main([*BASE, "--strategy", "fsdp2", "--steps", "3", "--grad-accum", "2"]),
            "ddp_accum": train.main([*BASE, "--strategy", "ddp", "--steps", "3", "--grad-accum", "2"]),
            "ddp": train.main([*BASE, "--strategy", "ddp", "--steps", "3", "--activation-checkpointing"]),
        }
        with open(os.path.join(out, f"r{rank}.json"), "w") as f:
            json.dump(runs, f)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("recipe"))
    mp.start_processes(_rank_main, args=(2, _free_port(), out), nprocs=2, start_method="fork")
    ranks = [json.load(open(os.path.join(out, f"r{r}.json"))) for r in range(2)]
    threads = torch.get_num_threads()
    try:  # after the fork: no OpenMP team of this process is inherited by the ranks
        reference = train.main([*BASE, "--strategy", "none", "--grad-accum", "2", "--steps", str(STEPS)])
    finally:
        torch.set_num_threads(threads)
    return ranks, reference, out


def test_none_loss_decreases(runs):
    _, reference, _ = runs
    assert len(reference) == STEPS
    assert all(b < a for a, b in zip(reference, reference[1:])), reference


def test_fsdp2_matches_single_process_bit_for_bit(runs):
    ranks, reference, _ = runs
    assert ranks[0]["fsdp2"] == ranks[1]["fsdp2"]  # the logged mean is the same on every rank
    assert ranks[0]["fsdp2"] == reference


def test_ddp_with_activation_checkpointing_matches_single_process(runs):
    ranks, reference, _ = runs
    assert ranks[0]["ddp"] == ranks[1]["ddp"] == reference[:3]


def test_fsdp2_mixed_precision_trains(runs):
    """bf16 parameters (MixedPrecisionPolicy), fp32 reduction, FP4 base, paged 8-bit AdamW:
    no single-process twin to equal, so: the same log on both ranks, finite, decreasing."""
    ranks, _, _ = runs
    losses = ranks[0]["fsdp2_bf16"]
    assert losses == ranks[1]["fsdp2_bf16"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses


def test_grad_accum_on_ranks(runs):
    """2 ranks x 2 micro-batches of 1 (gradient sync only after the last one) against one
    process with 4 micro-batches: the same rows, but the gradient sums associate as
    (g0/2 + g1/2 + g2/2 + g3/2) / 2 instead of g0/4 + g1/4 + g2/4 + g3/4 in sequence, a
    relative difference of a few fp32 ulps per element. Step 1's loss precedes any update
    and is equal exactly; later losses differ by what those ulps move AdamW's update of
    lr * m / (sqrt(v) + eps) (elements whose gradient is near rounding noise can change
    their update by up to lr), which after 2 updates at lr 1e-2 stays far below 1e-3 of a
    loss near 5.5 (measured: 0.0 here, the sums happen to round alike); the bound only catches a wrong reduction, which
    moves the loss by the size of a step's change (~0.05)."""
    ranks, _, _ = runs
    threads = torch.get_num_threads()
    try:
        single = train.main([*BASE, "--strategy", "none", "--steps", "3", "--grad-accum", "4"])
    finally:
        torch.set_num_threads(threads)
    for key in ("fsdp2_accum", "ddp_accum"):
        losses = ranks[0][key]
        assert losses == ranks[1][key]
        assert losses[0] == single[0]
        assert max(abs(a - b) for a, b in zip(losses, single)) < 1e-3, (key, losses, single)


def test_fsdp2_resume_continues_exactly(runs):
    ranks, _, out = runs
    assert len(ranks[0]["fsdp2_resumed"]) == STEPS - 2
    assert ranks[0]["fsdp2_resumed"] == ranks[0]["fsdp2"][2:]
    meta = json.load(open(os.path.join(out, "ckpt", train.CKPT_META)))
    assert meta["step"] == 2


def test_none_save_resume(tmp_path):
    ck = str(tmp_path / "ck")
    args = [*BASE, "--strategy", "none", "--steps", "3", "--optim", "adamw8bit"]
    threads = torch.get_num_threads()
    try:
        full = train.main([*args, "--save", ck, "--save-at", "1"])
        resumed = train.main([*args, "--resume", ck])
    finally:
        torch.set_num_threads(threads)
    assert resumed == full[1:]


def test_resume_refuses_other_base_defining_arguments(tmp_path, capsys):
    """The checkpoint holds adapters and optimizer state; the base is rebuilt from the
    arguments, so a resume with another seed, format, targets, rank, alpha or optimizer
    silently trained something else. The differing arguments are named (exit 2)."""
    ck = str(tmp_path / "ck")
    args = [*BASE, "--strategy", "none", "--steps", "2"]
    threads = torch.get_num_threads()
    try:
        train.main([*args, "--save", ck, "--save-at", "1"])
    finally:
        torch.set_num_threads(threads)
    meta = os.path.join(ck, train.CKPT_META)
    saved = json.load(open(meta))
    saved["args"]["double_quant"] = False  # as if saved without --double-quant
    with open(meta, "w") as fh:
        json.dump(saved, fh)
    other = ["--seed", "7", "--quant-type", "fp4", "--targets", "q_proj", "--r", "2", "--alpha", "4"]
    other += ["--optim", "adamw8bit"]
    with pytest.raises(SystemExit) as exc:
        train.parse_args([*args, "--resume", ck, *other])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for flag in ("--seed", "--quant-type", "--double-quant", "--targets", "--r", "--alpha", "--optim"):
        assert f"{flag} saved" in err, flag
    config = tmp_path / "config.json"
    transformers.LlamaConfig(**train.TINY_LLAMA).to_json_file(str(config))
    with pytest.raises(SystemExit):
        train.parse_args(["--config", str(config), *args[2:], "--resume", ck])
    assert "--config saved 'tiny-llama'" in capsys.readouterr().err
    saved["args"]["double_quant"] = True
    with open(meta, "w") as fh:
        json.dump(saved, fh)
    assert train.parse_args([*args, "--steps", "3", "--lr", "0.01", "--resume", ck]).resume == ck


def test_unshardable_params_is_a_capability_check():
    """fully_shard's ignored_params: non-float parameters without FSDP2's all-gather
    extension; float ones and a subclass that implements the extension are sharded."""

    class Gatherable(torch.Tensor):
        def fsdp_pre_all_gather(self, *args, **kwargs):  # FSDP2's extension point
            raise NotImplementedError

    m = torch.nn.Module()
    m.packed = torch.nn.Parameter(torch.zeros(4, 1, dtype=torch.uint8), requires_grad=False)
    m.float_ = torch.nn.Parameter(torch.zeros(4))
    m.gatherable = torch.nn.Parameter(
        torch.zeros(4, 1, dtype=torch.uint8).as_subclass(Gatherable), requires_grad=False
    )
    m.register_buffer("buffer", torch.zeros(4, dtype=torch.uint8))  # FSDP2 never shards buffers
    assert train.unshardable_params(m) == {m.packed}
    model = train.build_model(train.parse_args(BASE))
    qpeft.convert(model, verbose=False)
    assert train.unshardable_params(model) == set()  # today's 4-bit weights are buffers
    assert len(train.decoder_layers(model)) == train.TINY_LLAMA["num_hidden_layers"]


def test_config_file_and_local_model(tmp_path):
    """--config config.json builds the same random model as the preset; --model DIR loads
    it back with from_pretrained (here with byte tokens: the directory has no tokenizer)."""
    config = transformers.LlamaConfig(**train.TINY_LLAMA)
    config.to_json_file(str(tmp_path / "config.json"))
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(str(tmp_path / "model"))
    args = [*BASE[2:], "--strategy", "none", "--steps", "2"]
    threads = torch.get_num_threads()
    try:
        preset = train.main(["--config", "tiny-llama", *args])
        from_file = train.main(["--config", str(tmp_path / "config.json"), *args])
        loaded = train.main(["--model", str(tmp_path / "model"), "--tokenizer", "bytes", *args])
        with pytest.raises(SystemExit, match="cannot load a tokenizer"):
            train.main(["--model", str(tmp_path / "model"), *args])
    finally:
        torch.set_num_threads(threads)
    assert from_file == preset
    assert loaded == preset


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--strategy", "none"], "give the model"),
        (["--config", "no-such-preset"], "neither a preset"),
        (["--model", "/no/such/dir"], "not a directory"),
        (["--config", "tiny-llama", "--data", "/no/such/file"], "not a file"),
        (["--config", "tiny-llama", "--strategy", "ddp", "--param-dtype", "bf16"], "need --strategy fsdp2"),
        (["--config", "tiny-llama", "--save-at", "2"], "--save-at needs --save"),
        (["--config", "tiny-llama", "--save", "x", "--save-at", "9", "--steps", "3"], "after the last step"),
        (["--config", "tiny-llama", "--resume", "/no/such/ckpt"], "not a checkpoint"),
        (["--config", "tiny-llama", "--r", "0"], "must be >= 1"),
        (["--config", "tiny-llama", "--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--config", "tiny-llama", "--tokenizer", "model"], "needs --model DIR"),
        (["--config", "tiny-llama", "--model", "x"], "not allowed with argument"),
        (["--config", "tiny-llama", "--strategy", "pipeline"], "invalid choice"),
        (["--config", "tiny-llama", "--optim", "sgd"], "invalid choice"),
        (["--config", "tiny-llama", "--quant-type", "int4"], "invalid choice"),
        (["--config", "tiny-llama", "--device", "foo"], "--device foo: unknown device"),
        (["--config", "tiny-llama", "--threads", "-1"], "--threads: must be >= 0"),
        (["--config", "tiny-llama", "--alpha", "inf"], "--alpha: must be a finite number > 0"),
        (["--config", "tiny-llama", "--lr", "inf"], "--lr: must be a finite number > 0"),
        (["--config", "tiny-llama", "--weight-decay", "-1"], "--weight-decay: must be a finite number >= 0"),
        (["--config", "tiny-llama", "--targets", ""], "names no module"),
        (["--config", "tiny-llama", "--targets", ","], "names no module"),
        (["--config", "tiny-llama", "--seed", "99999999999999999999"], "--seed: must be in [0, "),
        (["--config", "tiny-llama", "--log-file", "/no/such/dir/log.json"], "does not exist"),
        (["--config", "tiny-llama", "--log-file", "/"], "is a directory"),
        (["--config", "tiny-llama", "--save", "/proc/qpeft_no_such"], "cannot create or write"),
    ],
)
def test_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only message")
def test_cuda_device_without_a_gpu_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--config", "tiny-llama", "--device", "cuda"])
    assert exc.value.code == 2
    assert "--device cuda:" in capsys.readouterr().err


def test_bad_files_are_argument_errors_before_any_work(tmp_path, capsys):
    """A bad --config/--model/--save/--log-file is one line and exit 2 from parse_args, not a
    traceback (--save and --log-file once only after every step had run)."""
    not_json = tmp_path / "config.txt"
    not_json.write_text("not json")
    taken = tmp_path / "taken"
    taken.write_text("a file")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--config", str(not_json)], "is not a readable JSON config.json"),
        (["--model", str(tmp_path / "empty")], "has no config.json"),
        (["--config", "tiny-llama", "--save", str(taken)], "exists and is not a directory"),
        (["--config", "tiny-llama", "--log-file", str(tmp_path)], "is a directory"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            train.parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert taken.read_text() == "a file"
    ok = train.parse_args(["--config", "tiny-llama", "--save", str(tmp_path / "new" / "ck")])
    assert os.path.isdir(ok.save)  # created up front, so a later failure to write it cannot happen


def test_targets_matching_nothing_is_an_argument_error_before_training(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main([*BASE, "--strategy", "none", "--steps", "1", "--targets", "bogus_proj"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--targets 'bogus_proj'" in err and "selects no nn.Linear" in err and "step 1" not in err


def test_resume_with_save_at_not_after_the_checkpoint_is_refused(tmp_path, capsys):
    """--save-at at or before the checkpoint's step saved nothing and exited 0."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / train.CKPT_META).write_text(json.dumps({"step": 2, "args": {}}))
    args = ["--config", "tiny-llama", "--steps", "4", "--resume", str(ck), "--save", str(tmp_path / "new")]
    for save_at in (["--save-at", "1"], ["--save-at", "2"]):
        with pytest.raises(SystemExit) as exc:
            train.parse_args([*args, *save_at])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "is at step 2" in err and "give --save-at in 3..4" in err
    assert train.parse_args([*args, "--save-at", "3"]).save_at == 3
    with pytest.raises(SystemExit):
        train.parse_args([*args[:2], "--steps", "2", *args[4:6]])
    assert "leaves nothing to do" in capsys.readouterr().err


def test_run_time_errors(monkeypatch):
    with pytest.raises(SystemExit, match="multiple of world size"):
        train.main([*BASE, "--strategy", "none", "--grad-accum", "3"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="strategy none runs one process"):
        train.main([*BASE, "--strategy", "none"])
