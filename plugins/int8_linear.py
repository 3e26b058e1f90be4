"""Int8 Linear with per-token activation scales and per-channel weight scales.

This is the numerics modern LLM int8 uses (LLM.int8's vector-wise scheme,
SmoothQuant's W8A8 with per-token activations): each row of the input gets its
own symmetric int8 scale, computed on the fly, and each output channel of the
weight gets its own.  The product runs as a real int8 GEMM with int32
accumulation (``torch._int_mm``: oneDNN/AMX on x86 CPUs, cuBLASLt on CUDA), and
the result is rescaled by the outer product of the two scale vectors.

Which int8 kernel runs is the layer's ``kernel``: ``per-token`` (the int8 GEMM
above), ``weight-only`` (int8 weights x bf16 activations, one kernel call, the
fast path for one token) or ``auto`` (the fastest of the two by the number of
tokens: see :mod:`ftq_plugins.int8_kernels`).  The choice is saved with the
layer.

Why not torch's eager dynamic quantization: it uses one activation scale per
tensor (and 7-bit on x86/fbgemm), and a handful of outlier channels in LLM
activations then crush every other value.
"""

from __future__ import annotations

import torch
from torch import nn

from .int8_kernels import (
    AUTO_WEIGHT_ONLY_MAX_TOKENS,
    INT8_MAX,
    KERNELS,
    choose_kernel,
    per_token_int8_mm,
    weight_only_int8_mm,
)
from .layers import linear_weight

__all__ = ["INT8_MAX", "quantize_per_channel_symmetric", "quantize_per_token_symmetric", "Int8DynamicLinear"]

def quantize_per_channel_symmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` → ``(int8 [out, in], float32 scale [out])`` with ``w ≈ q * scale``."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp_min(1e-12) / INT8_MAX
    q = torch.round(weight / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_per_token_symmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [tokens, features]`` → ``(int8, float32 scale [tokens, 1])`` with ``x ≈ q * scale``."""
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

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        kernel: str = "per-token",
        weight_only_max_tokens: int = AUTO_WEIGHT_ONLY_MAX_TOKENS,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.set_kernel(kernel, weight_only_max_tokens)
        self._scale_bf16: torch.Tensor | None = None
        self._scale_bf16_key: tuple | None = None
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    def set_kernel(self, kernel: str, weight_only_max_tokens: int = AUTO_WEIGHT_ONLY_MAX_TOKENS) -> None:
        """Choose the int8 kernel: ``auto``, ``per-token`` or ``weight-only``."""
        if kernel not in KERNELS:
            raise ValueError(f"unknown int8 kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        self.kernel = kernel
        self.weight_only_max_tokens = int(weight_only_max_tokens)

    def kernel_meta(self) -> dict:
        """The kernel choice as saved in the artifact (see :meth:`set_kernel`)."""
        return {"kernel": self.kernel, "weight_only_max_tokens": self.weight_only_max_tokens}

    @classmethod
    def from_float(cls, module: nn.Module, *, kernel: str = "per-token") -> "Int8DynamicLinear":
        """Quantize an ``nn.Linear`` or GPT-2 ``Conv1D``."""
        weight = linear_weight(module)
        out_features, in_features = weight.shape
        qmodule = cls(in_features, out_features, bias=module.bias is not None, kernel=kernel)
        q, scale = quantize_per_channel_symmetric(weight)
        qmodule.weight_int8.copy_(q)
        qmodule.weight_scale.copy_(scale)
        if module.bias is not None:
            qmodule.bias.copy_(module.bias.detach().float())
        return qmodule.to(weight.device)

    @classmethod
    def from_tensors(cls, tensors, meta: dict) -> "Int8DynamicLinear":
        """Rebuild a saved layer from its tensors and codec meta.

        The loaded tensors are taken as they are (after a shape/dtype check),
        not copied: a weight tied to an int8 embedding stays one tensor in memory.
        Layers saved before kernel choices existed ran the per-token kernel.
        """
        from ftq_core.errors import ArtifactError

        module = cls(meta["in_features"], meta["out_features"], bias="bias" in tensors)
        module.set_kernel(meta.get("kernel", "per-token"), meta.get("weight_only_max_tokens", AUTO_WEIGHT_ONLY_MAX_TOKENS))
        for name in ("weight_int8", "weight_scale", "bias"):
            if name not in tensors:
                continue
            tensor, expected = tensors[name], getattr(module, name)
            if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
                raise ArtifactError(
                    f"saved int8 layer tensor {name!r} is {tuple(tensor.shape)} {tensor.dtype}, expected "
                    f"{tuple(expected.shape)} {expected.dtype}; the artifact is damaged, write it again"
                )
            setattr(module, name, tensor)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def _weight_only_scale(self) -> torch.Tensor:
        """``weight_scale`` in bf16 for the weight-only kernel, refreshed if the buffer changed."""
        scale = self.weight_scale
        key = (scale.data_ptr(), scale._version)
        if self._scale_bf16 is None or self._scale_bf16_key != key:
            self._scale_bf16 = scale.to(torch.bfloat16)
            self._scale_bf16_key = key
        return self._scale_bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        kernel = choose_kernel(self.kernel, x2.shape[0], self.in_features, self.weight_only_max_tokens)
        if kernel == "weight-only":
            y = weight_only_int8_mm(x2, self.weight_int8, self._weight_only_scale()).to(x.dtype)
        else:
            y = per_token_int8_mm(x2, self.weight_int8, self.weight_scale).to(x.dtype)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=int8 per-channel, kernel={self.kernel}"
        )
