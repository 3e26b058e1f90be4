"""Compile the fused int8 decoder for this CPU once, and keep it in ftq's local cache.

The library is built with ``torch.utils.cpp_extension`` (``-O3
-march=native``: the int8 GEMM uses AVX512-VNNI where the CPU has it, AVX2
where that is the widest; ``FTQ_FUSED_ISA`` builds for a narrower CPU) into
``$FTQ_CACHE_DIR/fused/<key>/``, where the key hashes the source, the torch
version, the compiler flags and the CPU's model and flags; a later process
imports the built file directly (no compiler run).  Artifacts never hold
compiled code.

Whether the library can be had is decided before anything decodes
(:func:`unavailable_reason`): ``FTQ_COMPILE=0`` turns it off, and a machine
without a C++ compiler or ninja is told so in one line.  A failed build is
remembered for the process, and the caller falls back to the eager loop.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

__all__ = ["OPT_OUT_ENV", "ISA_ENV", "ISA_FLAGS", "SOURCE", "HEADERS", "requested_isa", "compiler_flags", "cache_key",
           "library_dir", "unavailable_reason", "load_library"]

#: ``FTQ_COMPILE=0`` keeps ftq off the fused path (``--no-compile`` does it per command).
OPT_OUT_ENV = "FTQ_COMPILE"

#: The C++ source, installed beside this module, and the headers it includes (copied beside it to build).
SOURCE = Path(__file__).with_name("fused_llama.cpp")
HEADERS = (Path(__file__).with_name("int8_gemm.h"), Path(__file__).with_name("int8_gemm_kernels.h"))

#: ``FTQ_FUSED_ISA`` picks the instruction set the library is built for: ``native`` (the default: this
#: CPU's), ``avx512`` (AVX512-VNNI, no AMX), ``avx2`` (AVX2 and FMA: what AMD Zen 1-3 and Intel client
#: cores before AVX512 have) or ``generic`` (baseline x86-64, the plain C++ kernels).  A narrower build
#: on a wider CPU is how the kernels of older CPUs are tested and measured (ATen's ATEN_CPU_CAPABILITY
#: does the same for its own kernels).
ISA_ENV = "FTQ_FUSED_ISA"
ISA_FLAGS = {
    "native": ("-march=native",),
    "avx512": ("-march=icelake-server", "-mno-amx-tile", "-mno-amx-int8"),
    "avx2": ("-march=haswell",),
    "generic": ("-march=x86-64",),
}

# No fused multiply-adds: rope and the rescale must round as ATen's separate ops do.
_CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp")
_NAME = "ftq_fused_llama"

_lock = threading.Lock()
_loaded = None
_failure: str | None = None


def requested_isa() -> str:
    """The instruction set ``FTQ_FUSED_ISA`` asks for (``native`` when unset); an unknown name is refused."""
    from ftq_core.errors import UsageError

    isa = os.environ.get(ISA_ENV, "native").strip().lower() or "native"
    if isa not in ISA_FLAGS:
        raise UsageError(f"{ISA_ENV}={isa!r} is not one of {', '.join(ISA_FLAGS)}; unset it to build for this CPU")
    return isa


def compiler_flags() -> tuple[str, ...]:
    """The compiler flags of this process's build (``FTQ_FUSED_ISA`` included)."""
    isa = requested_isa()
    march = ISA_FLAGS[isa]
    if isa == "native" and platform.machine().lower() in ("aarch64", "arm64"):
        march = ("-mcpu=native",)  # GCC's spelling on ARM
    return (*_CFLAGS, *march)


@functools.lru_cache(maxsize=None)
def cache_key() -> str:
    """What a built library depends on: sources, torch, flags, CPU (16 hex digits; computed once a process)."""
    import torch

    from ftq_core.cpu_features import cpu_flags, cpu_model_name

    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), *(h.read_bytes() for h in HEADERS), torch.__version__.encode(),
                 " ".join(compiler_flags()).encode(), cpu_model_name().encode(), cpu_flags().encode(), sys.version.encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def library_dir() -> Path:
    """Where this machine's build lives: ``$FTQ_CACHE_DIR/fused/<key>``."""
    from ftq_core.models import cache_root

    return cache_root() / "fused" / cache_key()


def _compiler() -> str:
    return os.environ.get("CXX") or "c++"


def unavailable_reason() -> str | None:
    """Why the fused library cannot be had here (``None`` when it can); checks only, never builds."""
    if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{OPT_OUT_ENV}={os.environ[OPT_OUT_ENV]} turns the fused int8 decoder off"
    if _failure is not None:
        return _failure
    if _loaded is not None:
        return None
    if platform.system() != "Linux":
        return f"the fused int8 decoder is built for Linux only (this is {platform.system()})"
    if (library_dir() / f"{_NAME}.so").is_file():
        return None  # built before: no compiler needed
    if shutil.which(_compiler()) is None:
        return (f"no C++ compiler ({_compiler()!r}) to build the fused int8 decoder; install g++ "
                f"(or set CXX), or run with --no-compile")
    if _ninja_dir() is None:
        return "ninja is missing, which building the fused int8 decoder needs; pip install ninja, or run with --no-compile"
    return None


def _ninja_dir() -> str | None:
    """The folder of a ``ninja`` executable: on PATH, or the ``ninja`` package's (a venv not activated)."""
    found = shutil.which("ninja")
    if found:
        return os.path.dirname(found)
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR if os.path.isfile(os.path.join(ninja.BIN_DIR, "ninja")) else None


def _compile(directory: Path, source: Path):
    """Build and import the library (torch's extension builder, with ninja on PATH for it)."""
    from torch.utils.cpp_extension import load

    ninja_dir = _ninja_dir()
    path = os.environ.get("PATH", "")
    if ninja_dir and ninja_dir not in path.split(os.pathsep):
        os.environ["PATH"] = ninja_dir + os.pathsep + path
    return load(name=_NAME, sources=[str(source)], extra_cflags=list(compiler_flags()), extra_ldflags=["-fopenmp"],
                build_directory=str(directory), verbose=False)


def _import(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(_NAME, str(path))
    spec = importlib.util.spec_from_file_location(_NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def load_library(*, verbose: bool = True):
    """The compiled module (built on first use, ~20 s on 2 cores), or ``None`` with the reason set.

    Callers check :func:`unavailable_reason` first; this returns ``None``
    only when the build itself failed (the reason is then remembered).
    """
    global _loaded, _failure
    with _lock:
        if _loaded is not None or _failure is not None or unavailable_reason() is not None:
            return _loaded
        import torch  # noqa: F401  (the library links against torch's)

        directory = library_dir()
        built = directory / f"{_NAME}.so"
        try:
            if built.is_file():
                _loaded = _import(built)
                return _loaded
            directory.mkdir(parents=True, exist_ok=True)
            if verbose:
                print(f"ftq: compiling the fused int8 decoder for this CPU (once; kept in {directory})",
                      file=sys.stderr, flush=True)
            start = time.perf_counter()
            source = directory / SOURCE.name
            for header in HEADERS:
                shutil.copyfile(header, directory / header.name)
            shutil.copyfile(SOURCE, source)
            _loaded = _compile(directory, source)
            if verbose:
                print(f"ftq: fused int8 decoder built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        except Exception as exc:  # a compiler or linker failure: the eager loop runs instead
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _failure = f"the fused int8 decoder failed to build ({first[:200]}); run with --no-compile to skip it"
            return None
        return _loaded


def _forget() -> None:
    """Drop the process's memory of a build or failure (tests)."""
    global _loaded, _failure
    with _lock:
        _loaded, _failure = None, None
