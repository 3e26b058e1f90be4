"""Gradients through a frozen int8 Linear: what training adapters over an int8 model needs.

An int8 layer's weights are data, not parameters: nothing updates them.  But
adapters (LoRA) in earlier layers learn only if the loss's gradient reaches
them through every int8 layer above, so each int8 Linear passes a gradient to
its input.  It is the gradient of the float map the layer stands for,
``grad_x = grad_y @ (W_int8 * s_w)`` (QLoRA's rule: activation rounding is
treated as the identity, a straight-through estimate), computed one layer at a
time from the int8 codes: the whole model's weights are never float at once,
and only this layer's weight is widened, for the duration of one product.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["differentiable_input", "input_gradient"]


def input_gradient(grad_out: torch.Tensor, weight_int8: torch.Tensor, weight_scale: torch.Tensor,
                   smooth: torch.Tensor | None = None) -> torch.Tensor:
    """``grad_out [..., out] @ (weight_int8 * weight_scale[:, None]) [out, in]`` (then ``/ smooth``), in grad_out's dtype.

    Int8 codes are exact in bf16 and float32, so widening them loses nothing;
    the per-channel scale is applied to the (smaller) gradient instead of the weight.
    """
    dtype = grad_out.dtype
    grad_in = (grad_out * weight_scale.to(dtype)) @ weight_int8.to(dtype)
    return grad_in / smooth.to(dtype) if smooth is not None else grad_in


class _FrozenInt8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, forward, backward):
        ctx.backward = backward
        # Under autocast the product a float Linear would run in bf16 runs in bf16 here too (the int8 codes
        # are exact in it): the backward then costs what a bf16 Linear's input gradient costs.
        device = x.device.type
        ctx.compute_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        with torch.no_grad():
            return forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.compute_dtype is None or grad_out.dtype == ctx.compute_dtype:
            return ctx.backward(grad_out), None, None
        return ctx.backward(grad_out.to(ctx.compute_dtype)).to(grad_out.dtype), None, None


def differentiable_input(x: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor],
                         backward: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``forward(x)`` (an int8 kernel, not differentiable), with ``backward(grad_out)`` as its input gradient.

    Outside autograd (inference, ``no_grad``) this is ``forward(x)`` itself.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenInt8Linear.apply(x, forward, backward)
    return forward(x)
