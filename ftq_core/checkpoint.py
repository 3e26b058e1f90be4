"""A Hugging Face safetensors checkpoint read one tensor at a time, and a model built empty to receive it.

``from_pretrained`` makes the whole model before anything else can run:
32 GB of float32 for an 8B model.  Here the model is built on the meta
device (shapes only, no memory) and each module's weights are read from the
shards when that module's turn comes, in the checkpoint's own dtype or the
one asked for, then released again.  Shard headers are read first, so a
checkpoint whose names or shapes do not fit the config is refused before
any weight is read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from .errors import ModelNotFoundError
from .untrusted_json import parse_untrusted_json

__all__ = ["SafetensorsCheckpoint", "empty_model", "materialize", "release", "set_parameter"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsCheckpoint:
    """The tensors of a model directory's safetensors files: names, shapes and dtypes from the headers,
    values read one at a time on request."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.shard_of: dict[str, str] = {}
        self.info: dict[str, tuple[str, tuple[int, ...]]] = {}  # name -> (safetensors dtype, shape)
        for shard in self._shards():
            for name, (dtype, shape) in _header(self.directory / shard).items():
                if name in self.shard_of:
                    raise ModelNotFoundError(f"{self.directory}: tensor {name!r} is stored twice ({self.shard_of[name]} "
                                             f"and {shard}); the checkpoint is damaged. Save the model again.")
                self.shard_of[name], self.info[name] = shard, (dtype, shape)

    def _shards(self) -> list[str]:
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = parse_untrusted_json(index.read_text())["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelNotFoundError(f"{index} is not a safetensors index ({type(exc).__name__}: {exc}); save the "
                                         f"model again") from None
            for shard in shards:
                if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
                    raise ModelNotFoundError(f"{index} names {shard!r}, which is not a .safetensors file beside it; "
                                             f"the index is damaged or hostile. Save the model again.")
                if not (self.directory / shard).is_file():
                    raise ModelNotFoundError(f"{self.directory} lacks {shard}, which its {INDEX} lists; copy the "
                                             f"whole model directory")
            return shards
        if (self.directory / SINGLE).is_file():
            return [SINGLE]
        raise ModelNotFoundError(f"{self.directory} has neither {SINGLE} nor {INDEX}; save the model with "
                                 f"save_pretrained(dir, safe_serialization=True)")

    def read(self, names: Iterable[str], dtype=None) -> dict[str, Any]:
        """The tensors ``names`` in memory of their own (read, not mapped), converted to ``dtype`` if given."""
        from .tensor_io import read_tensors

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.shard_of[name], []).append(name)
        tensors = {}
        for shard, wanted in by_shard.items():
            for name, tensor in read_tensors(self.directory / shard, wanted).items():
                tensors[name] = tensor.to(dtype) if dtype is not None and tensor.dtype != dtype else tensor
        return tensors


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors file's header, every size checked against the file's."""
    from .tensor_io import read_header

    try:
        entries, _ = read_header(path)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path} cannot be read ({type(exc).__name__}: {exc}): a .safetensors file there is "
                                 f"truncated or damaged. Copy or save the model again.") from None
    return {name: (dtype, shape) for name, (dtype, shape, _, _) in entries.items()}


def empty_model(config) -> Any:
    """A causal LM of ``config`` whose parameters are on the meta device (no memory); buffers (rotary tables) real."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.tie_weights()  # from_config leaves meta weights untied; a tied head must be the embeddings' Parameter
    return model.eval()


def materialize(module, prefix: str, checkpoint: SafetensorsCheckpoint, dtype=None, *, skip=()) -> None:
    """Give ``module``'s meta parameters their values from ``checkpoint`` (names under ``prefix``), in ``dtype``;
    the parameters in ``skip`` stay as they are."""
    wanted = {}
    for name, param in module.named_parameters(recurse=True):
        if param.is_meta and not any(param is other for other in skip):
            wanted[prefix + name] = name
    missing = [n for n in wanted if n not in checkpoint.info]
    if missing:
        raise ModelNotFoundError(f"{checkpoint.directory} lacks {len(missing)} weight(s) its config needs "
                                 f"({', '.join(missing[:3])}); point --model at a complete copy of the model")
    values = checkpoint.read(wanted, dtype)
    for full, name in wanted.items():
        old, value = module.get_parameter(name), values[full]
        if tuple(value.shape) != tuple(old.shape):
            raise ModelNotFoundError(f"{checkpoint.directory}: {full} is {tuple(value.shape)}, its config says "
                                     f"{tuple(old.shape)}; the config and the weights are of different models")
        set_parameter(module, name, value)


def set_parameter(root, name: str, value) -> None:
    """Make ``value`` the (frozen) parameter ``name`` of ``root``, e.g. ``model.layers.0.input_layernorm.weight``."""
    import torch

    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False))


def release(module) -> None:
    """Put ``module``'s parameters back on the meta device, freeing their memory."""
    import torch

    for owner in module.modules():
        for leaf, param in list(owner.named_parameters(recurse=False)):
            setattr(owner, leaf, torch.nn.Parameter(param.to("meta"), requires_grad=False))
