"""The CPU multi-tensor step (projected_step.cpp): built on first use, cached on disk, called
through ctypes.

Why not torch.utils.cpp_extension: including its `torch/extension.h` alone took 17 s to compile on
this project's 2-core machine, against 4 s for the whole kernel, and ties the build to torch's C++
ABI; the kernel needs neither (it gets raw pointers and shapes), so it is plain C++ with OpenMP.
It links the `libgomp.so.1` that torch has already loaded, so it shares torch's OpenMP threads.

The library is cached under `$PROJBENCH_KERNEL_CACHE` (default `~/.cache/projbench/kernels`),
named by a hash of the source, the compiler and its flags and the CPU's instruction set
(`-march=native`: a cache shared between machines with different CPUs keeps one build each).
A process builds at most once; builds by concurrent processes (DDP ranks) each write their own
file and rename it into place. Without a working compiler (`$CXX`, else `c++`, `g++`, `clang++`)
`load()` raises KernelUnavailable with the reason.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("projected_step.cpp")
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
COMPILERS = ("c++", "g++", "clang++")


# The kernel's dtypes (projected_step.cpp: enum DType); the state is float32 for the half ones.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


class KernelUnavailable(RuntimeError):
    """The CPU kernel cannot be built or loaded here (the message says why)."""


class Hyper(ctypes.Structure):
    """A group's hyperparameters (projected_step.cpp: struct Hyper)."""

    _fields_ = [(name, ctypes.c_double) for name in ("lr", "momentum", "dampening", "weight_decay", "wd_ratio",
                                                     "decay_divisor", "delta", "eps", "beta1", "beta2")] + \
               [(name, ctypes.c_int32) for name in ("adam", "nesterov", "project_buffer", "threads")]


class Param(ctypes.Structure):
    """One parameter as `rows x cols` elements in memory order (projected_step.cpp: struct Param)."""

    _fields_ = [("w", ctypes.c_void_p), ("g", ctypes.c_void_p), ("s0", ctypes.c_void_p), ("s1", ctypes.c_void_p),
                ("rows", ctypes.c_int64), ("cols", ctypes.c_int64), ("step_size", ctypes.c_double),
                ("k", ctypes.c_double), ("dtype", ctypes.c_int32), ("project", ctypes.c_int32)]


def params_array(params: list) -> ctypes.Array:
    """The kernel's Param array for `params` (shapes and dtypes; pointers and factors are set per
    step): a multi-dimensional weight as size(0) rows, anything else as one row."""
    structs = (Param * len(params))()
    for s, p in zip(structs, params):
        s.rows = p.size(0) if p.dim() > 1 else 1
        s.cols = p.numel() // s.rows if s.rows else 0
        s.dtype = DTYPE_CODES[p.dtype]
        s.project = p.dim() > 1
    return structs


def cache_dir() -> Path:
    if os.environ.get("PROJBENCH_KERNEL_CACHE"):
        return Path(os.environ["PROJBENCH_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "projbench" / "kernels"


def compiler() -> str | None:
    """The C++ compiler to build with: `$CXX`, else the first of COMPILERS on the PATH."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return next((path for path in map(shutil.which, COMPILERS) if path), None)


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU's feature flags (Linux), else its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def library_path(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, *FLAGS, _cpu_id()]).encode()).hexdigest()
    return cache_dir() / f"projected_step_{key[:16]}.so"


def build(cxx: str, path: Path) -> None:
    """Compile SOURCE into `path` (atomically: a concurrent build never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".so.tmp", dir=path.parent)
    os.close(fd)
    try:
        result = subprocess.run([cxx, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if result.returncode:
            raise KernelUnavailable(f"building {SOURCE.name} with {cxx} failed:\n{result.stderr.strip()}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> ctypes.CDLL | KernelUnavailable:
    cxx = compiler()
    if cxx is None:
        return KernelUnavailable(f"no C++ compiler found ($CXX, {', '.join(COMPILERS)})")
    try:
        path = library_path(cxx)
        if not path.exists():
            build(cxx, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, KernelUnavailable) as exc:
        return exc if isinstance(exc, KernelUnavailable) else KernelUnavailable(str(exc))
    lib.projected_step.argtypes = [ctypes.POINTER(Hyper), ctypes.POINTER(Param), ctypes.c_int64, ctypes.c_void_p]
    lib.projected_step.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL:
    """The kernel library (built on the first call of a process if it is not cached yet)."""
    lib = _load()
    if isinstance(lib, KernelUnavailable):
        raise lib
    return lib


def available() -> bool:
    try:
        load()
    except KernelUnavailable:
        return False
    return True
