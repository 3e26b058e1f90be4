"""Int8 token embeddings: one symmetric scale per row (per token id).

The embedding table is the largest single tensor of a small LLM (SmolLM2-135M:
49152 x 576, a fifth of its weights), and models that tie it to ``lm_head``
read the same matrix as the output projection.  Per-row int8 keeps each
token's vector to within half a step of 1/127 of its largest entry, and is
exactly the per-output-channel quantization :class:`Int8DynamicLinear` applies
to ``lm_head``: a tied pair shares one int8 tensor and one scale vector, in
memory and in the artifact.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .dynamic_linear import Int8DynamicLinear
from .numerics import quantize_per_channel_symmetric

__all__ = ["Int8Embedding", "quantize_embeddings", "share_tied_int8_weights"]


class Int8Embedding(nn.Module):
    """``embedding(ids) = weight_int8[ids] * weight_scale[ids]`` in float32.

    Buffers: ``weight_int8 [num_embeddings, embedding_dim]`` int8 and
    ``weight_scale [num_embeddings]`` float32.  Inference only (no gradients).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32))

    @classmethod
    def from_float(cls, module: nn.Embedding) -> "Int8Embedding":
        q, scale = quantize_per_channel_symmetric(module.weight)
        qmodule = cls(module.num_embeddings, module.embedding_dim, module.padding_idx)
        qmodule.weight_int8.copy_(q)
        qmodule.weight_scale.copy_(scale)
        return qmodule.to(module.weight.device)

    @classmethod
    def from_tensors(cls, tensors, meta: dict) -> "Int8Embedding":
        """Rebuild a saved layer, taking the loaded tensors as they are (so ties survive)."""
        from ftq_core.tensor_io import adopt_saved_tensors

        module = cls(meta["num_embeddings"], meta["embedding_dim"], meta.get("padding_idx"))
        return adopt_saved_tensors(module, tensors, ("weight_int8", "weight_scale"), what="int8 embedding")

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.weight_int8)
        return rows.float().mul_(self.weight_scale[input_ids].unsqueeze(-1))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight=int8 per-row"


def quantize_embeddings(model: nn.Module, keep_float: Iterable[str] = ()) -> list[tuple[str, nn.Embedding]]:
    """Swap every ``nn.Embedding`` not matching ``keep_float`` for an :class:`Int8Embedding`.

    Returns the ``(name, original module)`` pairs that were swapped.
    """
    from ftq_core.layers import matches_any, set_submodule

    swapped = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Embedding or matches_any(name, keep_float) is not None:
            continue
        set_submodule(model, name, Int8Embedding.from_float(module))
        swapped.append((name, module))
    return swapped


def share_tied_int8_weights(model: nn.Module) -> int:
    """Make int8 Linear layers whose weights equal an int8 embedding's use its tensors.

    Tied ``lm_head``/embedding pairs quantize to identical int8 values and
    scales; sharing the tensors halves their memory and lets the artifact store
    them once.  Returns the number of layers now sharing.
    """
    embeddings = [m for m in model.modules() if isinstance(m, Int8Embedding)]
    shared = 0
    for module in model.modules():
        if not isinstance(module, Int8DynamicLinear):
            continue
        for emb in embeddings:
            if (
                module.weight_int8.shape == emb.weight_int8.shape
                and torch.equal(module.weight_int8, emb.weight_int8)
                and torch.equal(module.weight_scale, emb.weight_scale)
            ):
                module.weight_int8 = emb.weight_int8
                module.weight_scale = emb.weight_scale
                shared += 1
                break
    return shared
