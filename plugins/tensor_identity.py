"""Telling whether a tensor seen before is still the same, unchanged tensor.

Several layers reuse work done on their input by a sibling called just before
on the very same tensor object (int8 codes at inference, fake-quantized
activations and group outputs in QAT).  Identity comes from a weak
reference; "unchanged" from the tensor's version counter, which every
in-place operation bumps.
"""

from __future__ import annotations

import torch

__all__ = ["tensor_version"]


def tensor_version(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter, or ``None`` for a tensor made under ``torch.inference_mode``.

    Inference tensors keep no version counter (reading it raises), so for them
    an in-place change between two sibling calls goes unseen; no model forward
    changes a layer's input in place between the layers that read it.
    """
    try:
        return tensor._version
    except RuntimeError:
        return None
