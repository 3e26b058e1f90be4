"""Fake-quantized token embeddings for quantization-aware training, matching :class:`Int8Embedding`.

``convert`` turns a model's embeddings into per-row int8
(:class:`~ftq_plugins.int8.embedding.Int8Embedding`).  Training therefore
sees the same rounding: each looked-up row is ``round(row / s) * s`` with its
row's own scale ``amax(|row|) / 127`` (the per-row scale of the whole table,
computed on the rows looked up), gradients passing straight through to the
table.  In float32 the converted model then computes what the trained one did,
bit for bit (a tied head fake-quantizes the same table per output row, so it
and the embeddings round to the same int8 tensor).
"""

from __future__ import annotations

import torch
from torch import nn

from .fake_quant import fake_quant_rows_ste

__all__ = ["Int8QATEmbedding", "fake_quant_embeddings"]


class Int8QATEmbedding(nn.Module):
    """An embedding (its ``weight`` parameter shared, not copied) whose rows come out fake-quantized per row.

    ``output_multiplier``: a family's constant row scale (Gemma's ``sqrt(hidden)``), applied after the
    rounding as :class:`~ftq_plugins.int8.embedding.Int8Embedding` applies it.
    """

    def __init__(self, embedding: nn.Embedding, output_multiplier: float = 1.0):
        super().__init__()
        self.weight = embedding.weight
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.output_multiplier = float(output_multiplier)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = fake_quant_rows_ste(nn.functional.embedding(input_ids, self.weight, self.padding_idx))
        return rows * self.output_multiplier if self.output_multiplier != 1.0 else rows

    def to_embedding(self) -> nn.Embedding:
        """A float ``nn.Embedding`` holding the trained table (what ``convert`` quantizes per row)."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                                 device=self.weight.device, dtype=self.weight.dtype)
        embedding.weight = self.weight
        return embedding

    def extra_repr(self) -> str:
        scaled = f", rows times {self.output_multiplier:g}" if self.output_multiplier != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, fake-quant: int8 per-row{scaled}"


def fake_quant_embeddings(model: nn.Module, keep_float=()) -> list[str]:
    """Swap every embedding ``quantize_embeddings`` would make int8 for an :class:`Int8QATEmbedding`; their names."""
    from ftq_core.layers import set_submodule
    from ftq_plugins.int8.embedding import embeddings_to_quantize

    swapped = []
    for name, module, multiplier in embeddings_to_quantize(model, keep_float):
        set_submodule(model, name, Int8QATEmbedding(module, multiplier))
        swapped.append(name)
    return swapped
