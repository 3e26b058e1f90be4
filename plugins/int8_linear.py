"""Int8 Linear with per-token activation scales and per-channel weight scales.

This is the numerics modern LLM int8 uses (LLM.int8's vector-wise scheme,
SmoothQuant's W8A8 with per-token activations): each row of the input gets its
own symmetric int8 scale, computed on the fly, and each output channel of the
weight gets its own.  The product runs as a real int8 GEMM with int32
accumulation (``torch._int_mm``: oneDNN/AMX on x86 CPUs, cuBLASLt on CUDA), and
the result is rescaled by the outer product of the two scale vectors.

Why not torch's eager dynamic quantization: it uses one activation scale per
tensor (and 7-bit on x86/fbgemm), and a handful of outlier channels in LLM
activations then crush every other value.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import linear_weight

__all__ = ["INT8_MAX", "quantize_per_channel_symmetric", "quantize_per_token_symmetric", "Int8DynamicLinear"]

#: Symmetric int8 uses [-127, 127] so that negation never overflows.
INT8_MAX = 127


def _check_float_tensor(name: str, value, *, min_dims: int, max_dims: int | None, shape_doc: str) -> None:
    """Cheap checks on dtype and shape (metadata only: no pass over the data)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {value.dtype}")
    if value.dim() < min_dims or (max_dims is not None and value.dim() > max_dims):
        raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(value.shape)}")
    if value.shape[-1] == 0:
        raise ValueError(f"{name} has no features to quantize (last dimension 0, shape {tuple(value.shape)})")


def quantize_per_channel_symmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` → ``(int8 [out, in], float32 scale [out])`` with ``w ≈ q * scale``.

    Each row's error is at most half its step: ``|w - q * scale| <= scale / 2``.
    Computed in float32; a weight with inf/NaN (or float64 values beyond the
    float32 range) is refused, since its scale would be meaningless.
    """
    _check_float_tensor("weight", weight, min_dims=2, max_dims=2, shape_doc="2-D [out_features, in_features]")
    weight = weight.detach().float()
    if not bool(torch.isfinite(weight).all()):  # once per layer at convert time, so affordable
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"weight holds {bad} non-finite value(s) (inf/NaN, or beyond the float32 range); it cannot be "
            f"quantized. Check the model (a diverged fine-tune?) before quantizing."
        )
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
    q = torch.round(weight / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_token_symmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., features]`` → ``(int8, float32 scale [..., 1])`` with ``x ≈ q * scale``.

    One scale per row (token); each value's error is at most half its row's
    step.  This runs on every forward pass, so only dtype and shape are checked:
    a row holding inf/NaN gives a meaningless row, as it would in float.
    """
    _check_float_tensor("x", x, min_dims=1, max_dims=None, shape_doc="at least 1-D [..., features]")
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / INT8_MAX
    q = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8DynamicLinear(nn.Module):
    """``y = (q(x) @ q(W).T) * s_x * s_w + b`` with an int8 GEMM.

    Buffers: ``weight_int8 [out, in]`` int8, ``weight_scale [out]`` float32,
    ``bias [out]`` float32 or absent.  Inputs of any float dtype; the output has
    the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_float(cls, module: nn.Module) -> "Int8DynamicLinear":
        """Quantize an ``nn.Linear`` or GPT-2 ``Conv1D``."""
        weight = linear_weight(module)
        out_features, in_features = weight.shape
        qmodule = cls(in_features, out_features, bias=module.bias is not None)
        q, scale = quantize_per_channel_symmetric(weight)
        qmodule.weight_int8.copy_(q)
        qmodule.weight_scale.copy_(scale)
        if module.bias is not None:
            qmodule.bias.copy_(module.bias.detach().float())
        return qmodule.to(weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        q, x_scale = quantize_per_token_symmetric(x2)
        # int8 x int8 -> int32; the weight is passed transposed (a view, no copy):
        # oneDNN takes the column-major B directly.
        acc = torch._int_mm(q, self.weight_int8.t())
        y = acc.float().mul_(x_scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, act=int8 per-token, weight=int8 per-channel"
