"""Fake-quantized Linear for quantization-aware training that matches :class:`Int8DynamicLinear`.

The numerics are those of the CPU int8 kernel the model converts to
(:mod:`ftq_plugins.int8_linear`): each activation row (token) and each weight
output channel gets a symmetric scale ``amax(|row|) / 127`` computed in
float32, values are rounded half-to-even (``torch.round``) and clamped to
``[-127, 127]``.  Training sees ``round(v / s) * s`` in place of ``v``; the
gradient passes straight through (the straight-through estimator), so the
backward pass costs nothing beyond the ordinary Linear's.

Why this is fast and bf16-safe where ``torch.ao`` eager QAT is not:

* in float32 the layer computes exactly the int8 kernel's arithmetic (integer
  codes multiply exactly in float32), so the converted model's logits equal
  the trained model's bit for bit;
* under bf16 autocast, one autograd node per fake-quant whose backward is the
  identity, instead of a chain of differentiable ops;
* the fake-quantized tensor is produced directly in the matmul's dtype (bf16
  under autocast), so autocast has nothing left to cast;
* on CUDA, each fake-quant (row max, divide, round, clamp, rescale, cast) is
  one fused kernel compiled with ``torch.compile``; a whole-model
  ``torch.compile`` inlines the same expression into its own kernels;
* no observers: activation scales are per token and dynamic, weight scales
  come from the weights themselves, so nothing is synchronised with the host
  and data-parallel ranks agree by construction.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

__all__ = ["INT8_MAX", "quantize_rows", "fake_quant_rows", "fake_quant_rows_ste", "Int8QATLinear"]

#: The symmetric int8 range, shared with :mod:`ftq_plugins.int8_linear`.
INT8_MAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` per row of the last dimension: integer-valued float32 codes in [-127, 127].

    ``scale = max(amax(|row|), 1e-12) / 127`` in float32 and
    ``codes = round(x / scale).clamp(±127)``: exactly what
    ``quantize_per_token_symmetric`` (activations, rows = tokens) and
    ``quantize_per_channel_symmetric`` (weights ``[out, in]``, rows = output
    channels) compute, before their cast to int8.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / INT8_MAX
    return torch.round(xf / scale).clamp(-INT8_MAX, INT8_MAX), scale


def fake_quant_rows(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` of :func:`quantize_rows`, returned in ``out_dtype``."""
    codes, scale = quantize_rows(x)
    return (codes * scale).to(out_dtype)


@functools.cache
def _fused_kernel():
    """``fake_quant_rows`` compiled to one kernel (row max, divide, round, clamp, rescale, cast).

    Built on first CUDA use.  Inputs come flattened to 2-D, so a model needs
    one graph per input dtype (sizes become dynamic after the first change).
    """
    return torch.compile(fake_quant_rows, fullgraph=True)


def _fake_quant(x: torch.Tensor, out_dtype: torch.dtype, fused: bool) -> torch.Tensor:
    # Inside a whole-model torch.compile the plain expression is traced and
    # fused by the outer compile; calling the separately compiled kernel there
    # would only add a graph break.
    if fused and x.is_cuda and not torch.compiler.is_compiling():
        return _fused_kernel()(x.reshape(-1, x.shape[-1]), out_dtype).reshape(x.shape)
    return fake_quant_rows(x, out_dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """Fake-quant forward, identity backward (straight-through estimator).

    The scale is ``amax / 127``, so ``|x / s| <= 127`` and the clamp never
    cuts a value: the straight-through gradient needs no mask.
    """

    @staticmethod
    def forward(ctx, x, out_dtype, fused):
        ctx.input_dtype = x.dtype
        return _fake_quant(x, out_dtype, fused)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.input_dtype), None, None


def fake_quant_rows_ste(x: torch.Tensor, out_dtype: torch.dtype | None = None, *, fused: bool = True) -> torch.Tensor:
    """Differentiable :func:`fake_quant_rows` with a straight-through gradient."""
    return _FakeQuantSTE.apply(x, out_dtype or x.dtype, fused)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmul will run in: autocast's for this device if enabled, else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _Int8LinearExactSTE(torch.autograd.Function):
    """The float32 path: ``(codes_x @ codes_w.T) * s_x * s_w + b``, the int8 kernel's own arithmetic.

    Integer codes are exact in float32 and so are their dot products (below
    2**24), so the forward pass is bit for bit :class:`Int8DynamicLinear`'s
    (same multiplications in the same order).  The backward pass is the
    straight-through one: that of a Linear on the dequantized tensors.
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        codes_x, scale_x = quantize_rows(x2)
        codes_w, scale_w = quantize_rows(weight)
        y = (codes_x @ codes_w.t()).mul_(scale_x).mul_(scale_w.reshape(-1))
        if bias is not None:
            y.add_(bias)
        ctx.save_for_backward(codes_x, scale_x, codes_w, scale_w)
        ctx.shape, ctx.has_bias = x.shape, bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        codes_x, scale_x, codes_w, scale_w = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = (g @ (codes_w * scale_w)).reshape(ctx.shape)
        grad_w = g.t() @ (codes_x * scale_x)
        grad_b = g.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


class Int8QATLinear(nn.Module):
    """A Linear (or GPT-2 ``Conv1D``) trained through int8 per-token × per-channel fake-quant.

    It keeps the original ``weight`` and ``bias`` parameters (same objects, so
    tied weights stay tied and checkpoints keep their shapes); ``transposed``
    marks a ``Conv1D`` weight stored ``[in, out]``.  :meth:`to_int8` gives the
    :class:`Int8DynamicLinear` that computes what this module trained on.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, *, transposed: bool = False, fused: bool = True):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.transposed = transposed
        self.fused = fused
        self.out_features, self.in_features = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)

    @classmethod
    def from_float(cls, module: nn.Module, *, fused: bool = True) -> "Int8QATLinear":
        """Wrap an ``nn.Linear`` or ``Conv1D`` (its parameters are shared, not copied)."""
        return cls(module.weight, module.bias, transposed=not isinstance(module, nn.Linear), fused=fused)

    def weight_out_in(self) -> torch.Tensor:
        """The float weight as ``[out_features, in_features]`` (a view for ``Conv1D``)."""
        return self.weight.t() if self.transposed else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        if dtype is torch.float32 and x.dtype is torch.float32 and self.weight.dtype is torch.float32:
            return _Int8LinearExactSTE.apply(x, self.weight_out_in(), self.bias)
        # bf16 (autocast): the matmul sees the dequantized tensors in bf16,
        # produced directly by the fused fake-quant
        weight = fake_quant_rows_ste(self.weight_out_in(), dtype, fused=self.fused)
        x = fake_quant_rows_ste(x, dtype, fused=self.fused)
        return nn.functional.linear(x, weight, self.bias)

    def to_int8(self) -> nn.Module:
        """The :class:`Int8DynamicLinear` with this layer's int8 weight, on the CPU."""
        from .int8_linear import Int8DynamicLinear

        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight = nn.Parameter(self.weight_out_in().detach().float().cpu().contiguous())
            if self.bias is not None:
                linear.bias = nn.Parameter(self.bias.detach().float().cpu())
        return Int8DynamicLinear.from_float(linear)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fake-quant: int8 per-token activation, int8 per-channel weight, fused={self.fused}"
        )
