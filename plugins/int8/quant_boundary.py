"""The quant/dequant boundary ftq puts around each layer on torch.ao's eager path.

torch.ao's static and QAT Linear layers take a *quantized* tensor, so each one
needs a ``QuantStub`` before it and a ``DeQuantStub`` after it.  ftq inserts
this wrapper itself around every layer it quantizes: users never place stubs,
and the rest of the model stays float.

The wrapper also carries SmoothQuant's explicit per-channel input scale (for
layers whose predecessor cannot absorb it) or the online block Hadamard
rotation of a rotated model's ``down_proj`` input (the inner layer then holds
``W H``: :mod:`ftq_plugins.int8.hadamard`), and runs its inside in float32 with
autocast off: eager fake-quant and quantized kernels do not take bfloat16, and
QAT on CUDA trains under bf16 autocast.
"""

from __future__ import annotations

import torch
from torch import nn

from .hadamard import block_hadamard, check_rotation_block, describe_rotation, to_rotated_basis

__all__ = ["QuantBoundary", "float_linear"]


def float_linear(module: nn.Module, smooth: torch.Tensor | None = None, rotation_block: int = 0) -> nn.Linear:
    """A new float32 ``nn.Linear`` computing ``module`` on inputs divided by ``smooth``
    (or on inputs rotated by ``rotation_block``-wide Hadamard blocks: its weight is ``W H``).

    A copy, never the original: the float layer must survive in case the
    sensitivity fallback keeps it.
    """
    from ftq_core.layers import linear_weight

    weight = to_rotated_basis(linear_weight(module).detach().float(), rotation_block)
    if smooth is not None:
        weight = weight * smooth.to(weight)[None, :]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach().float())
    return linear


class QuantBoundary(nn.Module):
    """``dequant(module(quant(x / smooth)))``, or ``dequant(module(quant(x H)))`` with an input
    rotation, in float32, autocast off."""

    def __init__(self, module: nn.Module, smooth: torch.Tensor | None = None, rotation_block: int = 0):
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        if smooth is not None and rotation_block:
            raise ValueError("a quant boundary takes a smoothing vector or an input rotation, not both")
        self.quant = QuantStub()
        self.module = module
        self.dequant = DeQuantStub()
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())
        self.input_rotation_block = check_rotation_block(rotation_block, module.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.smooth is not None:
                x = x / self.smooth
            if self.input_rotation_block:
                x = block_hadamard(x, self.input_rotation_block)
            y = self.dequant(self.module(self.quant(x)))
        return y.to(dtype)

    def extra_repr(self) -> str:
        return ("smoothed input" if self.smooth is not None else "") + describe_rotation(self.input_rotation_block).lstrip(", ")
