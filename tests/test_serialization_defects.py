"""Regression tests for defects in saving and loading found by tests from outside the project:
adapter files and checkpoints are input, so bad ones must fail at load time with an error
naming the key, leave the model as it was, and never hang; saves must survive being killed.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import safetensors.torch as st
import torch
from torch import nn

import qpeft
import qpeft.functional as qf
import qpeft.serialization as ser
from qpeft import QuantState
from qpeft.nn import Linear4bit, QLoRALinear

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.functional as bnbF

LONG = "block_" + "x" * 40  # a long module name: PEFT's regex lookup backtracks over its length


class _Long(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.add_module(LONG, nn.Linear(16, 16))

    def forward(self, x):
        return getattr(self, LONG)(x)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(_Long(), nn.Linear(16, 24), nn.Linear(24, 8))


def _converted(seed: int = 0) -> nn.Module:
    model = qpeft.convert(_model(seed), r=4, alpha=8, verbose=False)
    g = torch.Generator().manual_seed(seed + 100)
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            with torch.no_grad():
                m.adapters["default"].lora_B.copy_(
                    torch.randn(m.adapters["default"].lora_B.shape, generator=g)
                )
    return model


def _snapshot(model: nn.Module) -> dict:
    """Every tensor of the model (4-bit states included, through the state dict) and the
    adapter objects of each layer, to compare bit for bit."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    adapters = {n: dict(m.adapters) for n, m in model.named_modules() if isinstance(m, QLoRALinear)}
    return {"tensors": tensors, "adapters": adapters}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        a = after[k]
        assert a.dtype == v.dtype and a.shape == v.shape, k
        assert torch.equal(a.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k
    for n, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            assert dict(m.adapters) == before["adapters"][n], n


def _assert_same_adapters(a: nn.Module, b: nn.Module) -> None:
    pairs = [(n, m) for n, m in a.named_modules() if isinstance(m, QLoRALinear)]
    assert pairs
    for n, m in pairs:
        x, y = m.adapters["default"], b.get_submodule(n).adapters["default"]
        assert torch.equal(x.lora_A, y.lora_A) and torch.equal(x.lora_B, y.lora_B), n
        assert x.alpha == y.alpha and x.r == y.r, n


def _edit_config(directory, **changes) -> None:
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _edit_weights(directory, edit) -> None:
    """Rewrite the weights file with ``edit(tensors)`` applied (dropping save_adapter's config
    hash, as a file written by another tool would not carry it)."""
    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = st.load_file(path)
    edit(tensors)
    st.save_file(tensors, path, metadata={"format": "pt"})


X = torch.randn(3, 16, generator=torch.Generator().manual_seed(7))


# --- 1. rank_pattern / alpha_pattern keys --------------------------------------------------------
def test_pathological_pattern_key_returns_promptly(tmp_path):
    """`(.*)*y` made Python's regex engine backtrack for minutes over a 50-character module
    path inside load_adapter; the automaton answers at once, and the key still means what it
    means to PEFT (no match here: no path ends in 'y')."""
    model = _converted()
    qpeft.save_adapter(model, tmp_path)
    _edit_config(tmp_path, alpha_pattern={"(.*)*y": 3, "(a|aa)*b": 5, "(x+x+)+z": 7})
    fresh = _converted(seed=1)
    t0 = time.monotonic()
    qpeft.load_adapter(fresh, tmp_path)
    assert time.monotonic() - t0 < 20  # Python's re needs minutes; the automaton milliseconds
    assert all(m.adapters["default"].alpha == 8 for m in fresh.modules() if isinstance(m, QLoRALinear))
    # a pathological key that does match gets its value
    _edit_config(tmp_path, alpha_pattern={"(.*)*x": 3})
    t0 = time.monotonic()
    qpeft.load_adapter(fresh, tmp_path)
    assert time.monotonic() - t0 < 20
    assert getattr(fresh[0], LONG).adapters["default"].alpha == 3 and fresh[1].adapters["default"].alpha == 8


NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.10.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "model.decoder.layers.0.encoder_attn.k_proj",
    "q_proj",
    "xq_proj",
    "layers.0.q_proj",
    "aXb",
    "a.b",
]
KEYS = [
    "q_proj",
    "self_attn.q_proj",
    "model.layers.0.self_attn.q_proj",
    "layers.0.self_attn.q_proj",
    "a.b",  # '.' is a regex wildcard to PEFT: matches "aXb" too
    "proj",
    r"layers\.\d+\.self_attn\.(q|k)_proj",
    "layers.1[0-9].*",
    "^model.decoder.layers.0.encoder_attn.k_proj",
    "^q_proj",
    "(?:down|up)_proj$",
    "[^.]*_proj",
    r"\w+\.\d{1,2}\.mlp\..*",
    "x?q_proj",
    "q_proj|k_proj",
    "layers.[0-9]+.self_attn.q_proj",
    "model.layers.0.self_attn.q_proj.",
]


@pytest.mark.parametrize("key", KEYS)
def test_pattern_keys_match_as_peft(key):
    """PEFT's lookup is re.match(rf"(.*\\.)?({key})$", name): the automaton agrees on keys
    PEFT users write (literal tails, dotted paths, regexes)."""
    pattern = ser._compile_patterns({key: 1}, "rank_pattern")
    for name in NAMES:
        want = re.match(rf"(.*\.)?({key})$", name) is not None
        assert (ser._pattern_value(pattern, name, 0, [10**9]) == 1) == want, name


def test_pattern_first_match_wins_and_limits():
    patterns = ser._compile_patterns({"q_proj": 1, "self_attn.q_proj": 2}, "rank_pattern")
    assert ser._pattern_value(patterns, "model.self_attn.q_proj", 9, [10**9]) == 1  # dict order, as PEFT
    with pytest.raises(ValueError, match=r"rank_pattern key '\(\?=x\)'"):
        ser._compile_patterns({"(?=x)": 1}, "rank_pattern")
    with pytest.raises(ValueError, match="backreference|escape"):
        ser._compile_patterns({r"(a)\1": 1}, "rank_pattern")
    with pytest.raises(ValueError, match="too large"):
        ser._compile_patterns({"(a{100}){100}": 1}, "rank_pattern")
    big = ser._compile_patterns({"(.|.|.|.)*(.|.)*(.|.)*z": 1}, "alpha_pattern")
    with pytest.raises(ValueError, match="too long"):  # the work budget is a hard bound
        ser._pattern_value(big, "y" * 200, 0, [1000])


def test_pattern_limits_in_adapter_config(tmp_path):
    model = _converted()
    qpeft.save_adapter(model, tmp_path)
    _edit_config(tmp_path, rank_pattern={"x" * 2000: 4})
    with pytest.raises(ValueError, match="rank_pattern.*length 2000"):
        qpeft.load_adapter(_converted(1), tmp_path)
    _edit_config(tmp_path, rank_pattern={f"k{i}": 4 for i in range(ser._PATTERN_MAX_KEYS + 1)})
    with pytest.raises(ValueError, match="rank_pattern.*keys"):
        qpeft.load_adapter(_converted(1), tmp_path)


# --- 2. crash-safe saves ---------------------------------------------------------------------
def _adapter_bytes(directory) -> tuple[bytes, bytes]:
    with open(os.path.join(directory, "adapter_config.json"), "rb") as f:
        cfg = f.read()
    with open(os.path.join(directory, "adapter_model.safetensors"), "rb") as f:
        return cfg, f.read()


def _temporaries(parent) -> list[str]:
    return sorted(e for e in os.listdir(parent) if ".qpeft-tmp-" in e)


@pytest.mark.parametrize("fail_at", ["weights", "config", "swap"])
def test_failed_save_adapter_keeps_the_previous_adapter(tmp_path, monkeypatch, fail_at):
    """A save that dies after the weights, while writing the config, or at the swap leaves
    the previous pair exactly as it was (the old code had new weights beside the old config,
    or a truncated config) and no temporary behind."""
    target = tmp_path / "adapter"
    old_model = _converted(seed=0)
    qpeft.save_adapter(old_model, target)
    before = _adapter_bytes(target)

    real_fsync = ser._fsync

    def dying_fsync(path):
        real_fsync(path)
        if fail_at == "weights" and path.endswith("adapter_model.safetensors"):
            raise OSError("killed after the weights")

    def dying_exchange(a, b):
        raise OSError("killed at the swap")

    real_open = open

    def dying_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if fail_at == "config" and str(path).endswith("adapter_config.json") and "w" in mode:
            f.write(b'{"peft_type": "LO')
            f.close()
            raise OSError("killed while writing the config")
        return f

    monkeypatch.setattr(ser, "_fsync", dying_fsync)
    monkeypatch.setattr(ser, "_exchange", dying_exchange)
    monkeypatch.setattr(ser, "open", dying_open, raising=False)
    new_model = _converted(seed=3)
    with pytest.raises(OSError, match="killed"):
        qpeft.save_adapter(new_model, target)
    monkeypatch.undo()
    assert _adapter_bytes(target) == before
    assert _temporaries(tmp_path) == []
    fresh = _converted(seed=5)
    qpeft.load_adapter(fresh, target)
    _assert_same_adapters(fresh, old_model)


def test_save_adapter_killed_by_sigkill_then_next_save_cleans_up(tmp_path):
    """A process SIGKILLed after staging the complete new pair but before the swap: the old
    adapter still loads intact, the staging directory is recognisably named, and the next
    save removes it (and a stale save_quantized temporary of a dead process), but not a
    temporary of a live process."""
    target = tmp_path / "adapter"
    old_model = _converted(seed=0)
    qpeft.save_adapter(old_model, target)
    before = _adapter_bytes(target)
    child = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(os.path.dirname(qpeft.__file__))!r})
        import torch
        import qpeft
        import qpeft.serialization as ser
        real = ser._fsync
        def fsync(path):
            real(path)
            if os.path.basename(path).startswith(".adapter.qpeft-tmp-"):  # the staged directory
                os.kill(os.getpid(), signal.SIGKILL)
        ser._fsync = fsync
        model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8))
        ser.save_adapter(qpeft.convert(model, r=4, verbose=False), {str(target)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert _adapter_bytes(target) == before
    staged = _temporaries(tmp_path)
    assert len(staged) == 1 and staged[0].startswith(".adapter.qpeft-tmp-")
    assert sorted(os.listdir(tmp_path / staged[0])) == ["adapter_config.json", "adapter_model.safetensors"]
    fresh = _converted(seed=5)
    qpeft.load_adapter(fresh, target)
    _assert_same_adapters(fresh, old_model)

    dead = tmp_path / f".base.safetensors.qpeft-tmp-{_dead_pid()}-abc"
    live = tmp_path / f".base.safetensors.qpeft-tmp-{os.getpid()}-abc"
    dead.write_bytes(b"x" * 100)
    live.write_bytes(b"y")
    new_model = _converted(seed=3)
    qpeft.save_adapter(new_model, target)
    qpeft.save_quantized(new_model, tmp_path / "base.safetensors")
    assert _temporaries(tmp_path) == [live.name]
    qpeft.load_adapter(fresh, target)
    _assert_same_adapters(fresh, new_model)


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_save_adapter_keeps_other_files_and_works_without_exchange(tmp_path, monkeypatch):
    """A directory with other entries (a Trainer checkpoint holds more than the adapter) gets
    the pair replaced file by file and keeps the rest; so does the fallback without an atomic
    exchange."""
    target = tmp_path / "ckpt"
    qpeft.save_adapter(_converted(seed=0), target)
    (target / "README.md").write_text("notes")
    (target / "sub").mkdir()
    (target / "sub" / "state.json").write_text("{}")
    os.chmod(target, 0o751)
    monkeypatch.setattr(ser, "_exchange", lambda a, b: False)
    new_model = _converted(seed=3)
    qpeft.save_adapter(new_model, target)
    assert (target / "README.md").read_text() == "notes" and (
        target / "sub" / "state.json"
    ).read_text() == "{}"
    assert os.stat(target).st_mode & 0o777 == 0o751
    assert _temporaries(tmp_path) == []
    fresh = _converted(seed=5)
    qpeft.load_adapter(fresh, target)
    _assert_same_adapters(fresh, new_model)


def test_save_adapter_into_the_working_directory(tmp_path, monkeypatch):
    """A directory holding the working directory is never replaced (the pair is written into
    it): a working directory inside it stays live, not left in a deleted old version."""
    target = tmp_path / "run"
    qpeft.save_adapter(_converted(seed=0), target)
    (target / "logs").mkdir()
    monkeypatch.chdir(target / "logs")
    new_model = _converted(seed=3)
    qpeft.save_adapter(new_model, "..")
    assert os.path.samefile(os.getcwd(), target / "logs")
    (tmp_path / "run" / "logs" / "x").write_text("1")  # the directory is live, not deleted
    assert os.listdir(".") == ["x"]
    fresh = _converted(seed=5)
    qpeft.load_adapter(fresh, "..")
    _assert_same_adapters(fresh, new_model)


def _inodes(root) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(d, n), root): os.lstat(os.path.join(d, n)).st_ino
        for d, dirs, files in os.walk(root)
        for n in dirs + files
    }


@pytest.mark.parametrize("start", ["other files", "pair only"])
def test_save_adapter_never_rebuilds_a_directory_with_other_entries(tmp_path, monkeypatch, start):
    """Only the pair's two files change: the directory and its other entries keep their
    identity (the old save rebuilt the whole directory, copying other entries and deleting
    the old tree, which emptied a volume mounted inside it and lost a file another process
    wrote meanwhile). A file that appears while the pair is being written stays too, also
    where the directory held the pair alone before (the swap path re-checks)."""
    target = tmp_path / "out"
    qpeft.save_adapter(_converted(seed=0), target)
    if start == "other files":
        (target / "data").mkdir()
        (target / "data" / "precious.txt").write_text("keep")
        (target / "notes.md").write_text("n")
    before = _inodes(target)
    dir_inode = os.stat(target).st_ino
    real_write_pair = ser._write_pair

    def write_pair(directory, tensors, config_bytes, temporary):
        out = real_write_pair(directory, tensors, config_bytes, temporary)
        (target / "late.log").write_text("written meanwhile")
        return out

    monkeypatch.setattr(ser, "_write_pair", write_pair)
    new_model = _converted(seed=3)
    qpeft.save_adapter(new_model, target)
    monkeypatch.undo()
    assert (target / "late.log").read_text() == "written meanwhile"
    assert os.stat(target).st_ino == dir_inode
    after = _inodes(target)
    for name, ino in before.items():
        if name not in ("adapter_config.json", "adapter_model.safetensors"):
            assert after[name] == ino, name
    if start == "other files":
        assert (target / "data" / "precious.txt").read_text() == "keep"
    top = {name.split(os.sep)[0] for name in before} | {"late.log"}
    assert sorted(os.listdir(target)) == sorted(top)  # no temporaries left
    assert _temporaries(tmp_path) == []
    fresh = _converted(seed=5)
    qpeft.load_adapter(fresh, target)
    _assert_same_adapters(fresh, new_model)


def test_save_adapter_where_the_parent_is_not_writable(tmp_path, monkeypatch):
    """A writable directory under a parent the process cannot write (--out ~ under a
    root-owned /home): the pair is written into it in place instead of staged beside it."""
    target = tmp_path / "out"
    qpeft.save_adapter(_converted(seed=0), target)
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):
        if ".qpeft-tmp-" in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    new_model = _converted(seed=3)
    qpeft.save_adapter(new_model, target)
    monkeypatch.undo()
    fresh = _converted(seed=5)
    qpeft.load_adapter(fresh, target)
    _assert_same_adapters(fresh, new_model)
    with pytest.raises(PermissionError):  # a new directory there cannot be made at all
        monkeypatch.setattr(os, "mkdir", mkdir)
        qpeft.save_adapter(new_model, tmp_path / "new")


def test_failed_save_quantized_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "base.safetensors"
    qpeft.save_quantized(_converted(seed=0), path)
    before = path.read_bytes()

    def dying_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("killed mid-write")

    monkeypatch.setattr(st, "save_file", dying_save)
    with pytest.raises(OSError, match="killed"):
        qpeft.save_quantized(_converted(seed=3), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _temporaries(tmp_path) == []


# --- 3. 4-bit states validated at load time -----------------------------------------------------
def _layer_state(double_quant: bool = True) -> dict[str, torch.Tensor]:
    lin = nn.Linear(64, 48)
    return Linear4bit.from_linear(lin, double_quant=double_quant).state_dict()


def _packed_fields(sd: dict) -> dict:
    return json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].numpy()).decode())


def _repacked(sd: dict, fields: dict) -> dict:
    sd = dict(sd)
    sd["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(
        list(json.dumps(fields).encode()), dtype=torch.uint8
    )
    return sd


def _with_fields(sd: dict, **changes) -> dict:
    return _repacked(sd, {**_packed_fields(sd), **changes})


def _without_fields(sd: dict, *names: str) -> dict:
    return _repacked(sd, {k: v for k, v in _packed_fields(sd).items() if k not in names})


def _without(sd: dict, key: str) -> dict:
    return {k: v for k, v in sd.items() if k != key}


def _bad_states():
    sd = _layer_state()
    plain = _layer_state(double_quant=False)
    nan = dict(sd)
    nan["weight.nested_absmax"] = torch.full_like(sd["weight.nested_absmax"], float("nan"))
    nan_plain = dict(plain)
    nan_plain["weight.absmax"] = plain["weight.absmax"].clone()
    nan_plain["weight.absmax"][1] = float("nan")
    neg_plain = dict(plain)
    neg_plain["weight.absmax"] = -plain["weight.absmax"]
    missing = {k: v for k, v in sd.items() if k != "weight.nested_absmax"}
    short = dict(sd)
    short["weight.nested_absmax"] = sd["weight.nested_absmax"][:0]
    half = dict(sd)
    half["weight.nested_absmax"] = sd["weight.nested_absmax"].half()
    short_absmax = dict(sd)
    short_absmax["weight.absmax"] = sd["weight.absmax"][:-1]
    qmap = dict(sd)
    qmap["weight.quant_map"] = sd["weight.quant_map"].flip(0)
    nested_map = dict(sd)
    nested_map["weight.nested_quant_map"] = sd["weight.nested_quant_map"][:16]
    not_object = dict(sd)
    not_object["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)
    boolean = dict(sd)
    boolean["weight"] = sd["weight"].bool()
    return {
        "missing nested_absmax": (missing, ValueError, "weight.nested_absmax"),
        # an absent entry is named as the checkpoint would hold it, "weight." included
        "missing absmax": (_without(sd, "weight.absmax"), ValueError, "missing 'weight.absmax'"),
        "missing plain absmax": (_without(plain, "weight.absmax"), ValueError, "missing 'weight.absmax'"),
        "missing quant_map": (_without(sd, "weight.quant_map"), ValueError, "missing 'weight.quant_map'"),
        "missing packed blocksize": (
            _without_fields(sd, "blocksize"),
            ValueError,
            re.escape("missing \"weight.quant_state.bitsandbytes__nf4['blocksize']\""),
        ),
        "missing packed nested_offset": (
            _without_fields(sd, "nested_offset"),
            ValueError,
            re.escape("weight.quant_state.bitsandbytes__nf4['nested_offset']"),
        ),
        "short nested_absmax": (short, ValueError, "weight.nested_absmax has 0 entries"),
        "fp16 nested_absmax": (half, ValueError, "weight.nested_absmax must be torch.float32"),
        "nan nested_absmax": (nan, ValueError, "weight.nested_absmax holds NaN"),
        "nan absmax": (nan_plain, ValueError, "weight.absmax holds NaN"),
        "negative absmax": (neg_plain, ValueError, "weight.absmax holds negative"),
        "short absmax": (short_absmax, ValueError, "weight.absmax has 47 entries"),
        "quant_map": (qmap, ValueError, "weight.quant_map is not the nf4 table"),
        "nested quant_map": (nested_map, ValueError, "weight.nested_quant_map has 16 entries"),
        "json list": (not_object, ValueError, "JSON object"),
        "string blocksize": (_with_fields(sd, blocksize="64"), ValueError, "blocksize.*must be an integer"),
        "bad dtype": (_with_fields(sd, dtype="int8"), ValueError, "'dtype'.*must name float32"),
        "bad quant_type": (_with_fields(sd, quant_type="nf5"), ValueError, "quant_type"),
        "bad shape": (_with_fields(sd, shape="48x64"), ValueError, "shape"),
        "wrong shape": (_with_fields(sd, shape=[64, 48]), ValueError, r"shape \(64, 48\)"),
        "nan offset": (_with_fields(sd, nested_offset=float("nan")), ValueError, "nested_offset"),
        "bool packed": (boolean, TypeError, "torch.bool"),
    }


@pytest.mark.parametrize("case", list(_bad_states()))
def test_bad_4bit_state_fails_at_load_naming_the_key(case):
    """Each of these loaded with "All keys matched" (or silently) and failed later, in the
    forward pass or as NaN outputs; now load_state_dict refuses them and the layer keeps its
    weight."""
    sd, _, message = _bad_states()[case]
    layer = Linear4bit(64, 48)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(sd)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


def _quantized_file(tmp_path, edit=None):
    model = _converted(seed=0)
    path = tmp_path / "base.safetensors"
    qpeft.save_quantized(model, path)
    if edit is not None:
        tensors = st.load_file(path)
        with st.safe_open(path, "pt") as f:
            meta = f.metadata()
        edit(tensors)
        st.save_file(tensors, path, metadata=meta)
    return model, path


def _nan_(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


MIDDLE = {  # corruptions of the middle layer ("1") of the file, the key the error names
    "missing nested_absmax": (lambda t: t.pop("1.weight.nested_absmax"), ValueError, "weight.nested_absmax"),
    "missing absmax": (lambda t: t.pop("1.weight.absmax"), ValueError, "missing '1.weight.absmax'"),
    "nan nested_absmax": (
        lambda t: t.__setitem__("1.weight.nested_absmax", _nan_(t["1.weight.nested_absmax"])),
        ValueError,
        "weight.nested_absmax holds NaN",
    ),
    "fp16 nested_absmax": (
        lambda t: t.__setitem__("1.weight.nested_absmax", t["1.weight.nested_absmax"].half()),
        ValueError,
        "weight.nested_absmax must be torch.float32",
    ),
    "bool packed": (
        lambda t: t.__setitem__("1.weight", t["1.weight"].bool()),
        TypeError,
        "weight is a torch.bool",
    ),
    "bias shape": (
        lambda t: t.__setitem__("2.bias", t["2.bias"][:3]),
        ValueError,
        "2.bias: the file has shape",
    ),
}


@pytest.mark.parametrize("case", list(MIDDLE))
def test_bad_layer_in_the_middle_fails_load_quantized_and_changes_nothing(tmp_path, case):
    """One bad layer among good ones: the old load_quantized had already overwritten the
    layers before it (or loaded it silently). Into a converted model (4-bit layers replaced
    in place) and a plain one (linears swapped for Linear4bit, swaps undone on failure)."""
    edit, exc, message = MIDDLE[case]
    _, path = _quantized_file(tmp_path, edit)
    for target in (_converted(seed=4), _model(seed=4)):
        before = _snapshot(target)
        kinds = [type(m) for m in target.modules()]
        with pytest.raises(exc, match=message):
            qpeft.load_quantized(target, path)
        _assert_unchanged(target, before)
        assert [type(m) for m in target.modules()] == kinds


def test_good_quantized_load_still_works(tmp_path):
    model, path = _quantized_file(tmp_path)
    fresh = qpeft.load_quantized(_model(seed=4), path)
    with torch.no_grad(), qpeft.disable_adapters(model):
        assert torch.equal(fresh(X), model(X))


# --- 4. adapter files validated ------------------------------------------------------------------
def _saved_adapter(tmp_path):
    model = _converted(seed=0)
    qpeft.save_adapter(model, tmp_path)
    return model


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_non_float_adapter_tensor_refused(tmp_path, dtype):
    _saved_adapter(tmp_path)
    key = "base_model.model.1.lora_B.weight"
    _edit_weights(tmp_path, lambda t: t.__setitem__(key, t[key].to(dtype)))
    fresh = _converted(seed=5)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=re.escape(key) + f".*{dtype}"):
        qpeft.load_adapter(fresh, tmp_path)
    _assert_unchanged(fresh, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_adapter_values_need_opt_in(tmp_path, value):
    _saved_adapter(tmp_path)
    key = "base_model.model.2.lora_A.weight"

    def edit(t):
        t[key] = t[key].clone()
        t[key][0, 0] = value

    _edit_weights(tmp_path, edit)
    fresh = _converted(seed=5)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=re.escape(key) + ".*allow_nonfinite=True"):
        qpeft.load_adapter(fresh, tmp_path)
    _assert_unchanged(fresh, before)
    qpeft.load_adapter(fresh, tmp_path, allow_nonfinite=True)
    got = float(fresh[2].adapters["default"].lora_A[0, 0].detach())
    assert math.isnan(got) if math.isnan(value) else got == value


BAD_CONFIGS = {
    "nan alpha": ({"lora_alpha": float("nan")}, "'lora_alpha' must be a finite number"),
    "negative alpha": ({"lora_alpha": -8}, "'lora_alpha' must be a finite number >= 0"),
    "bool alpha": ({"lora_alpha": True}, "'lora_alpha'"),
    "string rslora": ({"use_rslora": "false"}, "'use_rslora' must be true or false"),
    "string dora": ({"use_dora": "false"}, "'use_dora' must be true or false"),
    "string r": ({"r": "4"}, "'r' must be a positive integer"),
    "zero r": ({"r": 0}, "'r' must be a positive integer"),
    "float r": ({"r": 4.0}, "'r' must be a positive integer"),
    "target_modules": ({"target_modules": 5}, "'target_modules'"),
    "target_modules list": ({"target_modules": ["a", 1]}, "'target_modules'"),
    "rank_pattern list": ({"rank_pattern": ["a"]}, "'rank_pattern' must be an object"),
    "rank_pattern value": ({"rank_pattern": {"1": True}}, r"rank_pattern\['1'\]"),
    "alpha_pattern value": ({"alpha_pattern": {"1": "8"}}, r"alpha_pattern\['1'\]"),
    "dropout": ({"lora_dropout": 1.5}, "'lora_dropout'"),
    "bias": ({"bias": "yes"}, "'bias'"),
    "string lora_bias": ({"lora_bias": "false"}, "'lora_bias' must be true or false"),
    "lora_bias": ({"lora_bias": True}, r"lora_bias \(PEFT's LoraConfig\(lora_bias=True\).*is not supported"),
    "rank disagrees": ({"rank_pattern": {"2": 8}}, "lora_A has rank 4 but adapter_config.json gives r = 8"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_adapter_config_refused(tmp_path, case):
    _saved_adapter(tmp_path)
    changes, message = BAD_CONFIGS[case]
    _edit_config(tmp_path, **changes)
    fresh = _converted(seed=5)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=message):
        qpeft.load_adapter(fresh, tmp_path)
    _assert_unchanged(fresh, before)


def _as_bin(directory, edit) -> list[str]:
    """Replace the weights by an ``adapter_model.bin`` (PEFT's older format, which keeps the
    order of its keys) holding ``edit(tensors)``; returns the keys in file order."""
    path = os.path.join(directory, "adapter_model.safetensors")
    tensors = edit(st.load_file(path))
    os.unlink(path)
    torch.save(tensors, os.path.join(directory, "adapter_model.bin"))
    return list(tensors)


@pytest.mark.parametrize("bias_first", [True, False], ids=["bias-first", "bias-last"])
@pytest.mark.parametrize("tail", ["lora_B.bias", "lora_B.default.bias"])
def test_lora_B_bias_refused_whatever_the_key_order(tmp_path, tail, bias_first):
    """PEFT's lora_bias=True writes ``<layer>.lora_B.bias``. The old key pattern read ".bias"
    as an adapter name: the bias vector took lora_B's slot, and a later lora_B.weight
    overwrote it (the bias silently dropped) or, in a .bin written the other way round, the
    bias replaced lora_B. Now it is refused whatever the order, even without the config
    flag, naming the key and the feature."""
    _saved_adapter(tmp_path)
    key = f"base_model.model.1.{tail}"

    def edit(t):
        bias = {key: torch.randn(24)}
        return {**bias, **t} if bias_first else {**t, **bias}

    order = _as_bin(tmp_path, edit)
    assert (order.index(key) < order.index("base_model.model.1.lora_B.weight")) == bias_first
    fresh = _converted(seed=5)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=re.escape(key) + r": lora_bias .*is not supported"):
        qpeft.load_adapter(fresh, tmp_path)
    _assert_unchanged(fresh, before)


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ("lora_A.bias", "lora_A has no bias"),
        ("lora_magnitude_vector.bias", "lora_magnitude_vector has no bias"),
        ("lora_A.default.scale", "not a LoRA tensor"),
    ],
)
def test_unknown_lora_tensors_refused(tmp_path, tail, message):
    _saved_adapter(tmp_path)
    key = f"base_model.model.2.{tail}"
    _edit_weights(tmp_path, lambda t: t.__setitem__(key, torch.randn(4)))
    fresh = _converted(seed=5)
    before = _snapshot(fresh)
    with pytest.raises(ValueError, match=re.escape(key) + ": " + message):
        qpeft.load_adapter(fresh, tmp_path)
    _assert_unchanged(fresh, before)


def test_adapter_named_keys_load_and_duplicates_are_refused(tmp_path):
    """Keys with PEFT's in-memory adapter name ("lora_A.default.weight") load as the plain
    ones; a file holding both forms for one layer is refused rather than one silently
    winning."""
    model = _saved_adapter(tmp_path)
    _edit_weights(
        tmp_path,
        lambda t: [t.__setitem__(k.replace(".weight", ".default.weight"), t.pop(k)) for k in list(t)],
    )
    fresh = qpeft.load_adapter(_converted(seed=5), tmp_path)
    for a, b in zip(model.modules(), fresh.modules()):
        if isinstance(a, QLoRALinear):
            assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B)
    key = "base_model.model.1.lora_B.default.weight"
    _edit_weights(tmp_path, lambda t: t.__setitem__("base_model.model.1.lora_B.weight", t[key].clone()))
    with pytest.raises(ValueError, match="both hold lora_B of 1"):
        qpeft.load_adapter(_converted(seed=5), tmp_path)


def test_config_not_an_object(tmp_path):
    _saved_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        qpeft.load_adapter(_converted(seed=5), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LO')
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        qpeft.load_adapter(_converted(seed=5), tmp_path)


# --- 5. a failing load_adapter leaves the model as it was -------------------------------------
def test_failing_load_adapter_leaves_model_unchanged(tmp_path):
    """A file that replaces adapter 'default' everywhere, bad in its last layer: the layers
    before it keep their adapter objects and values, and the random stream is not consumed."""
    _saved_adapter(tmp_path)
    key = "base_model.model.2.lora_B.weight"
    _edit_weights(tmp_path, lambda t: t.__setitem__(key, t[key][:, :2].contiguous()))
    fresh = _converted(seed=5)
    before = _snapshot(fresh)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="2: lora_A"):
        qpeft.load_adapter(fresh, tmp_path)
    _assert_unchanged(fresh, before)
    assert torch.equal(torch.get_rng_state(), rng)


# --- 6. 8-bit states round-trip -------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1000,), (3, 300)])
def test_8bit_state_round_trip(shape):
    x = torch.randn(shape)
    q, state = qf.quantize_blockwise(x, 256)
    back = QuantState.from_dict(state.as_dict(), "cpu")
    assert back.quant_type is None and back.blocksize == 256 and back.shape == x.shape
    assert torch.equal(qf.dequantize_blockwise(q, back), qf.dequantize_blockwise(q, state))
    assert state.as_dict(packed=True).keys() == state.as_dict().keys()  # as bitsandbytes: no packing
    # ours -> bitsandbytes and back
    theirs = bnbF.QuantState.from_dict(dict(state.as_dict()), "cpu")
    assert torch.equal(bnbF.dequantize_blockwise(q, theirs), qf.dequantize_blockwise(q, state))
    q_bnb, s_bnb = bnbF.quantize_blockwise(x, blocksize=256)
    ours = QuantState.from_dict(dict(s_bnb.as_dict()), "cpu")
    assert torch.equal(qf.dequantize_blockwise(q_bnb, ours), bnbF.dequantize_blockwise(q_bnb, s_bnb))


def test_8bit_nested_bitsandbytes_state_reads():
    _, s_bnb = bnbF.quantize_blockwise(torch.randn(300_000), nested=True)
    ours = QuantState.from_dict(dict(s_bnb.as_dict()), "cpu")
    assert ours.nested and ours.quant_type is None and ours.blocksize == s_bnb.blocksize
    assert torch.equal(ours.state2.absmax, s_bnb.state2.absmax) and torch.equal(ours.absmax, s_bnb.absmax)
    assert float(ours.offset) == float(s_bnb.offset)


# --- 7. empty Linear4bit without a dense weight ---------------------------------------------------
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (64, 64), (257, 129)])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_empty_linear4bit_equals_quantized_zeros(quant_type, double_quant, shape, dtype):
    out, inp = shape
    layer = Linear4bit(inp, out, quant_type=quant_type, blocksize=128, double_quant=double_quant, dtype=dtype)
    packed, state = qf.quantize_4bit(
        torch.zeros(out, inp, dtype=dtype or torch.float32), 128, quant_type, double_quant
    )
    # the layer's weight is a Weight4bit: its codes are .packed (docs/design.md, "The 4-bit weight tensor")
    assert torch.equal(layer.weight.packed, packed) and layer.weight.packed.dtype == packed.dtype
    ours, ref = layer.quant_state.as_dict(), state.as_dict()
    assert ours.keys() == ref.keys()
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == ours[k].dtype and v.shape == ours[k].shape and torch.equal(v, ours[k]), k
        else:
            assert ours[k] == v, k
    if double_quant:
        assert layer.quant_state.offset.shape == state.offset.shape
        assert layer.quant_state.state2.shape == state.state2.shape


def test_large_empty_linear4bit_builds_no_dense_weight(monkeypatch):
    def no_quantize(*args, **kwargs):
        raise AssertionError("Linear4bit() must not quantize a dense zero weight")

    monkeypatch.setattr(qf, "quantize_4bit", no_quantize)
    layer = Linear4bit(16384, 16384)
    assert layer.weight.packed.numel() == 16384 * 16384 // 2 and layer.weight.packed.dtype == torch.uint8
    assert layer.weight_bytes() < 16384 * 16384 // 2 * 1.1


def test_linear4bit_constructor_argument_types():
    with pytest.raises(TypeError, match="in_features must be an int"):
        Linear4bit(16.0, 8)
    with pytest.raises(TypeError, match="out_features must be an int"):
        Linear4bit(16, True)
    with pytest.raises(TypeError, match="dtype must be"):
        Linear4bit(16, 8, dtype=torch.float64)


# --- 8. tied input/output embeddings (Llama-3.2-1B, Qwen2.5-0.5B, Gemma, T5) --------------------
def _tied_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return transformers, cfg, model


def test_load_quantized_reads_transformers_bnb_checkpoint_of_tied_model(tmp_path):
    """transformers does not write lm_head.weight of a tied model (it is embed_tokens.weight):
    strict load_quantized counted it missing. A tied group is loaded when the file has any of
    its names; a group the file lacks entirely is still missing."""
    transformers, cfg, dense = _tied_llama()
    dense.save_pretrained(tmp_path / "dense")
    q = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=q, device_map="cpu"
    )
    hf.save_pretrained(tmp_path / "bnb")
    path = tmp_path / "bnb" / "model.safetensors"
    assert "lm_head.weight" not in st.load_file(path)
    model = qpeft.convert(transformers.LlamaForCausalLM(cfg), verbose=False)
    qpeft.load_quantized(model, path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), qpeft.disable_adapters(model):
        assert torch.allclose(model(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    tensors = st.load_file(path)
    del tensors["model.embed_tokens.weight"]
    st.save_file(tensors, tmp_path / "no_embed.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['model.embed_tokens.weight', 'lm_head.weight'\]"):
        qpeft.load_quantized(
            qpeft.convert(transformers.LlamaForCausalLM(cfg), verbose=False),
            tmp_path / "no_embed.safetensors",
        )


def test_save_adapter_of_tied_modules_to_save_loads_in_peft(tmp_path):
    """embed_tokens and lm_head of a tied model share storage, which safetensors refuses to
    write; each gets its own copy in the file (as PEFT saves them), PEFT loads the directory,
    and load_adapter loads equal tensors once, leaving the model tied."""
    transformers, cfg, base = _tied_llama()
    peft = pytest.importorskip("peft")
    model = qpeft.convert(transformers.LlamaForCausalLM(cfg), verbose=False)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1.0)  # "trained"
    qpeft.save_adapter(model, tmp_path, modules_to_save=["embed_tokens", "lm_head"])
    loaded = peft.PeftModel.from_pretrained(base, tmp_path)
    for name in ("model.embed_tokens", "lm_head"):
        wrapper = loaded.base_model.model.get_submodule(name)
        assert torch.equal(wrapper.modules_to_save["default"].weight, model.model.embed_tokens.weight), name
    fresh = qpeft.convert(transformers.LlamaForCausalLM(cfg), verbose=False)
    qpeft.load_adapter(fresh, tmp_path)
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_load_adapter_unties_tied_modules_trained_apart_by_peft(tmp_path):
    """PEFT trains a copy of each of the tied embed_tokens and lm_head (modules_to_save), so
    their saved tensors differ; load_adapter copied both into the one tied Parameter (the last
    won: logits off by 1.58). Each module now gets its own, and the logits are PEFT's."""
    import copy

    _, _, base = _tied_llama()
    peft = pytest.importorskip("peft")
    model = qpeft.convert(copy.deepcopy(base), target_modules=["q_proj"], verbose=False).eval()
    dequantized = copy.deepcopy(base)  # PEFT's base: the very weights qpeft's 4-bit layers hold
    with torch.no_grad():
        for a, b in zip(dequantized.model.layers, model.model.layers):
            a.self_attn.q_proj.weight.copy_(b.self_attn.q_proj.base_layer.dequantize(torch.float32))
    config = peft.LoraConfig(
        r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False
    )
    hf = peft.get_peft_model(dequantized, config)
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        hf(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    hf.eval().save_pretrained(tmp_path)
    qpeft.load_adapter(model, tmp_path)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def _q_proj_llama_and_peft_base(base):
    """qpeft model converting q_proj only, and PEFT's base: the very weights it holds."""
    import copy

    model = qpeft.convert(copy.deepcopy(base), target_modules=["q_proj"], verbose=False).eval()
    dequantized = copy.deepcopy(base)
    with torch.no_grad():
        for a, b in zip(dequantized.model.layers, model.model.layers):
            a.self_attn.q_proj.weight.copy_(b.self_attn.q_proj.base_layer.dequantize(torch.float32))
    return model, dequantized


@pytest.mark.parametrize("side", ["embed_tokens", "lm_head"])
def test_load_adapter_unties_one_sided_modules_to_save_as_peft(tmp_path, side):
    """PEFT with modules_to_save naming one side of a tie trains a copy of that module and
    leaves the other with the original tensor; load_adapter copied the file's tensor into the
    still-tied Parameter, moving the other side too (logits off by 31.9). The loaded module
    now gets its own Parameter and the other keeps the original, as under PEFT."""
    _, _, base = _tied_llama()
    peft = pytest.importorskip("peft")
    model, dequantized = _q_proj_llama_and_peft_base(base)
    original = model.lm_head.weight
    hf = peft.get_peft_model(
        dequantized, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=[side])
    )
    with torch.no_grad():
        hf.base_model.model.get_submodule(
            side if side == "lm_head" else "model.embed_tokens"
        ).modules_to_save["default"].weight.add_(0.5)
    hf.eval().save_pretrained(tmp_path)
    qpeft.load_adapter(model, tmp_path)
    loaded, other = (
        (model.lm_head, model.model.embed_tokens)
        if side == "lm_head"
        else (
            model.model.embed_tokens,
            model.lm_head,
        )
    )
    assert other.weight is original and loaded.weight is not original
    assert loaded.weight.requires_grad == original.requires_grad
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_save_adapter_of_one_side_of_a_tie_loads_in_peft(tmp_path):
    """qpeft trains the one tied tensor, moving embed_tokens and lm_head; save_adapter with
    modules_to_save=["embed_tokens"] wrote the embedding only and PEFT kept lm_head at the
    original (logits off by 31.9). The other holders of the tensor are saved and named too."""
    _, _, base = _tied_llama()
    peft = pytest.importorskip("peft")
    model, dequantized = _q_proj_llama_and_peft_base(base)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.5)  # "trained": lm_head moves with it
    qpeft.save_adapter(model, tmp_path, modules_to_save=["embed_tokens"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    hf = peft.PeftModel.from_pretrained(dequantized, tmp_path).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, hf(input_ids=ids).logits, atol=1e-4, rtol=0)
    fresh, _ = _q_proj_llama_and_peft_base(base)
    qpeft.load_adapter(fresh, tmp_path)  # equal tensors for every holder: stays tied
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)


def test_save_adapter_on_an_ia3_model_says_ia3_cannot_be_saved_and_what_works(tmp_path):
    """It said 'no qpeft QLoRALinear layer; run qpeft.convert(model) first' of a model that
    convert(method='ia3') had converted. The workaround it names round-trips the vectors."""

    def ia3(seed):
        torch.manual_seed(seed)
        return qpeft.convert(nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8)), method="ia3", verbose=False)

    model = ia3(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("ia3_l"):
                p.uniform_(0.5, 1.5)
    with pytest.raises(ValueError, match=r"adapters are IA3 .*cannot write PEFT's IA3 format") as exc:
        qpeft.save_adapter(model, tmp_path / "out")
    assert "run qpeft.convert" not in str(exc.value)
    assert not (tmp_path / "out").exists()
    # the workaround the message names
    vectors = {k: v for k, v in model.state_dict().items() if k.endswith(".ia3_l")}
    st.save_file(vectors, str(tmp_path / "ia3.safetensors"))
    other = ia3(0)
    result = other.load_state_dict(st.load_file(str(tmp_path / "ia3.safetensors")), strict=False)
    assert not result.unexpected_keys
    x = torch.randn(3, 16)
    assert torch.equal(other(x), model(x))
