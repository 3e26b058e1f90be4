"""Finding the layers a quantizer may touch, and swapping modules by name."""

from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator

import torch
from torch import nn

from ftq_core.layers_util import set_submodule

__all__ = [
    "linear_like_types",
    "is_linear_like",
    "iter_linear_layers",
    "matches_any",
    "set_submodule",
    "linear_weight",
    "as_linear",
]


def linear_like_types() -> tuple[type, ...]:
    """``nn.Linear`` and GPT-2's ``Conv1D`` (a Linear with a transposed weight)."""
    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return tuple(types)


def is_linear_like(module: nn.Module) -> bool:
    return type(module) in linear_like_types()


def iter_linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every Linear/Conv1D layer with its qualified name, in module order."""
    for name, module in model.named_modules():
        if is_linear_like(module):
            yield name, module


def matches_any(name: str, patterns: Iterable[str]) -> str | None:
    """The first glob pattern matching ``name`` or its last component, if any.

    ``lm_head``, ``*.down_proj``, ``down_proj`` and ``model.layers.0.*`` all work.
    """
    leaf = name.rsplit(".", 1)[-1]
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(leaf, pattern):
            return pattern
    return None


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]``, whatever the layer type."""
    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()  # Conv1D stores [in, out]


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function (Conv1D is converted)."""
    if type(module) is nn.Linear:
        return module
    weight = linear_weight(module).detach()
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    linear = linear.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach())
    return linear
