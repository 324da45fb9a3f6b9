"""Build qpeft: setuptools drives CMake (CMakeLists.txt) for the native modules.

Environment:
  QPEFT_CUDA        auto (default): build qpeft._C_cuda when nvcc is found and its CUDA
                    major version is torch's (torch.version.cuda; nvcc's own with a
                    CPU-only torch), else say so and skip it; 1: require it (error if
                    nvcc is missing or of another major); 0: CPU only.
  QPEFT_TORCH_CUDA  the CUDA version to match ("12.8"; "none": no CUDA torch) when the
                    torch being built for is not importable (pip's build isolation;
                    or use pip install --no-build-isolation)
  QPEFT_CUDA_EMULATION  auto (default): build qpeft._C_cuda_emu, the CUDA kernels
                    compiled as host C++ and run on the CPU by an emulation harness
                    (a test backend), when the CUDA toolkit headers are found (no
                    nvcc or GPU needed); 1: require it; 0: skip it.
  QPEFT_TORCH_LAYER auto (default): build qpeft._C_layer, a small layer's call in C++,
                    against the importable torch (the one module linking libtorch,
                    used only under that torch version), when torch is importable;
                    1: require it; 0: skip it.
  QPEFT_CUDA_ARCHS  CMAKE_CUDA_ARCHITECTURES list, default
                    75-real;80-real;86-real;89-real;90-real;100-real;120
  QPEFT_BUILD_JOBS  parallel compile jobs (default 2)
  CMAKE_CUDA_COMPILER / CUDACXX   nvcc to use (else `nvcc` on PATH, else
                    /usr/local/cuda/bin/nvcc)

The build never probes hardware and never downloads anything; only qpeft._C_layer
reads the importable torch (its headers and libraries). Build trees live
under build/cmake-*; the CMake + compiler output (with the ptxas -v
register/spill report of the CUDA kernels) is passed through and also written to
build/qpeft-native-build.log; each CUDA source's ptxas report is also kept in
build/ptxas-report/<source>.txt.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "75-real;80-real;86-real;89-real;90-real;100-real;120"


class CMakeExtension(Extension):
    """An extension built by CMake: the one target produces qpeft._C (and
    qpeft._C_cuda when CUDA is on) into the package directory."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


def _cmake_executable() -> str:
    try:  # the `cmake` package from build-system.requires
        import cmake  # type: ignore

        exe = Path(cmake.CMAKE_BIN_DIR) / "cmake"
        if exe.exists():
            return str(exe)
    except ImportError:
        pass
    exe = shutil.which("cmake")
    if exe is None:
        raise RuntimeError("qpeft: CMake >= 3.21 is required to build the native modules (pip install cmake)")
    return exe


def _find_nvcc() -> str | None:
    for var in ("CMAKE_CUDA_COMPILER", "CUDACXX"):
        path = os.environ.get(var)
        if path:
            return path
    path = shutil.which("nvcc")
    if path:
        return path
    fallback = "/usr/local/cuda/bin/nvcc"
    return fallback if os.path.exists(fallback) else None


def _nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) of ``nvcc --version`` ("release 13.0"), None if it cannot be run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2])) if m else None


def _dotted(version: tuple[int, int] | None) -> str:
    return f"{version[0]}.{version[1]}" if version else "(unknown version)"


def _torch_cuda_version() -> tuple[str | None, str]:
    """(torch.version.cuda, how it was found): the CUDA toolkit torch was built with ("12.8"),
    None for a CPU-only torch. QPEFT_TORCH_CUDA overrides it (e.g. under pip's build isolation,
    where the torch being built for is not importable: prefer --no-build-isolation)."""
    forced = os.environ.get("QPEFT_TORCH_CUDA", "").strip()
    if forced:
        return (None if forced.lower() in ("none", "cpu") else forced), "torch (QPEFT_TORCH_CUDA)"
    try:
        import torch  # only to read its CUDA version; the build itself needs no torch
    except ImportError:
        return None, "torch is not importable in this build environment"
    return torch.version.cuda, f"torch {torch.__version__}"


_CUDA_CHOICE: list = []  # _cuda_setting's answer, computed (and printed) once


def _cuda_setting() -> tuple[bool, str | None]:
    """(build qpeft._C_cuda?, nvcc). The module links the CUDA runtime statically, so it needs a
    driver as new as its toolkit (docs/gpu.md); it is built with the toolkit of torch's CUDA major
    version, so that any driver torch runs on also runs qpeft's kernels. An nvcc of another major
    (after looking for /usr/local/cuda-<major>*/bin/nvcc) is not used: skipped under
    QPEFT_CUDA=auto with a message, an error under QPEFT_CUDA=1. With a CPU-only torch (or none
    importable) nvcc's own version is used."""
    if _CUDA_CHOICE:
        return _CUDA_CHOICE[0]
    mode = os.environ.get("QPEFT_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"qpeft: QPEFT_CUDA must be auto, 0 or 1, got {mode!r}")
    choice = (False, None)
    if mode != "0":
        nvcc = _find_nvcc()
        if nvcc is None:
            if mode == "1":
                raise RuntimeError(
                    "qpeft: QPEFT_CUDA=1 but nvcc was not found (looked at $CMAKE_CUDA_COMPILER, $CUDACXX, "
                    "PATH and /usr/local/cuda/bin/nvcc); install the CUDA toolkit or set QPEFT_CUDA=0"
                )
        else:
            choice = _match_torch_cuda(nvcc, mode)
    _CUDA_CHOICE.append(choice)
    return choice


def _match_torch_cuda(nvcc: str, mode: str) -> tuple[bool, str | None]:
    torch_cuda, source = _torch_cuda_version()
    found = _nvcc_version(nvcc)
    if torch_cuda is None:
        print(f"qpeft: building qpeft._C_cuda with {nvcc} (CUDA {_dotted(found)}; {source}, no CUDA torch)")
        return True, nvcc
    want = int(torch_cuda.split(".")[0])
    if found is not None and found[0] == want:
        print(
            f"qpeft: building qpeft._C_cuda with {nvcc} (CUDA {found[0]}.{found[1]}, matching {source}'s CUDA {torch_cuda})"
        )
        return True, nvcc
    for alt in sorted(Path("/usr/local").glob(f"cuda-{want}.*/bin/nvcc"), reverse=True):
        alt_version = _nvcc_version(str(alt))
        if alt_version is not None and alt_version[0] == want:
            print(
                f"qpeft: building qpeft._C_cuda with {alt} (CUDA {alt_version[0]}.{alt_version[1]}, matching {source}'s CUDA {torch_cuda}; {nvcc} is another major)"
            )
            return True, str(alt)
    msg = (
        f"qpeft: {nvcc} is CUDA {_dotted(found)} but {source} is built with CUDA {torch_cuda}: a "
        f"qpeft._C_cuda built with it would need a driver for CUDA {found[0] if found else '?'} that torch does not "
        f"(docs/gpu.md). Install the CUDA {want}.x toolkit (or point CUDACXX at its nvcc), or install torch's "
        f"CUDA {found[0] if found else '?'} wheel"
    )
    if mode == "1":
        raise RuntimeError(msg + ".")
    print(
        "=" * 78 + f"\n{msg}. SKIPPING qpeft._C_cuda (QPEFT_CUDA=auto): CUDA tensors will run the Triton "
        "kernels or the reference.\n" + "=" * 78
    )
    return False, None


def _emulation_setting() -> str:
    mode = os.environ.get("QPEFT_CUDA_EMULATION", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"qpeft: QPEFT_CUDA_EMULATION must be auto, 0 or 1, got {mode!r}")
    return mode


# Modules CMake may skip, and the variable that makes them required.
_OPTIONAL_MODULES = {
    "qpeft._C_cuda": "QPEFT_CUDA",
    "qpeft._C_cuda_emu": "QPEFT_CUDA_EMULATION",
    "qpeft._C_layer": "QPEFT_TORCH_LAYER",
}


def _torch_layer_setting() -> str:
    mode = os.environ.get("QPEFT_TORCH_LAYER", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise RuntimeError(f"qpeft: QPEFT_TORCH_LAYER must be auto, 0 or 1, got {mode!r}")
    return mode


def _torch_layer_args() -> list[str]:
    """CMake arguments of qpeft._C_layer, the one module built against the importable torch
    (its version, headers, libraries and C++ ABI; docs/design.md, "Per-call overhead").
    None without an importable torch: CMake then skips the module (or fails under
    QPEFT_TORCH_LAYER=1)."""
    mode = _torch_layer_setting()
    args = [f"-DQPEFT_TORCH_LAYER={mode}"]
    if mode == "0":
        return args
    info = _installed_torch()
    if info is None:
        print("qpeft: no importable torch: qpeft._C_layer is not built (small layers take the Python path)")
        return args + ["-DQPEFT_TORCH_VERSION="]
    version, root, abi = info
    includes = [root / "include", root / "include" / "torch" / "csrc" / "api" / "include"]
    return args + [
        f"-DQPEFT_TORCH_VERSION={version}",
        f"-DQPEFT_TORCH_INCLUDE_DIRS={';'.join(str(p) for p in includes)}",
        f"-DQPEFT_TORCH_LIBRARY_DIR={root / 'lib'}",
        f"-DQPEFT_TORCH_CXX11_ABI={abi}",
    ]


_PROBE = "import json, torch; print(json.dumps([torch.__version__, torch.__file__, int(torch._C._GLIBCXX_USE_CXX11_ABI)]))"


def _installed_torch() -> tuple[str, Path, int] | None:
    """(version, package directory, C++11 ABI flag) of the torch qpeft will run with: this
    interpreter's, or under pip's build isolation (which hides the environment's packages)
    the environment's, found by running the same interpreter without the isolation's
    PYTHONPATH. None when neither imports torch."""
    try:
        import torch

        return torch.__version__, Path(torch.__file__).resolve().parent, int(torch._C._GLIBCXX_USE_CXX11_ABI)
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env, cwd="/"
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    import json

    version, path, abi = json.loads(out.stdout.strip().splitlines()[-1])
    return version, Path(path).resolve().parent, int(abi)


class CMakeBuild(build_ext):
    """One CMake run builds every CMakeExtension; the modules are then copied to
    where setuptools expects them (the build/lib tree, or the source tree for
    editable / --inplace builds)."""

    def build_extensions(self) -> None:
        cmake_exts = [e for e in self.extensions if isinstance(e, CMakeExtension)]
        others = [e for e in self.extensions if not isinstance(e, CMakeExtension)]
        for ext in others:
            self.build_extension(ext)
        if not cmake_exts:
            return
        lib_dir = self._cmake_build()
        for ext in list(cmake_exts):
            stem = ext.name.rsplit(".", 1)[-1]
            built = sorted(p for p in lib_dir.glob(f"{stem}.*") if p.suffix in (".so", ".pyd", ".dylib"))
            if not built:
                var = _OPTIONAL_MODULES.get(ext.name)
                if var is not None and os.environ.get(var, "auto").strip() != "1":
                    print(f"qpeft: {ext.name} was not built (see the CMake messages above)")
                    self.extensions.remove(ext)
                    continue
                raise RuntimeError(f"qpeft: CMake did not produce {ext.name} in {lib_dir}")
            dest = Path(self.get_ext_fullpath(ext.name))
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built[0], dest)
        for name in _OPTIONAL_MODULES:
            if not any(e.name == name for e in self.extensions):
                # A module of an earlier build must not linger next to the new _C.
                stem = name.rsplit(".", 1)[-1]
                for stale in (ROOT / "qpeft").glob(f"{stem}.*.so"):
                    stale.unlink()

    def _cmake_build(self) -> Path:
        import pybind11

        with_cuda, nvcc = _cuda_setting()
        archs = os.environ.get("QPEFT_CUDA_ARCHS", DEFAULT_CUDA_ARCHS)
        jobs = os.environ.get("QPEFT_BUILD_JOBS", "2")
        if not jobs.isdigit() or int(jobs) < 1:
            raise RuntimeError(f"qpeft: QPEFT_BUILD_JOBS must be a positive integer, got {jobs!r}")

        # A persistent tree under build/ (editable installs get a throwaway
        # build_temp, which would recompile every CUDA arch each time), one per
        # configuration and interpreter, so switching QPEFT_CUDA does not reconfigure.
        tag = f"{'cuda' if with_cuda else 'cpu'}-py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        lib_dir = build_dir / "lib"  # fixed, so a new temp build-lib does not force a relink
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = _cmake_executable()
        self._drop_stale_cache(build_dir, cmake)
        for old in lib_dir.glob("_C*"):
            old.unlink()  # so a module CMake skipped this time is not picked up from a previous run

        args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DQPEFT_OUTPUT_DIR={lib_dir}",
            f"-DQPEFT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DQPEFT_CUDA_EMULATION={_emulation_setting()}",
            f"-DQPEFT_PTXAS_REPORT_DIR={ROOT / 'build' / 'ptxas-report'}",
            *_torch_layer_args(),
        ]
        if with_cuda:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DQPEFT_CUDA_ARCHS={archs}"]

        log_path = ROOT / "build" / "qpeft-native-build.log"
        with open(log_path, "w") as log:
            self._run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], log)
            self._run([cmake, "--build", str(build_dir), "--parallel", jobs], log)
        return lib_dir

    @staticmethod
    def _drop_stale_cache(build_dir: Path, cmake: str) -> None:
        """Start the tree over when it was configured by another CMake version.

        pip builds in a fresh isolated environment each time, so the cmake path
        changes from build to build; a re-configure with the same version simply
        regenerates the build files (and keeps the objects: incremental CUDA
        builds), a different version might not read the old cache."""
        cache = build_dir / "CMakeCache.txt"
        if not cache.exists():
            return
        text = cache.read_text(errors="replace")
        cached = tuple(
            (re.search(rf"^CMAKE_CACHE_{part}_VERSION:INTERNAL=(\d+)$", text, re.M) or [None, "?"])[1]
            for part in ("MAJOR", "MINOR", "PATCH")
        )
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
        if m is None or tuple(m.groups()) != cached:
            shutil.rmtree(build_dir)
            build_dir.mkdir(parents=True)

    @staticmethod
    def _run(cmd: list[str], log) -> None:
        """Run a build step, streaming its output to our stdout and the log file."""
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        sys.stdout.flush()
        if proc.wait() != 0:
            raise RuntimeError(f"qpeft: command failed ({proc.returncode}): {' '.join(cmd)}; see {log.name}")


ext_modules = [CMakeExtension("qpeft._C")]
if _cuda_setting()[0]:  # raises here already for QPEFT_CUDA=1 without nvcc
    ext_modules.append(CMakeExtension("qpeft._C_cuda"))
if _emulation_setting() != "0":
    ext_modules.append(CMakeExtension("qpeft._C_cuda_emu"))
if _torch_layer_setting() != "0":
    ext_modules.append(CMakeExtension("qpeft._C_layer"))

setup(
    packages=find_packages(include=["qpeft", "qpeft.*"]) + ["qpeft.triton_kernels"],
    package_dir={"qpeft.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
