"""The block Walsh–Hadamard rotation an int8 layer may apply to its input at run time.

A rotation folded into the weights needs nothing at run time where the
previous layer can absorb it (the residual stream: see
:mod:`ftq_plugins.transforms.rotation`).  ``down_proj``'s input, SiLU(gate) *
up, has no such layer before it, and its outlier channels are where most of
per-token int8's remaining loss sits.  There the int8 layer rotates its input
itself, ``x -> x H``, with ``H`` block-diagonal: Sylvester Hadamard blocks of
the largest power of two dividing the width (512 for SmolLM2's 1536), scaled
to be orthogonal; its weight holds ``W H`` (``H`` is symmetric, so ``H H = I``).
The transform is a fast Walsh–Hadamard butterfly, ``width * log2(block)``
additions, not a matrix product.
"""

from __future__ import annotations

import torch

__all__ = ["MIN_BLOCK", "hadamard_block", "block_hadamard"]

#: Narrower blocks spread an outlier over too few channels to help.
MIN_BLOCK = 64


def hadamard_block(width: int) -> int:
    """The block size for a width: its largest power-of-two divisor, or 0 when under :data:`MIN_BLOCK`."""
    block = width & -width
    return block if block >= MIN_BLOCK else 0


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x [..., width]`` times the orthogonal block-diagonal Hadamard matrix (``width % block == 0``).

    Applied twice it gives ``x`` back (up to rounding): the matrix is its own inverse.
    """
    shape = x.shape
    y = x.reshape(-1, shape[-1] // block, block)
    half = 1
    while half < block:  # butterflies over pairs half apart: Sylvester's ordering
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * half), 2, half)
        low, high = y[..., 0, :], y[..., 1, :]
        y = torch.stack((low + high, low - high), dim=-2)
        half *= 2
    return y.reshape(shape) * (block ** -0.5)
