"""Triton launch configs of the fused QLoRA kernels (docs/design.md, "Triton configs"):
each launch runs its shape regime's default config with no autotuning; QPEFT_TRITON_AUTOTUNE=1
opts in to autotuning over the regime's table; every default config is one the committed
AOT report (benchmarks/results/triton_aot.json) compiles for sm_80 and sm_90 with zero spills.

The launch decisions are checked with the interpreter switched off and the kernels replaced
by recorders (no GPU here: nothing is compiled or run); the kernels' values under
TRITON_INTERPRET=1 are tests/test_qlora_triton.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
qlora = pytest.importorskip("qpeft.triton_kernels.qlora")

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "triton_aot.json"
REGIMES = [("small", "lo"), ("small", "hi"), ("large", "lo"), ("large", "hi")]


class _Recorder:
    """Stands in for a @triton.jit kernel: records each launch's grid and arguments."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append((grid, args, kwargs))

        return run


@pytest.fixture
def compiled_mode(monkeypatch):
    """The launchers as on a GPU (no interpreter), with recording kernels and no autotune."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("QPEFT_TRITON_AUTOTUNE", raising=False)
    fwd, dx = _Recorder(), _Recorder()
    monkeypatch.setattr(qlora, "qlora_fwd_kernel", fwd)
    monkeypatch.setattr(qlora, "qlora_dx_kernel", dx)
    tuned = []

    def fake_autotune(configs, key, **kw):
        def wrap(kernel):
            tuned.append((kernel, configs, key))
            return kernel

        return wrap

    monkeypatch.setattr(qlora.triton, "autotune", fake_autotune)
    qlora._tuned.cache_clear()
    qlora.default_config.cache_clear()
    yield fwd, dx, tuned
    qlora._tuned.cache_clear()
    qlora.default_config.cache_clear()


def _forward(m, r, lora=True, k=128, n=64):
    x = torch.randn(m, k)
    packed = torch.zeros(n * k // 2, dtype=torch.uint8)
    absmax = torch.ones(n * k // 64)
    code = torch.zeros(16)
    a, b = (torch.randn(r, k), torch.randn(n, r)) if lora else (None, None)
    return qlora.qlora_forward(x, packed, absmax, None, None, None, code, 64, 256, n, k, a, b, 1.0)


def _dx(m, r, k=128, n=64):
    dy = torch.randn(m, n)
    packed = torch.zeros(n * k // 2, dtype=torch.uint8)
    return qlora.qlora_dx(
        dy, packed, torch.ones(n * k // 64), None, None, None, torch.zeros(16), 64, 256, n, k,
        torch.randn(r, k), torch.randn(n, r), 1.0,
    )  # fmt: skip


@pytest.mark.parametrize(("m", "r", "regime"), [(1, 8, ("small", "lo")), (16, 64, ("small", "lo")),
                                                 (5, 128, ("small", "hi")), (17, 16, ("large", "lo")),
                                                 (300, 256, ("large", "hi"))])  # fmt: skip
def test_default_launch_runs_the_regimes_first_config_without_autotune(compiled_mode, m, r, regime):
    fwd, dx, tuned = compiled_mode
    _forward(m, r)
    _dx(m, r)
    assert tuned == []  # no autotuner was built
    for kernel, table, n_out in ((fwd, qlora._FWD_CONFIGS, 64), (dx, qlora._DX_CONFIGS, 128)):
        (grid, _, kwargs) = kernel.launches[0]
        cfg = table[regime][0]
        assert {key: kwargs[key] for key in cfg.kwargs} == cfg.kwargs
        assert kwargs["num_warps"] == cfg.num_warps and kwargs["num_stages"] == cfg.num_stages
        tile = cfg.kwargs["BLOCK_N"] if kernel is fwd else cfg.kwargs["BLOCK_K"]
        assert grid == (triton.cdiv(m, cfg.kwargs["BLOCK_M"]) * triton.cdiv(n_out, tile),)


def test_small_m_launch_pads_block_r_to_32(compiled_mode):
    fwd, dx, _ = compiled_mode
    for m, r, br in ((1, 1, 32), (16, 16, 32), (3, 64, 64), (17, 16, 16), (40, 1, 16)):
        _forward(m, r)
        _dx(m, r)
        assert fwd.launches[-1][2]["BLOCK_R"] == dx.launches[-1][2]["BLOCK_R"] == br == qlora.block_r(r, m)
    assert qlora.block_r(0, 1) == 16  # no adapter: unused


def test_small_m_tiles_give_every_warp_its_own_mma_columns():
    # docs/design.md, "Triton configs": at BLOCK_M = 16 the warps must split the n8 MMA
    # columns of each dot (the output tile and the [16, BLOCK_R] LoRA accumulator), or
    # they repeat each other's MMAs (the SASS report's mma_macs_ratio).
    for kernel_name, table in (("fwd", qlora._FWD_CONFIGS), ("dx", qlora._DX_CONFIGS)):
        for bucket, ranks in (("lo", range(1, 65)), ("hi", range(65, 257))):
            for cfg in table[("small", bucket)]:
                kw, warps = cfg.kwargs, cfg.num_warps
                assert kw["BLOCK_M"] == 16
                assert kw["BLOCK_N" if kernel_name == "fwd" else "BLOCK_K"] >= 8 * warps, (kernel_name, cfg)
                assert all(qlora.block_r(r, 16) >= 8 * warps for r in ranks), (kernel_name, cfg)


def test_the_config_is_chosen_once_per_regime(compiled_mode, monkeypatch):
    calls = []
    table = qlora._tables

    def counting(name):
        calls.append(name)
        return table(name)

    monkeypatch.setattr(qlora, "_tables", counting)
    for m in (1, 2, 3, 7, 16):  # one regime
        _forward(m, 8)
    assert calls == ["fwd"]
    _forward(40, 8)  # another regime: one more look-up
    assert calls == ["fwd", "fwd"]


def test_no_adapter_compiles_the_lora_terms_out(compiled_mode):
    fwd, _, _ = compiled_mode
    y, xa = _forward(3, 0, lora=False)
    kwargs = fwd.launches[0][2]
    assert kwargs["HAS_LORA"] is False and kwargs["WRITE_XA"] is False and xa.numel() == 0
    assert {key: kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")} == {
        key: qlora._FWD_CONFIGS[("small", "lo")][0].kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K")
    }


def test_env_var_switches_autotuning_on(compiled_mode, monkeypatch):
    fwd, dx, tuned = compiled_mode
    monkeypatch.setenv("QPEFT_TRITON_AUTOTUNE", "1")
    _forward(4, 8)
    _forward(4, 8)
    _dx(100, 8)
    # one autotuner per (kernel, regime), over the regime's whole table, cached
    assert [(t[0], t[1]) for t in tuned] == [
        (fwd, qlora._FWD_CONFIGS[("small", "lo")]),
        (dx, qlora._DX_CONFIGS[("large", "lo")]),
    ]
    assert all(t[2] == ["M_BUCKET", "N", "K"] for t in tuned)
    grid, _, kwargs = fwd.launches[0]
    assert callable(grid) and "BLOCK_M" not in kwargs  # the autotuner supplies the config
    monkeypatch.setenv("QPEFT_TRITON_AUTOTUNE", "0")
    _forward(4, 8)
    assert (
        len(tuned) == 2
        and fwd.launches[-1][2]["BLOCK_M"] == qlora._FWD_CONFIGS[("small", "lo")][0].kwargs["BLOCK_M"]
    )


def test_every_default_config_is_in_the_aot_report_without_spills():
    report = json.loads(REPORT.read_text())
    rows = {}
    for row in report["rows"]:
        if row["module"] == "qlora":
            rows.setdefault(row["name"], {})[row["arch"]] = row
    for kernel_name in ("fwd", "dx"):
        for regime in REGIMES:
            entries = [
                e
                for e in qlora.AOT_CONFIGS
                if e["name"].startswith(f"qlora_{kernel_name}_{regime[0]}M_")
                and ("lo" if e["constexprs"]["BLOCK_R"] <= 64 else "hi") == regime[1]
            ]
            assert entries, f"no AOT entry for {kernel_name} {regime}"
            for e in entries:
                assert set(rows.get(e["name"], {})) == {"sm_80", "sm_90"}, f"{e['name']} is not in the report"
                for arch, row in rows[e["name"]].items():
                    # the report compiled exactly the config the launcher runs on that arch
                    cfg = qlora.default_config(kernel_name, regime, int(arch[3:]))
                    assert {k: row["constexprs"][k] for k in cfg.kwargs} == cfg.kwargs
                    assert (row["num_warps"], row["num_stages"]) == (cfg.num_warps, cfg.num_stages)
                    assert row["local_bytes"] == 0 and row["stack_bytes"] == 0, f"{e['name']} {arch} spills"
    # the no-adapter variants are reported too (HAS_LORA=False)
    assert {"qlora_fwd_smallM_nolora_bf16", "qlora_dx_largeM_nolora_bf16"} <= set(rows)


@pytest.mark.parametrize("regime", REGIMES)
def test_each_arch_runs_its_own_tiles(compiled_mode, monkeypatch, regime):
    # docs/design.md, "Triton configs": capability 9.x (large M) runs its _ARCH_DEFAULTS
    # tile (16 bytes of W per thread per step); any other GPU, and the other regimes, the
    # table's first
    fwd, dx, _ = compiled_mode
    m, r = {"small": 4, "large": 300}[regime[0]], {"lo": 16, "hi": 256}[regime[1]]
    for arch in (75, 80, 86, 90, 100):
        monkeypatch.setattr(qlora, "_arch", lambda device, arch=arch: arch)
        _forward(m, r, k=128, n=8192)  # enough output tiles: no split schedule at small M
        _dx(m, r, k=8192, n=128)
        for kernel, kernel_name, table in ((fwd, "fwd", qlora._FWD_CONFIGS), (dx, "dx", qlora._DX_CONFIGS)):
            index = qlora._ARCH_DEFAULTS.get(arch // 10, {}).get((kernel_name, regime), 0)
            cfg = table[regime][index]
            kwargs = kernel.launches[-1][2]
            assert {key: kwargs[key] for key in cfg.kwargs} == cfg.kwargs, (kernel_name, regime, arch)
            assert kwargs["num_warps"] == cfg.num_warps
    for per_arch in qlora._ARCH_DEFAULTS.values():
        for (kernel_name, reg), index in per_arch.items():
            cfg = qlora._tables(kernel_name)[1][reg][index]
            # 16 bytes of packed W (32 codes) per thread per loop step
            assert cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"] >= 32 * 32 * cfg.num_warps
