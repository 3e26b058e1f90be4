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

from .numerics import quantize_per_channel_symmetric

__all__ = ["Int8Embedding", "embedding_multiplier", "embeddings_to_quantize", "quantize_embeddings",
           "share_tied_int8_weights", "tied_embedding_weights", "without_tied_heads", "quantize_embeddings_reported"]


class Int8Embedding(nn.Module):
    """``embedding(ids) = weight_int8[ids] * weight_scale[ids]`` in float32.

    Buffers: ``weight_int8 [num_embeddings, embedding_dim]`` int8 and
    ``weight_scale [num_embeddings]`` float32.  Inference only (no gradients).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 output_multiplier: float = 1.0):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        # a family's embedding that scales its rows (Gemma: sqrt(hidden)) keeps that factor here
        self.output_multiplier = float(output_multiplier)
        # empty, not zeros: every constructor's caller puts its own tensors here, and untouched pages of a
        # vocabulary-sized table cost no memory
        self.register_buffer("weight_int8", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings, dtype=torch.float32))

    @classmethod
    def from_float(cls, module: nn.Embedding, output_multiplier: float = 1.0,
                   codes: tuple[torch.Tensor, torch.Tensor] | None = None) -> "Int8Embedding":
        """``codes``: the ``(int8, scale)`` rows to hold, already computed (a tied head's), instead of rounding again."""
        q, scale = codes if codes is not None else quantize_per_channel_symmetric(module.weight)
        qmodule = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, output_multiplier)
        qmodule.weight_int8 = q
        qmodule.weight_scale = scale
        return qmodule.to(module.weight.device)

    @classmethod
    def from_tensors(cls, tensors, meta: dict) -> "Int8Embedding":
        """Rebuild a saved layer, taking the loaded tensors as they are (so ties survive)."""
        from ftq_core.tensor_io import adopt_saved_tensors

        module = cls(meta["num_embeddings"], meta["embedding_dim"], meta.get("padding_idx"),
                     float(meta.get("output_multiplier", 1.0)))
        return adopt_saved_tensors(module, tensors, ("weight_int8", "weight_scale"), what="int8 embedding")

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float().mul_(self.weight_scale[:, None])  # one float copy, scaled in place

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = nn.functional.embedding(input_ids, self.weight_int8)
        rows = rows.float().mul_(self.weight_scale[input_ids].unsqueeze(-1))
        return rows.mul_(self.output_multiplier) if self.output_multiplier != 1.0 else rows

    def extra_repr(self) -> str:
        scaled = f", rows times {self.output_multiplier:g}" if self.output_multiplier != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, weight=int8 per-row{scaled}"


def embedding_multiplier(module: nn.Module) -> float | None:
    """The constant ``c`` with ``module(ids) == c * embedding(ids, module.weight)``, judged by behaviour; ``None`` if none.

    1 for ``nn.Embedding`` itself and subclasses that keep its ``forward``;
    for a subclass that overrides it (Gemma 3's scaled word embedding) the
    ratio on a probe of a few ids, if it is one constant (float rounding
    apart) and the output has the table's dtype.
    """
    if not isinstance(module, nn.Embedding):
        return None
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    weight = module.weight
    if weight.is_meta or not weight.is_floating_point():
        return None
    ids = torch.arange(min(8, module.num_embeddings), device=weight.device)[None, :]
    try:
        with torch.no_grad():  # forward itself, not __call__: hooks never see the probe
            theirs, plain = type(module).forward(module, ids).float(), nn.functional.embedding(ids, weight).float()
    except Exception:
        return None
    if theirs.shape != plain.shape:
        return None
    mask = plain.abs() > 1e-6
    if not bool(mask.any()):
        return None
    ratios = theirs[mask] / plain[mask]
    c = float(ratios.median())
    return c if bool(torch.allclose(theirs, plain * c, rtol=1e-2, atol=1e-6)) else None


def embeddings_to_quantize(model: nn.Module, keep_float: Iterable[str] = ()):
    """``(name, float embedding, row multiplier)`` of every embedding int8 quantizers make per-row int8.

    ``nn.Embedding`` and the family subclasses that scale its rows by a
    constant (:func:`embedding_multiplier`), not matching ``keep_float``; a
    QAT embedding (anything with ``to_embedding()``) gives the table it
    trained as those int8 rows.  The one rule :func:`quantize_embeddings`,
    :func:`tied_embedding_weights` and QAT's fake-quant embeddings follow.
    """
    from ftq_core.layers import matches_any

    for name, module in list(model.named_modules()):
        if matches_any(name, keep_float) is not None:
            continue
        trained = getattr(module, "to_embedding", None)
        if callable(trained):
            yield name, trained(), module.output_multiplier
            continue
        multiplier = embedding_multiplier(module)
        if multiplier is not None:
            yield name, module, multiplier


def quantize_embeddings(model: nn.Module, keep_float: Iterable[str] = ()) -> list[tuple[str, nn.Embedding]]:
    """Swap every embedding :func:`embeddings_to_quantize` lists for an :class:`Int8Embedding`.

    Returns the ``(name, float module)`` pairs that were swapped.
    """
    from ftq_core.layers import set_submodule

    swapped = []
    for name, module, multiplier in embeddings_to_quantize(model, keep_float):
        codes = _codes_held_already(model, module.weight)
        set_submodule(model, name, Int8Embedding.from_float(module, multiplier, codes=codes))
        swapped.append((name, module))
    return swapped


def _codes_held_already(model: nn.Module, weight: torch.Tensor):
    """The ``(int8, scale)`` of an int8 layer whose codes are exactly ``weight``'s nearest per-row codes (a
    tied head, quantized first), or ``None``.  Compared a chunk of rows at a time, so a vocabulary-sized
    table is not rounded into a second full copy only to be found equal and shared."""
    from .numerics import per_channel_symmetric_chunks

    for holder in _int8_weight_holders(model):
        held, scale = holder.weight_int8, holder.weight_scale
        if held.shape != weight.shape or scale.shape != weight.shape[:1]:
            continue
        if all(torch.equal(codes, held[rows]) and torch.equal(chunk_scale, scale[rows])
               for rows, codes, chunk_scale in per_channel_symmetric_chunks(weight)):
            return held, scale
    return None


def _int8_weight_holders(model: nn.Module):
    """Modules other than embeddings that keep an int8 weight as ``weight_int8`` and ``weight_scale`` buffers."""
    for module in model.modules():
        if isinstance(module, Int8Embedding):
            continue
        weight, scale = getattr(module, "weight_int8", None), getattr(module, "weight_scale", None)
        if isinstance(weight, torch.Tensor) and isinstance(scale, torch.Tensor) and weight.dtype == torch.int8:
            yield module


def share_tied_int8_weights(model: nn.Module) -> int:
    """Make int8 Linear layers whose weights equal an int8 embedding's use its tensors.

    Tied ``lm_head``/embedding pairs quantize to identical int8 values and
    scales (per-row nearest rounding, both); sharing the tensors halves their
    memory and lets the artifact store them once.  Any int8 layer keeping
    ``weight_int8``/``weight_scale`` buffers (:class:`Int8DynamicLinear`,
    ``Int8W8A8Linear``) can share.  Returns the number of layers now sharing.
    """
    embeddings = [m for m in model.modules() if isinstance(m, Int8Embedding)]
    shared = 0
    for module in _int8_weight_holders(model):
        for emb in embeddings:
            if (
                module.weight_int8.shape == emb.weight_int8.shape
                and module.weight_scale.shape == emb.weight_scale.shape
                and torch.equal(module.weight_int8, emb.weight_int8)
                and torch.equal(module.weight_scale, emb.weight_scale)
            ):
                module.weight_int8 = emb.weight_int8
                module.weight_scale = emb.weight_scale
                shared += 1
                break
    return shared


def tied_embedding_weights(model: nn.Module, keep_float: Iterable[str] = ()) -> set[int]:
    """``id`` of each float embedding weight that :func:`quantize_embeddings` will make int8.

    A quantizer that rounds its Linear weights in some other way (GPTQ) keeps
    nearest rounding for a layer holding one of these (a tied head), so the
    head and the embeddings stay one int8 tensor.
    """
    return {id(module.weight) for _, module, _ in embeddings_to_quantize(model, keep_float)}


def without_tied_heads(model: nn.Module, layer_names: Iterable[str], keep_float: Iterable[str] = ()) -> list[str]:
    """``layer_names`` less the layers whose weight is an embedding table :func:`quantize_embeddings` will
    make int8 (a tied head): a transform that changes a layer's codes (SmoothQuant's scales, GPTQ) would give
    such a head codes the int8 embeddings cannot share, and the artifact a second embedding-sized matrix."""
    from ftq_core.layers import linear_weight

    tied = tied_embedding_weights(model, keep_float)
    return [name for name in layer_names if id(linear_weight(model.get_submodule(name))) not in tied]


def quantize_embeddings_reported(model: nn.Module, keep_float: Iterable[str], reports: list) -> list:
    """What every int8 quantizer does with token embeddings: per-row int8 (:func:`quantize_embeddings`),
    shared with a tied int8 head (:func:`share_tied_int8_weights`); returns ``reports`` with each swapped
    embedding's row saying so (its float-only row replaced)."""
    from ftq_core.protocols import LayerReport

    done = {
        name: LayerReport(name, "Embedding", "int8 per-row weight", True, "", module.weight.numel())
        for name, module in quantize_embeddings(model, keep_float)
    }
    share_tied_int8_weights(model)
    return [done.pop(report.name, report) for report in reports] + list(done.values())
