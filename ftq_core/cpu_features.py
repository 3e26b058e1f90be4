"""What this CPU computes natively, as torch reports it: the one place kernel and precision choices ask."""

from __future__ import annotations

__all__ = ["cpu_has_amx", "cpu_has_native_bf16", "cpu_model_name", "cpu_flags", "narrowed_to_avx2"]

#: ATen's own switch for the kernels it runs (``ATEN_CPU_CAPABILITY``); these values leave out AVX512.
_BELOW_AVX512 = ("default", "avx2", "zvector", "vsx")


def narrowed_to_avx2() -> bool:
    """Whether this process was told to compute as a CPU without AVX512 does (``ATEN_CPU_CAPABILITY=avx2``).

    That is how an AVX2-only machine is stood in for on a wider one (with
    ``ONEDNN_MAX_CPU_ISA=AVX2`` for oneDNN and ``FTQ_FUSED_ISA=avx2`` for ftq's
    native build): ftq then also takes the CPU for one without AMX and native
    bf16, so precision and kernel choices follow the machine it stands for.
    """
    import os

    return os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() in _BELOW_AVX512


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    import platform

    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The instruction-set flags the kernel reports (``/proc/cpuinfo``'s ``flags``; empty where there is none)."""
    return _cpuinfo_field("flags") or ""


def cpu_has_amx() -> bool:
    """AMX tiles (Intel Sapphire Rapids and later): oneDNN's int8 and bf16 GEMMs are fast there."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None and not narrowed_to_avx2() else False


def cpu_has_native_bf16() -> bool:
    """bf16 arithmetic in hardware: AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and Sapphire Rapids
    and later Xeons) or AMX.

    There bf16 matmuls run about twice as fast as float32; elsewhere torch
    emulates bf16 and it is slower than float32.
    """
    import torch

    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if narrowed_to_avx2():
        return False
    return cpu_has_amx() or (bool(probe()) if probe is not None else False)
