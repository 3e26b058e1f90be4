"""Telling whether a tensor seen before is still the same, unchanged tensor.

Several layers reuse work done on their input by a sibling called just before
on the very same tensor object (int8 codes at inference, fake-quantized
activations and group outputs in QAT).  Identity comes from a weak
reference; "unchanged" from the tensor's version counter, which every
in-place operation bumps -- except optimizer steps that write parameters
directly (fused AdamW), which :func:`parameter_state` counts as well.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["tensor_version", "optimizer_steps", "parameter_state", "LastTensorMemo"]


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


_optimizer_steps = 0
_step_hook = None


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def optimizer_steps() -> int:
    """How many steps any torch optimizer has taken in this process since the first call.

    The first call registers a post-step hook common to all optimizers
    (``torch.optim.optimizer.register_optimizer_step_post_hook``).
    """
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    return _optimizer_steps


def parameter_state(param: torch.Tensor) -> tuple:
    """A key that changes whenever ``param``'s values may have: storage, version counter, device and optimizer steps.

    The version counter alone misses optimizer steps: fused AdamW (the
    trainer's) writes the parameters without bumping it (torch 2.13), so a
    value derived from a weight and keyed by its version would outlive every
    step.  Any optimizer step therefore counts as a change of every parameter.
    """
    return (param.data_ptr(), tensor_version(param), param.device, optimizer_steps())


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
