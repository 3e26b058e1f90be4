"""Telling whether a tensor seen before is still the same, unchanged tensor.

Several layers reuse work done on their input by a sibling called just before
on the very same tensor object (int8 codes at inference, fake-quantized
activations and group outputs in QAT).  Identity comes from a weak
reference; "unchanged" from the tensor's version counter, which every
in-place operation bumps.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["tensor_version", "LastTensorMemo"]


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


class LastTensorMemo:
    """A value computed from the last tensor seen, reused while that same, unchanged tensor comes back.

    ``get(x, key)`` returns what ``put(x, key, value)`` stored if ``x`` is the
    very tensor object stored (a weak reference: a freed tensor never matches
    a new one), its version counter has not moved, and ``key`` (whatever else
    the value depends on: dtype, form, grad mode) is equal; else ``None``.
    """

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        self._entry: tuple | None = None

    def get(self, x: torch.Tensor, key=None):
        entry = self._entry
        if entry is not None and entry[0]() is x and entry[1] == tensor_version(x) and entry[2] == key:
            return entry[3]
        return None

    def put(self, x: torch.Tensor, key, value) -> None:
        self._entry = (weakref.ref(x), tensor_version(x), key, value)

    def clear(self) -> None:
        self._entry = None
