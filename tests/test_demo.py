"""``python -m qpeft demo`` end to end on the smallest setting: it trains, reports, and the adapter
it saves (HF PEFT format + the trained byte embeddings as modules_to_save) into its default
output directory rebuilds the model: the held-out loss recomputed from the saved files equals
the one the demo printed."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import qpeft
from qpeft import __main__ as cli
from qpeft import demo

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def test_demo_runs_and_its_adapter_rebuilds_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --out is relative to the current directory
    out = tmp_path / demo.DEFAULT_OUT
    code = cli.main(
        [
            "demo",
            "--size",
            "tiny",
            "--steps",
            "4",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--sample",
            "5",
            "--rank",
            "4",
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    text = printed.out
    for needle in (
        "QLoRA demo",
        "train loss",
        "held-out loss",
        "tokens/s",
        "full 16-bit fine-tune",
        "greedy sample",
        "adapter saved",
    ):
        assert needle in text, needle
    assert "step 4/4" in printed.err
    assert f"adapter saved to {out}/ " in text
    # four steps teach nothing: the sample is labelled as the noise it is
    assert "after only 4 steps the model has not learned the text yet" in text
    after = float(re.search(r"held-out loss: [\d.]+ before -> ([\d.]+) after", text).group(1))

    config = json.loads((out / "adapter_config.json").read_text())
    assert (
        config["r"] == 4
        and config["lora_alpha"] == 8
        and config["modules_to_save"] == ["embed_tokens", "lm_head"]
    )
    meta = json.loads((out / "demo_config.json").read_text())
    model, _ = demo.build_model(meta["size"], meta["seq_len"], meta["seed"])
    qpeft.convert(model, r=8, verbose=False)  # the file defines the adapter (r = 4): it replaces this one
    qpeft.load_adapter(model, out)
    assert model.model.layers[0].self_attn.q_proj.lora_A.shape == (4, 128)
    data = demo.ByteTokenizer().encode(demo.load_text())
    held_out = data[int(0.9 * data.numel()) :]
    assert f"{demo._eval_loss(model, held_out, meta['seq_len'], torch.device('cpu')):.3f}" == f"{after:.3f}"


def test_quant_report_subcommand_is_kept(capsys):
    assert cli.main(["quant-report", "--rows", "64", "--cols", "128", "--repeat", "1"]) == 0
    assert "identical to the pure-torch reference: yes" in capsys.readouterr().out


def test_default_output_directory_is_git_ignored():
    ignored = (Path(__file__).resolve().parent.parent / ".gitignore").read_text().splitlines()
    assert f"{demo.DEFAULT_OUT}/" in ignored


def test_bigram_entropy_and_the_sample_caveat():
    periodic = torch.tensor([ord(c) for c in "ab" * 500])
    assert demo.bigram_entropy(periodic) == pytest.approx(0.0, abs=1e-12)  # each byte fixes the next
    noise = torch.randint(0, 256, (1 << 20,), generator=torch.Generator().manual_seed(0))
    assert demo.bigram_entropy(noise) == pytest.approx(math.log(256), abs=0.1)  # nothing to learn
    assert demo.sample_caveat(2.0, 2.2, 300) is None
    note = demo.sample_caveat(2.8, 2.2, 30)
    assert note is not None and "after only 30 steps" in note and "noise" in note
