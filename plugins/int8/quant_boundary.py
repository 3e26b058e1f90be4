"""The quant/dequant boundary ftq puts around each layer on torch.ao's eager path.

torch.ao's static and QAT Linear layers take a *quantized* tensor, so each one
needs a ``QuantStub`` before it and a ``DeQuantStub`` after it.  ftq inserts
this wrapper itself around every layer it quantizes: users never place stubs,
and the rest of the model stays float.

The wrapper also carries SmoothQuant's explicit per-channel input scale (for
layers whose predecessor cannot absorb it) and runs its inside in float32 with
autocast off: eager fake-quant and quantized kernels do not take bfloat16, and
QAT on CUDA trains under bf16 autocast.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["QuantBoundary", "float_linear"]


def float_linear(module: nn.Module, smooth: torch.Tensor | None = None) -> nn.Linear:
    """A new float32 ``nn.Linear`` computing ``module`` on inputs divided by ``smooth``.

    A copy, never the original: the float layer must survive in case the
    sensitivity fallback keeps it.
    """
    from ftq_core.layers import linear_weight

    weight = linear_weight(module).detach().float()
    if smooth is not None:
        weight = weight * smooth.to(weight)[None, :]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach().float())
    return linear


class QuantBoundary(nn.Module):
    """``dequant(module(quant(x / smooth)))`` in float32, autocast off."""

    def __init__(self, module: nn.Module, smooth: torch.Tensor | None = None):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant = QuantStub()
        self.module = module
        self.dequant = DeQuantStub()
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.smooth is not None:
                x = x / self.smooth
            y = self.dequant(self.module(self.quant(x)))
        return y.to(dtype)
