"""One pinned llama.cpp: its converter, gguf-py and ctypes bindings, and a CPU build of the tools we run.

The pin is the llama.cpp vendored in the llama-cpp-python 0.3.36 sdist from PyPI (there is no binary
wheel for it): `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`. Its
`vendor/llama.cpp` gives `convert_hf_to_gguf.py` + `conversion/` + `gguf-py` (newer than PyPI's `gguf`,
which the converter cannot use) and the C++ sources; its `llama_cpp/` package gives ctypes bindings
that match those sources exactly (used by the verification, see `verify.py`).

Everything lives in one folder keyed by the pin, built once and reused:
`$UNSLOTH_MED_LLAMA_CPP_DIR`, default `<cache_dir()>/llama.cpp-0.3.36-portable/` with `src/` (llama.cpp),
`python/llama_cpp/` (bindings), `build/bin/` (shared libraries, `llama-quantize`, `llama-mtmd-cli`).
`$UNSLOTH_MED_LLAMA_CPP_SDIST` may point at an already downloaded sdist (offline machines).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from ..errors import ExportError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"  # vendor/llama.cpp in that sdist
# Built only when needed, each once: the shared libraries for the verification (mtmd pulls in llama and ggml),
# llama-quantize for q8_0 / q4_k_m, llama-mtmd-cli for the model card's command.
LIBRARIES = ("mtmd",)
BUILD_TARGETS = ("mtmd", "llama-quantize", "llama-mtmd-cli")
BUILD_JOBS = 2
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
    # Not -march=native: on a Xeon that advertises AMX inside a virtual machine that does not grant the AMX tile
    # state, the native build crashed in ggml_backend_amx_mul_mat (ldtilecfg) on every Q8_0 / Q4_K_M model.
    # The portable x86-64 build (AVX2, FMA, F16C) runs everywhere we ship to.
    "-DGGML_NATIVE=OFF",
)
#: The build folder's name: a change of pin or of build flags gets a fresh build, never a mixed one.
BUILD_FLAVOUR = "portable"
_SDIST_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/"


def root() -> Path:
    override = os.environ.get("UNSLOTH_MED_LLAMA_CPP_DIR")
    if override:
        return Path(override)
    from ..data.sources import cache_dir

    return cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-{BUILD_FLAVOUR}"


def source_dir() -> Path:
    return root() / "src"


def bindings_dir() -> Path:
    """The folder to put on sys.path for `llama_cpp.llama_cpp` / `llama_cpp.mtmd_cpp`."""
    return root() / "python"


def bin_dir() -> Path:
    return root() / "build" / "bin"


def _stamp() -> Path:
    return root() / "build" / "unsloth_med_build.txt"


def configure_command() -> list[str]:
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    return ["cmake", "-S", str(source_dir()), "-B", str(root() / "build"), *generator, *CMAKE_OPTIONS]


def build_command(targets=BUILD_TARGETS) -> list[str]:
    return ["cmake", "--build", str(root() / "build"), "--target", *targets, "-j", str(BUILD_JOBS)]


def missing_toolchain() -> str | None:
    """What is missing to build llama.cpp here (None: cmake and a C/C++ compiler are on PATH)."""
    missing = [name for name, options in (("cmake", ("cmake",)), ("a C compiler", ("cc", "gcc", "clang")),
                                          ("a C++ compiler", ("c++", "g++", "clang++")))
               if not any(shutil.which(o) for o in options)]
    return ", ".join(missing) or None


@contextlib.contextmanager
def _locked():
    """One download/build at a time per pin (parallel tests or exports wait for the first)."""
    root().mkdir(parents=True, exist_ok=True)
    with open(root() / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _have_sources() -> bool:
    return (source_dir() / "convert_hf_to_gguf.py").is_file() and \
        (bindings_dir() / "llama_cpp" / "mtmd_cpp.py").is_file()


def _download_sdist(into: Path) -> Path:
    local = os.environ.get("UNSLOTH_MED_LLAMA_CPP_SDIST")
    if local:
        if not Path(local).is_file():
            raise ExportError(f"UNSLOTH_MED_LLAMA_CPP_SDIST={local} is not a file. Point it at "
                              f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz or unset it.")
        return Path(local)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(into)]
    log.warning("Downloading the llama.cpp sources (llama-cpp-python %s sdist, 77 MB): %s",
                LLAMA_CPP_PYTHON_VERSION, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        raise ExportError(
            f"Could not download the llama.cpp sources from PyPI (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-600:]}\nRun `{' '.join(command)}` where PyPI is reachable and "
            "set UNSLOTH_MED_LLAMA_CPP_SDIST to the .tar.gz it saves.")
    return found[0]


def _extract(sdist: Path) -> None:
    """vendor/llama.cpp -> src/, llama_cpp/ -> python/llama_cpp/ (into a temporary folder, then moved)."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root()))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith((_SDIST_PREFIX + "vendor/llama.cpp/",
                                                                         _SDIST_PREFIX + "llama_cpp/"))]
            if not members:
                raise ExportError(f"{sdist} holds no vendor/llama.cpp: it is not the llama-cpp-python "
                                  f"{LLAMA_CPP_PYTHON_VERSION} sdist.")
            tar.extractall(tmp, members=members, filter="data")
        base = tmp / _SDIST_PREFIX.rstrip("/")
        (tmp / "python").mkdir()
        os.replace(base / "llama_cpp", tmp / "python" / "llama_cpp")
        for name, src in (("src", base / "vendor" / "llama.cpp"), ("python", tmp / "python")):
            shutil.rmtree(root() / name, ignore_errors=True)
            os.replace(src, root() / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_sources() -> Path:
    """The llama.cpp source folder (converter + gguf-py), downloaded and unpacked once."""
    if _have_sources():
        return source_dir()
    with _locked():
        if not _have_sources():
            with tempfile.TemporaryDirectory(prefix="llama-cpp-sdist-") as tmp:
                _extract(_download_sdist(Path(tmp)))
    return source_dir()


def _artifact(target: str) -> Path:
    if target in LIBRARIES:
        return bin_dir() / f"lib{target}{'.dylib' if sys.platform == 'darwin' else '.so'}"
    return bin_dir() / target


def _built(targets) -> bool:
    return _stamp().is_file() and set(targets) <= set(_stamp().read_text().split()) and \
        all(_artifact(t).is_file() for t in targets)


def _toolchain_message(missing: str, targets) -> str:
    return (f"Building llama.cpp for the GGUF export needs {missing}, not found on PATH. Install them (Debian/Ubuntu: "
            "`sudo apt-get install cmake build-essential`; macOS: `xcode-select --install && brew install cmake`), "
            "then export again; or build it yourself once:\n  " + " ".join(configure_command()) + "\n  "
            + " ".join(build_command(targets)) + f"\nand write the target names into {_stamp()}.")


def ensure_built(targets=LIBRARIES) -> Path:
    """The bin folder of the pinned llama.cpp build with `targets` (each built once, -j2, minutes)."""
    ensure_sources()
    if _built(targets):
        return bin_dir()
    missing = missing_toolchain()
    if missing:
        raise ExportError(_toolchain_message(missing, targets))
    with _locked():
        if _built(targets):
            return bin_dir()
        started = time.time()
        log.warning("Building llama.cpp %s (%s) once into %s; this takes a few minutes.", LLAMA_CPP_COMMIT[:8],
                    ", ".join(targets), root() / "build")
        for command in (configure_command(), build_command(targets)):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise ExportError(f"Building llama.cpp failed (exit {done.returncode}) at `{' '.join(command)}`:\n"
                                  f"{(done.stdout + done.stderr).strip()[-1500:]}")
        done_before = set(_stamp().read_text().split()) if _stamp().is_file() else set()
        _stamp().write_text("\n".join(sorted(done_before | set(targets))) + "\n")
        log.warning("llama.cpp built in %.0f s", time.time() - started)
    return bin_dir()
