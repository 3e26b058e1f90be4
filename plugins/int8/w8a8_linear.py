"""ftq's W8A8 Linear: per-channel int8 weights, static or per-token int8 activations.

One module covers the two activation schemes ftq's own int8 path offers:

* ``static``: one symmetric activation scale per tensor, fixed at calibration
  (the classic W8A8 of SmoothQuant's "O3" setting: no run-time reduction over
  the activation);
* ``per-token``: one scale per row of the input, computed on the fly.

Both run the product as a real int8 GEMM with int32 accumulation
(``torch._int_mm``).  An optional ``smooth`` vector divides the input channel
by channel before quantization: this is SmoothQuant's migration for layers
whose predecessor cannot absorb it (the weight was multiplied by the same
vector when the module was built, so the float function is unchanged).
An optional ``input_rotation_block`` rotates the input by block Hadamard
matrices first instead, with the weight held as ``W H`` (see
:mod:`ftq_plugins.int8.hadamard`; a rotated model's ``down_proj``).
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from ftq_core.layers import linear_weight

from .autograd import differentiable_input, input_gradient
from .hadamard import block_hadamard, check_rotation_block, describe_rotation, to_rotated_basis
from .kernels import ActivationCodes, int_mm_codes
from .numerics import quantize_per_channel_symmetric, quantize_per_token_symmetric, round_to_codes, scale_from_absmax

__all__ = ["ActivationMode", "Int8W8A8Linear"]


class ActivationMode(enum.Enum):
    STATIC = "static"
    PER_TOKEN = "per-token"


class Int8W8A8Linear(nn.Module):
    """``y = (q(x / smooth) @ q(W * smooth).T) * s_x * s_w + b`` with an int8 GEMM.

    Buffers: ``weight_int8 [out, in]``, ``weight_scale [out]``, ``input_scale``
    (scalar, static mode only), ``smooth [in]`` (optional), ``bias [out]``
    (optional).  The output has the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, mode: ActivationMode, smooth: bool = False,
                 input_rotation_block: int = 0):
        super().__init__()
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        if smooth and input_rotation_block:
            raise ValueError("a layer's input is smoothed or rotated, not both")
        self.input_rotation_block = check_rotation_block(input_rotation_block, in_features)
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("input_scale", torch.ones(()) if mode is ActivationMode.STATIC else None)
        self.register_buffer("smooth", torch.ones(in_features) if smooth else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        *,
        mode: ActivationMode,
        input_absmax: float | None = None,
        smooth: torch.Tensor | None = None,
        input_rotation_block: int = 0,
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> "Int8W8A8Linear":
        """Quantize an ``nn.Linear``/``Conv1D``.

        ``input_absmax`` (static mode) is the calibrated range of the input
        *after* division by ``smooth`` or the rotation.  ``codes``: the
        ``(int8 [out, in], float32 scale [out])`` weight to hold instead of the
        nearest codes of the rotated, smoothed weight (GPTQ's).
        """
        if mode is ActivationMode.STATIC and input_absmax is None:
            raise ValueError("static activations need the calibrated input_absmax")
        weight = linear_weight(module).detach().float()
        out_features, in_features = weight.shape
        qmodule = cls(in_features, out_features, bias=module.bias is not None, mode=mode, smooth=smooth is not None,
                      input_rotation_block=input_rotation_block)
        weight = to_rotated_basis(weight, qmodule.input_rotation_block)
        if smooth is not None:
            smooth = smooth.detach().float().to(weight.device)
            weight = weight * smooth[None, :]
            qmodule.smooth.copy_(smooth)
        q, scale = quantize_per_channel_symmetric(weight) if codes is None else codes
        qmodule.weight_int8.copy_(q)
        qmodule.weight_scale.copy_(scale)
        if mode is ActivationMode.STATIC:
            qmodule.input_scale.copy_(scale_from_absmax(input_absmax))
        if module.bias is not None:
            qmodule.bias.copy_(module.bias.detach().float())
        return qmodule.to(weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer effectively applies to the *unsmoothed*, un-rotated input."""
        weight = self.weight_int8.float() * self.weight_scale[:, None]
        weight = weight / self.smooth[None, :] if self.smooth is not None else weight
        return to_rotated_basis(weight, self.input_rotation_block)

    def requantize(self, weight: torch.Tensor) -> None:
        """Round a new float ``weight [out, in]`` (applied to the unsmoothed input) into this layer, in place.

        The smoothing vector and the calibrated input scale stay: they describe
        the input, which merging an adapter does not change.
        """
        weight = to_rotated_basis(weight.float(), self.input_rotation_block)
        if self.smooth is not None:
            weight = weight * self.smooth[None, :]
        q, scale = quantize_per_channel_symmetric(weight)
        self.weight_int8.copy_(q)
        self.weight_scale.copy_(scale)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode is ActivationMode.PER_TOKEN:
            return quantize_per_token_symmetric(x)
        return round_to_codes(x, self.input_scale).to(torch.int8), self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # adapters below this layer learn through it: see ftq_plugins.int8.autograd
        return differentiable_input(x, self._forward, self._input_gradient)

    def _input_gradient(self, grad_out: torch.Tensor) -> torch.Tensor:
        grad = input_gradient(grad_out, self.weight_int8, self.weight_scale, self.smooth)
        return to_rotated_basis(grad, self.input_rotation_block)  # d/dx of (x H) is grad H

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if self.input_rotation_block:
            x2 = block_hadamard(x2, self.input_rotation_block)
        if self.smooth is not None:
            x2 = x2 / self.smooth
        q, x_scale = self._quantize_input(x2)
        y = int_mm_codes(ActivationCodes(q, x_scale, 0), self.weight_int8, self.weight_scale)  # int8 x int8 -> int32
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"act=int8 {self.mode.value}, weight=int8 per-channel, smooth={self.smooth is not None}"
            + describe_rotation(self.input_rotation_block)
        )
