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

import json
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import ModelNotFoundError

__all__ = ["SafetensorsCheckpoint", "empty_model", "materialize", "release", "tensor_bytes"]

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
                weight_map = json.loads(index.read_text())["weight_map"]
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

    def names(self) -> list[str]:
        return list(self.info)

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        return sum(tensor_bytes(*self.info[n]) for n in (self.info if names is None else names))

    def read(self, names: Iterable[str], dtype=None) -> dict[str, Any]:
        """The tensors ``names`` in memory of their own (not the file's map), converted to ``dtype`` if given."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.shard_of[name], []).append(name)
        tensors = {}
        for shard, wanted in by_shard.items():
            # opened per call and closed after: the map's pages leave the process with it
            with safe_open(str(self.directory / shard), framework="pt") as handle:
                for name in wanted:
                    tensor = handle.get_tensor(name)
                    tensor = tensor.to(dtype) if dtype is not None and tensor.dtype != dtype else tensor.clone()
                    tensors[name] = tensor
        return tensors


_ELEMENT_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
                  "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * _ELEMENT_BYTES.get(dtype, 4)


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from a safetensors file's JSON header, its size bounded by the file's."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if length <= 0 or length > min(size - 8, 100 << 20):
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = json.loads(handle.read(length))
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(v) for v in entry["data_offsets"])
            if any(d < 0 for d in shape) or not 0 <= start <= end <= size - 8 - length \
                    or end - start != tensor_bytes(entry["dtype"], shape):
                raise ValueError(f"tensor {name!r} lies outside the file or has the wrong byte count")
            out[name] = (str(entry["dtype"]), shape)
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelNotFoundError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); copy or "
                                 f"save the model again") from None


def empty_model(config) -> Any:
    """A causal LM of ``config`` whose parameters are on the meta device (no memory); buffers (rotary tables) real."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.tie_weights()  # from_config leaves meta weights untied; a tied head must be the embeddings' Parameter
    return model.eval()


def materialize(module, prefix: str, checkpoint: SafetensorsCheckpoint, dtype=None) -> None:
    """Give ``module``'s meta parameters their values from ``checkpoint`` (names under ``prefix``), in ``dtype``."""
    import torch

    wanted = {}
    for name, param in module.named_parameters(recurse=True):
        if param.is_meta:
            wanted[prefix + name] = name
    missing = [n for n in wanted if n not in checkpoint.info]
    if missing:
        raise ModelNotFoundError(f"{checkpoint.directory} lacks {len(missing)} weight(s) its config needs "
                                 f"({', '.join(missing[:3])}); point --model at a complete copy of the model")
    values = checkpoint.read(wanted, dtype)
    for full, name in wanted.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        old = getattr(owner, leaf)
        value = values[full]
        if tuple(value.shape) != tuple(old.shape):
            raise ModelNotFoundError(f"{checkpoint.directory}: {full} is {tuple(value.shape)}, its config says "
                                     f"{tuple(old.shape)}; the config and the weights are of different models")
        setattr(owner, leaf, torch.nn.Parameter(value, requires_grad=False))


def release(module) -> None:
    """Put ``module``'s parameters back on the meta device, freeing their memory."""
    import torch

    for owner in module.modules():
        for leaf, param in list(owner.named_parameters(recurse=False)):
            setattr(owner, leaf, torch.nn.Parameter(param.to("meta"), requires_grad=False))
