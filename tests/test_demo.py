"""``python -m qpeft demo`` end to end on the smallest setting: it trains, reports, and the adapter
it saves (HF PEFT format + the trained byte embeddings as modules_to_save) rebuilds the model:
the held-out loss recomputed from the saved files equals the one the demo printed."""

from __future__ import annotations

import json
import re

import pytest
import torch

import qpeft
from qpeft import __main__ as cli
from qpeft import demo

pytest.importorskip("transformers")
pytest.importorskip("safetensors")


def test_demo_runs_and_its_adapter_rebuilds_the_model(tmp_path, capsys):
    out = tmp_path / "adapter"
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
            "--out",
            str(out),
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
