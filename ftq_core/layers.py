"""Finding the layers a quantizer may touch, and swapping modules by name.

The core uses these (artifact loading swaps saved modules back in) and so do
plugins, through :mod:`ftq_core.api`.
"""

from __future__ import annotations

import fnmatch
import functools
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:  # torch is imported where it is used, so `ftq --help` stays fast
    import torch
    from torch import nn


__all__ = [
    "linear_like_types",
    "is_linear_like",
    "iter_linear_layers",
    "matches_any",
    "set_submodule",
    "linear_weight",
    "as_linear",
    "tied_parameter_names",
]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``model.layers.0.mlp.up_proj``) with ``module``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


@functools.cache
def linear_like_types() -> tuple[type, ...]:
    """``nn.Linear`` and GPT-2's ``Conv1D`` (a Linear with a transposed weight)."""
    from torch import nn

    types: list[type] = [nn.Linear]
    try:
        from transformers.pytorch_utils import Conv1D

        types.append(Conv1D)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    return tuple(types)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` computes what one of :func:`linear_like_types` computes, judged by behaviour.

    The exact types, and any subclass that does not override ``forward``;
    a subclass that does (Falcon's ``FalconLinear``, torch.ao's fake-quant
    QAT Linear) counts only if its output on a probe row equals the plain
    Linear's (:func:`_computes_plain_linear`): Falcon's does, a fake-quant one
    does not.  ftq's own int8 layers are not Linear subclasses.
    """
    types = linear_like_types()
    if type(module) in types:
        return True
    if not isinstance(module, types):
        return False
    if type(module).__module__.startswith("torch.ao.") or hasattr(module, "weight_fake_quant"):
        return False  # torch.ao's QAT and fused modules: fake-quant layers, never probed (observers would record)
    plain = next(t for t in types if isinstance(module, t))
    if type(module).forward is plain.forward:
        return True
    return _computes_plain_linear(module, plain)


def _computes_plain_linear(module: nn.Module, plain: type) -> bool:
    """One random row through ``module`` and through ``plain.forward``: equal to float rounding?"""
    import torch

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.is_meta or not weight.is_floating_point():
        return False
    in_features = weight.shape[1] if plain.__name__ != "Conv1D" else weight.shape[0]
    x = torch.randn(1, in_features, generator=torch.Generator().manual_seed(0)).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():  # forward itself, not __call__: hooks (calibration recorders) never see the probe
            theirs, ours = type(module).forward(module, x), plain.forward(module, x)
    except Exception:  # a forward with other arguments is not a Linear's
        return False
    if not isinstance(theirs, torch.Tensor) or theirs.shape != ours.shape:
        return False
    return bool(torch.allclose(theirs.float(), ours.float(), rtol=1e-3, atol=1e-5 * float(ours.abs().max()) + 1e-6))


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
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.weight
    return module.weight.t()  # Conv1D stores [in, out]


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function (Conv1D is converted)."""
    import torch
    from torch import nn

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


def tied_parameter_names(model: nn.Module) -> dict[int, list[str]]:
    """Parameter names by storage address; an address with more than one name is a tied weight.

    E.g. ``{addr: ["model.embed_tokens.weight", "lm_head.weight"]}`` for a
    Llama with tied embeddings.  A quantizer that swaps one of them must
    decide whether the other keeps its float copy.
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param.data_ptr(), []).append(name)
    return names


def own_storages(model: nn.Module) -> int:
    """Copy every float tensor left in ``model`` into memory of its own; how many were copied.

    Weights loaded from a safetensors file are views into one memory map of
    the whole file, each holding the map open.  Once a quantizer has replaced
    most of them, the few float tensors left (norms, biases, layers kept
    float) would keep the entire map, hundreds of MB of float weights nothing
    uses, resident.  Run after conversion; tied tensors stay tied.
    """
    from torch import nn

    copies: dict = {}  # id of a tensor -> its copy
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is None or not tensor.is_floating_point() or tensor.device.type != "cpu":
                    continue
                if id(tensor) not in copies:
                    data = tensor.detach().clone()
                    copies[id(tensor)] = (nn.Parameter(data, requires_grad=tensor.requires_grad)
                                          if isinstance(tensor, nn.Parameter) else data)
                table[key] = copies[id(tensor)]
    return len(copies)
