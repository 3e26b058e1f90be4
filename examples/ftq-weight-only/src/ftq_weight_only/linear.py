"""A Linear layer with int8 weights and float activations.

Weights are stored as int8 with one symmetric scale per output channel
(``w ≈ q * scale``); activations are never quantized.  Two ways to compute
``x @ w.T``, picked per call by how many rows ``x`` has:

* few rows (decoding, ``rows <= kernel_max_tokens``): the fused CPU kernel
  ``torch.ops.aten._weight_int8pack_mm``, which reads the int8 weight directly
  and converts it on the fly.  Decoding is bound by how fast weights stream
  from memory, so reading 1 byte per weight instead of 4 is the speed-up.
  Its vectorized (AVX2/AVX-512) path exists for bfloat16 activations only;
  with float32 activations PyTorch falls back to a scalar loop that is many
  times slower than a float32 GEMM.  So activations are cast to bfloat16 for
  the kernel and the result cast back.
* many rows (prefill, perplexity): dequantize the weight once and run an
  ordinary GEMM, where the weight read is amortized over the rows and the
  kernel above (one dot product per output, no blocking over K) is slower.

The kernel's vectorized path loads 16 values at a time with aligned loads:
``in_features`` must be a multiple of 16 and the buffers 16-byte aligned
(torch's allocator gives 64).  Layers that do not fit take the GEMM path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ftq_core import api

__all__ = ["INT8_MAX", "KERNEL_K_MULTIPLE", "quantize_weight_per_channel", "Int8WeightOnlyLinear", "kernel_available"]

#: ftq's symmetric int8 range [-127, 127]: one scale, and negation never overflows.
INT8_MAX = api.INT8_MAX

#: The fused kernel's vector loop steps through K 16 values at a time.
KERNEL_K_MULTIPLE = 16


def kernel_available() -> bool:
    """Whether this torch has the fused int8 weight-only kernel (torch >= 2.3)."""
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` → ``(int8 [out, in], float32 scale [out])``, round to nearest.

    ftq's own per-channel rule, so these weights round exactly as ftq's int8 layers' do.
    """
    q, scale = api.quantize_per_channel_symmetric(weight)
    return q.contiguous(), scale


class Int8WeightOnlyLinear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 ``q``; ``x`` stays float.

    Buffers (all plain tensors, saved as they are): ``weight_int8 [out, in]``
    int8, ``weight_scale [out]`` float32, ``bias [out]`` float32 or absent.
    ``compute_dtype`` is the activation dtype inside the matmul (bfloat16 for
    the fused kernel's fast path, or float32 to keep activations exact);
    ``kernel_max_tokens`` is the most rows sent to the fused kernel.
    The output has the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        compute_dtype: torch.dtype = torch.bfloat16,
        kernel_max_tokens: int = 16,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.kernel_max_tokens = kernel_max_tokens
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, **options) -> "Int8WeightOnlyLinear":
        """Quantize a float ``weight [out, in]`` (and copy ``bias``)."""
        out_features, in_features = weight.shape
        module = cls(in_features, out_features, bias=bias is not None, **options)
        q, scale = quantize_weight_per_channel(weight)
        module.weight_int8.copy_(q)
        module.weight_scale.copy_(scale)
        if bias is not None:
            module.bias.copy_(bias.detach().float())
        return module.to(weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the int8 values stand for (one rounding, done in float32)."""
        return (self.weight_int8.float() * self.weight_scale[:, None]).to(dtype)

    def uses_kernel(self, rows: int) -> bool:
        """Whether a call with ``rows`` input rows runs the fused int8 kernel."""
        return (
            self.compute_dtype == torch.bfloat16
            and rows <= self.kernel_max_tokens
            and self.in_features % KERNEL_K_MULTIPLE == 0
            and self.weight_int8.data_ptr() % 16 == 0
            and kernel_available()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.uses_kernel(x2.shape[0]):
            a = x2.to(self.compute_dtype)
            if not a.is_contiguous() or a.data_ptr() % 32:
                a = a.clone(memory_format=torch.contiguous_format)  # the kernel uses aligned loads
            y = torch.ops.aten._weight_int8pack_mm(a, self.weight_int8, self.weight_scale.to(self.compute_dtype))
        else:
            y = F.linear(x2.to(self.compute_dtype), self.dequantized_weight(self.compute_dtype))
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"weight=int8 per-channel, compute={str(self.compute_dtype).removeprefix('torch.')}, "
            f"kernel_max_tokens={self.kernel_max_tokens}"
        )
