"""The int8 matrix-multiply paths ftq's int8 layers run on, and how ``auto`` picks one.

Two real int8 kernels torch ships for CPUs, each fastest in its own regime
(measured on a Sapphire/Emerald Rapids-class CPU with AMX, torch 2.13, see
``benchmarks/``):

* ``per-token`` -- activations quantized per token to int8 on the fly, then an
  int8 x int8 -> int32 GEMM (``torch._int_mm``: oneDNN, AMX/VNNI).  The GEMM is
  fast for many tokens (prefill), but quantizing the activations costs a few
  element-wise passes, which dominate when there is one token (decode).
* ``weight-only`` -- int8 weights times bf16 activations
  (``torch.ops.aten._weight_int8pack_mm``), dequantizing inside the kernel.
  Nothing is quantized at run time, so one token costs one kernel call; with
  many tokens it is far slower than ``per-token`` (it is a GEMV-style kernel).
  Numerically it is *more* accurate than per-token (only the weights are
  rounded to int8; activations keep bf16's 8-bit mantissa).

``auto`` uses ``weight-only`` up to :data:`AUTO_WEIGHT_ONLY_MAX_TOKENS` rows and
``per-token`` above: decode runs one kernel per layer and prefill runs the int8
GEMM.  Both read the same int8 weight and per-channel scales, so nothing is
stored twice.
"""

from __future__ import annotations

import torch

__all__ = [
    "INT8_MAX",
    "KERNELS",
    "AUTO_WEIGHT_ONLY_MAX_TOKENS",
    "weight_only_supported",
    "choose_kernel",
    "quantize_rows_symmetric",
    "per_token_int8_mm",
    "weight_only_int8_mm",
]

#: Symmetric int8 uses [-127, 127] so that negation never overflows.
INT8_MAX = 127

#: Kernel choices an int8 layer accepts.
KERNELS = ("auto", "per-token", "weight-only")

#: ``auto``'s recorded crossover: at or below this many rows ``weight-only`` wins
#: (measured: 576->1536 at M=1 about 2x faster than the per-token path including
#: its quantize step; at M=16 ``per-token`` is about 3-4x faster).
AUTO_WEIGHT_ONLY_MAX_TOKENS = 8


def weight_only_supported(in_features: int) -> bool:
    """Whether ``_weight_int8pack_mm`` handles this input width.

    torch 2.13's CPU kernel crashes the process (not an exception) when the
    reduction width is not a multiple of 8, so such layers never take that path.
    """
    return in_features % 8 == 0


def choose_kernel(kernel: str, tokens: int, in_features: int, weight_only_max_tokens: int) -> str:
    """The concrete kernel (``per-token`` or ``weight-only``) for ``tokens`` rows."""
    if kernel == "auto":
        kernel = "weight-only" if tokens <= weight_only_max_tokens else "per-token"
    if kernel == "weight-only" and not weight_only_supported(in_features):
        return "per-token"
    return kernel


def quantize_rows_symmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, features]`` float → ``(int8, float32 scale [rows, 1])`` with ``x ≈ q * scale``.

    No clamp: with ``scale = amax / 127`` every ``|x / scale| <= 127`` up to
    float rounding, which ``round`` keeps at 127.  Fewer passes over ``x`` is
    what makes small-batch int8 pay off.
    """
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min_(1e-12).div_(INT8_MAX)
    q = torch.div(x, scale).round_().to(torch.int8)
    return q, scale


def per_token_int8_mm(x2: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K]`` float × ``weight_int8 [N, K]`` → float32 ``[M, N]`` via an int8 GEMM."""
    q, x_scale = quantize_rows_symmetric(x2)
    # The weight goes in transposed (a view): oneDNN takes the column-major B directly.
    acc = torch._int_mm(q, weight_int8.t())
    # int32 * float32 promotes inside one pass; no separate acc.float() copy.
    return torch.mul(acc, x_scale).mul_(weight_scale)


def weight_only_int8_mm(x2: torch.Tensor, weight_int8: torch.Tensor, scale_bf16: torch.Tensor) -> torch.Tensor:
    """``x2 [M, K]`` float × ``weight_int8 [N, K]`` → bf16 ``[M, N]``, dequantizing in the kernel."""
    return torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), weight_int8, scale_bf16)
