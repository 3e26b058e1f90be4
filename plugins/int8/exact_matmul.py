"""The exact int8 x int8 -> int32 product behind every ``int-mm`` path, by the fastest implementation this CPU has.

``int8_matmul(codes [M, K], weight [N, K])`` is ``torch._int_mm(codes, weight.T)``:
integer sums, hence the same bits whichever implementation computes them.
Three can:

* ``torch`` -- ``torch._int_mm`` (oneDNN): fast with AVX512-VNNI or AMX, but
  on AVX2-only CPUs (AMD Zen 1-3, Intel client cores before AVX512) torch
  2.13 runs oneDNN's reference code for more than one row: 52x slower than
  the float product of the same shape on a Zen 3 EPYC;
* ``ftq`` -- ftq's own GEMM in the natively built library
  (``plugins/fused/int8_gemm.h``: AVX2 ``maddubs`` with the sign trick, or
  plain loops), where that library can be built;
* ``float`` -- the codes as float32 through the float GEMM (MKL/OpenBLAS), in
  slices of :data:`FLOAT_EXACT_MAX_K` along ``K``: below ``2**24`` every
  partial sum of int8 products is an integer float32 holds exactly, so this
  too is exact, at about the float product's speed on any CPU.

Which one runs is measured once per process and row regime (one row; many
rows) on a probe of a typical layer shape (:func:`backend`); ``FTQ_INT8_MATMUL``
forces one.  Results never depend on the choice, only time does.
"""

from __future__ import annotations

import functools
import os
import time

import torch

__all__ = ["BACKENDS", "BACKEND_ENV", "FLOAT_EXACT_MAX_K", "int8_matmul", "backend", "run_backend"]

#: Implementations :func:`int8_matmul` picks from.
BACKENDS = ("torch", "ftq", "float")

#: ``FTQ_INT8_MATMUL=torch|ftq|float`` forces an implementation (tests, benchmarks).
BACKEND_ENV = "FTQ_INT8_MATMUL"

#: The widest slice of ``K`` whose int8 dot products float32 sums exactly: ``K * 127 * 127 < 2**24``.
FLOAT_EXACT_MAX_K = (2**24 - 1) // (127 * 127)

#: Probe shape (``K``, ``N``) and rows of the many-rows regime.
_PROBE_K, _PROBE_N, _PROBE_ROWS = 1024, 256, 32


def _native():
    """The built native library if it can be had without a failure (``None`` otherwise).

    The first call on a machine builds it (about 20 s on 2 cores, said on stderr), as decoding would.
    """
    from ftq_plugins.fused import build

    if build.unavailable_reason() is not None:
        return None
    library = build.load_library()
    return library if library is not None and hasattr(library, "int8_gemm") else None


def _float_exact(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    rows, k = codes.shape
    if k <= FLOAT_EXACT_MAX_K:
        return (codes.float() @ weight.float().t()).to(torch.int32)
    acc = torch.zeros(rows, weight.shape[0], dtype=torch.int32, device=codes.device)
    for k0 in range(0, k, FLOAT_EXACT_MAX_K):  # each slice exact in float32, their sum exact in int32
        part = codes[:, k0:k0 + FLOAT_EXACT_MAX_K].float() @ weight[:, k0:k0 + FLOAT_EXACT_MAX_K].float().t()
        acc += part.to(torch.int32)
    return acc


def run_backend(name: str, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``codes [M, K] int8 @ weight [N, K]^T int8`` as int32 ``[M, N]`` through one implementation."""
    if name == "ftq":
        library = _native()
        if library is not None:
            return library.int8_gemm(codes, weight)
        name = "float"
    if name == "float":
        return _float_exact(codes, weight)
    return torch._int_mm(codes, weight.t())


def _probe_seconds(name: str, rows: int, turns: int = 3) -> float:
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (rows, _PROBE_K), dtype=torch.int8, generator=generator)
    weight = torch.randint(-127, 128, (_PROBE_N, _PROBE_K), dtype=torch.int8, generator=generator)
    run_backend(name, codes, weight)  # warm-up: first-call allocations
    best = float("inf")
    for _ in range(turns):
        start = time.perf_counter()
        run_backend(name, codes, weight)
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def backend(many_rows: bool) -> str:
    """The implementation this process uses for one row (``False``) or more (``True``): forced, else measured.

    The probe takes milliseconds (torch's reference path included); ``ftq``
    is a candidate only where the native library is already built or can be
    built here (the first build takes about 20 s on 2 cores).
    """
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            from ftq_core.errors import UsageError

            raise UsageError(f"{BACKEND_ENV}={forced!r} is not one of {', '.join(BACKENDS)}; unset it to measure")
        return forced
    candidates = ["torch", "float"] + (["ftq"] if _native() is not None else [])
    rows = _PROBE_ROWS if many_rows else 1
    with torch.inference_mode():
        seconds = {name: _probe_seconds(name, rows) for name in candidates}
    return min(seconds, key=seconds.get)


def int8_matmul(codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm(codes, weight.T)``: int8 ``[M, K]`` by int8 ``[N, K]`` to exact int32 ``[M, N]``.

    On the CPU by the fastest implementation this process measured
    (:func:`backend`); elsewhere (CUDA) by ``torch._int_mm``.
    """
    if codes.device.type != "cpu":
        return torch._int_mm(codes, weight.t())
    return run_backend(backend(codes.shape[0] > 1), codes, weight)
