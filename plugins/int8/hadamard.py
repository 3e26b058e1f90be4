"""The block Walsh–Hadamard rotation an int8 layer may apply to its input at run time.

A rotation folded into the weights needs nothing at run time where the
previous layer can absorb it (the residual stream: see
:mod:`ftq_plugins.transforms.rotation`).  ``down_proj``'s input, SiLU(gate) *
up, has no such layer before it, and its outlier channels are where most of
per-token int8's remaining loss sits.  There the int8 layer rotates its input
itself, ``x -> x H``, with ``H`` block-diagonal: Sylvester Hadamard blocks of
the largest power of two dividing the width (512 for SmolLM2's 1536), scaled
to be orthogonal; its weight holds ``W H`` (``H`` is symmetric, so ``H H = I``).
The transform costs two small matrix products per block (``H_a X H_b``,
Sylvester's Kronecker factors, ``width * (a + b)`` multiply-adds for
``a * b = block``), not a ``block × block`` product.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["MIN_BLOCK", "hadamard_block", "block_hadamard", "check_rotation_block", "to_rotated_basis", "describe_rotation"]

#: Narrower blocks spread an outlier over too few channels to help.
MIN_BLOCK = 64


def hadamard_block(width: int) -> int:
    """The block size for a width: its largest power-of-two divisor, or 0 when under :data:`MIN_BLOCK`."""
    block = width & -width
    return block if block >= MIN_BLOCK else 0


@functools.lru_cache(maxsize=16)
def _sylvester(size: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The ``[size, size]`` Sylvester Hadamard matrix scaled to be orthogonal (symmetric).

    Built outside inference mode whatever the caller's mode: the cached matrix is shared by inference and
    by training (a rotated QAT layer), and an inference tensor cannot be saved for backward.
    """
    with torch.inference_mode(False):
        matrix = torch.ones(1, 1, dtype=torch.float64)
        while matrix.shape[0] < size:
            matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
        return (matrix / size ** 0.5).to(dtype=dtype, device=device)


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x [..., width]`` times the orthogonal block-diagonal Hadamard matrix (``width % block == 0``).

    Applied twice it gives ``x`` back (up to rounding): the matrix is its own inverse.
    """
    # Sylvester's H_(a b) is the Kronecker product H_a (x) H_b, so a block seen as an [a, b] matrix X
    # becomes H_a X H_b: two small matrix products, where a butterfly would be 2 log2(block) eager ops
    # (the fused decoder runs the butterfly itself, in registers).
    a = 1 << (block.bit_length() - 1) // 2
    b = block // a
    shape = x.shape
    left = _sylvester(a, x.dtype, str(x.device))
    right = _sylvester(b, x.dtype, str(x.device))
    y = torch.matmul(left, torch.matmul(x.reshape(-1, a, b), right))
    return y.reshape(shape)


def check_rotation_block(block: int, width: int) -> int:
    """``block`` as an int, or ``ValueError`` unless it is 0 (no rotation) or a power of two dividing ``width``."""
    block = int(block)
    if block and (width % block or block & (block - 1)):
        raise ValueError(f"input_rotation_block {block} is not a power of two dividing {width}")
    return block


def to_rotated_basis(weight: torch.Tensor, block: int) -> torch.Tensor:
    """``W [out, in] -> W H`` for a layer whose input is rotated by ``block``-wide blocks (``block`` 0: ``W``).

    The same map takes a rotated-basis weight back (``H H = I``), and turns an
    input gradient of the rotated layer into the un-rotated input's.
    """
    return block_hadamard(weight, block) if block else weight


def describe_rotation(block: int) -> str:
    """The part of a layer's ``extra_repr`` that names its input rotation (empty for none)."""
    return f", input rotated by {block}-wide Hadamard blocks" if block else ""
