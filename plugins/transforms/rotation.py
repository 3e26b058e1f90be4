"""Rotate a Llama-family model's residual stream by a random orthogonal matrix folded into its weights.

QuaRot and SpinQuant observe that an LLM's activation outliers sit in a few
fixed channels of the residual stream, which is what makes per-token int8
activations lose accuracy.  Multiplying the residual stream by an orthogonal
``Q`` spreads each outlier over every channel, and the model can absorb ``Q``
exactly:

* every RMSNorm weight is first folded into the layers that read the norm's
  output (columns of q/k/v, gate/up and the head), leaving norms of uniform
  weight (the old weight's root mean square, see :func:`_fold_norm`), and
  ``rmsnorm(h Q) = rmsnorm(h) Q`` for orthogonal ``Q``;
* the embeddings become ``E Q``, and every layer reading the stream
  (q/k/v, gate/up, the head) ``W Q``;
* every layer writing into it (``o_proj``, ``down_proj``) ``Q^T W`` (and
  ``b Q`` for a bias).

In float the rotated model computes the same function up to rounding (tested).
A tied head stays tied to ``E Q``; the final norm's weight, which the
embeddings do not carry, becomes a dense ``hidden × hidden`` matrix after a
unit-weight norm (:class:`~.rotated_norm.RotatedRMSNorm`), the one op that
runs at inference time and did not before (once per head call).  An untied
head takes the final norm's weight into its columns like every other reader.
``Q`` is a seeded random orthogonal matrix (QR of a Gaussian), which exists
for every width (SmolLM2's 576 has no Sylvester Hadamard matrix).

``down_proj``'s input (SiLU(gate) * up) is not in the residual stream and no
layer before it can absorb a rotation; the quantizer gives those int8 layers
an online block Hadamard rotation instead (:func:`online_rotation_blocks`,
:mod:`ftq_plugins.int8.hadamard`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from ftq_core.model_families import family_of, model_types_where

__all__ = [
    "ROTATABLE_MODEL_TYPES", "RotationReport", "unsupported_reason", "random_orthogonal", "rotate_residual_stream",
    "rotate_outside_layers", "rotate_embeddings", "rotate_head", "rotate_layer",
    "online_rotation_blocks", "ROTATED_SCHEME", "rotate_for_int8",
]

#: What a rotated layer's scheme says in the run report.
ROTATED_SCHEME = ", rotated residual stream"

#: Model types with Llama's pre-RMSNorm layout, which the fold above covers (see ``ftq_core.model_families``).
ROTATABLE_MODEL_TYPES = model_types_where("rotatable")


@dataclass(frozen=True)
class RotationReport:
    """What :func:`rotate_residual_stream` did: the stream width, the seed, and whether the head stayed
    tied through a final-norm matrix (:class:`~.rotated_norm.RotatedRMSNorm`)."""

    width: int
    seed: int
    final_norm_matrix: bool


def unsupported_reason(model) -> str | None:
    """Why the residual rotation cannot be folded into ``model`` (``None`` when it can)."""
    config = getattr(model, "config", None)
    family = family_of(config)
    if family is None:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {', '.join(ROTATABLE_MODEL_TYPES)}"
    if not family.rotatable:
        return f"model type {config.model_type!r}: {family.reason('rotatable')}"
    body = getattr(model, "model", None)
    if body is None or not all(hasattr(body, n) for n in ("embed_tokens", "layers", "norm")) or not hasattr(model, "lm_head"):
        return "the model lacks the Llama module layout (model.embed_tokens/layers/norm, lm_head)"
    import torch

    for i, layer in enumerate(body.layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            module = layer.get_submodule(part)
            if type(module) is not torch.nn.Linear:
                return f"model.layers.{i}.{part} is a {type(module).__name__}; rotate the float model, before quantizing"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not type(norm).__name__.endswith("RMSNorm") or getattr(norm, "bias", None) is not None:
                return f"layer {i}'s norms are not RMSNorms with a weight only"
    final = body.norm
    if not type(final).__name__.endswith("RMSNorm") or getattr(final, "weight", None) is None \
            or not hasattr(final, "variance_epsilon"):
        return f"the final norm is a {type(final).__name__}, not an RMSNorm with a weight (already rotated?)"
    if type(model.lm_head) is not torch.nn.Linear or type(body.embed_tokens) is not torch.nn.Embedding:
        return "the embeddings or the head are not plain float modules; rotate before quantizing"
    return None


@contextmanager
def _one_thread():
    """Run LAPACK/BLAS on one thread: their results may depend on the thread count, and data-parallel ranks
    (one thread each under torchrun) must fold the very same rotation as a single process."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_orthogonal(width: int, seed: int):
    """A ``[width, width]`` float64 orthogonal matrix, the same for the same seed on every machine."""
    import torch

    gaussian = torch.randn(width, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with _one_thread():
        q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))[None, :]  # signs fixed: QR alone leaves them to LAPACK


def _fold_norm(norm, readers) -> None:
    """Move ``norm``'s per-channel gain into ``readers``' columns, leaving the norm a uniform gain.

    The norm keeps the gain's root mean square ``r`` (a uniform gain commutes
    with any rotation) and the readers take ``g / r``.  Folding all of ``g``
    would give the same function, but training would then see readers whose
    weights carry ``g`` (SmolLM2's gains sit at 0.03-0.4): AdamW moves every
    element by about the learning rate whatever its scale, so in the model's
    own terms the readers' step would grow by ``1 / r`` (2.5-40x), and one
    step at lr 1e-4 multiplied quantization-aware training's distillation
    loss by 60.  With ``r`` in the norm the readers' weights and their step
    keep the scale they had.  Int8 numerics do not change: a uniform factor
    moves every per-channel and per-token scale, not the codes.
    """
    weight = norm.weight.detach().double()
    level = float(weight.square().mean().sqrt()) or 1.0  # an all-zero gain (a dead norm) folds as before
    for linear in readers:
        for chunk in _row_chunks(linear.weight):
            chunk.copy_(chunk.double() * (weight / level)[None, :])
    norm.weight.fill_(level)


def rotate_residual_stream(model, *, seed: int = 0, untie_head: bool = False) -> RotationReport:
    """Fold a seeded random rotation of the residual stream into ``model``'s weights, in place.

    A tied head stays tied, the final norm's weight moving into a
    :class:`~.rotated_norm.RotatedRMSNorm`; ``untie_head`` gives it its own
    copy instead, which takes the final norm's weight into its columns (one
    more embedding-sized matrix; its int8 rounding then follows that weight).

    Raises :class:`~ftq_core.errors.UsageError` with the reason for models it
    does not cover (see :func:`unsupported_reason`).  Arithmetic in float64,
    stored back in each weight's dtype.  The same as :func:`rotate_outside_layers`
    then :func:`rotate_layer` for each decoder layer, which is how a model
    quantized one layer at a time is rotated (the same bits).
    """
    from ftq_core.errors import UsageError

    reason = unsupported_reason(model)
    if reason is not None:
        raise UsageError(f"cannot rotate the residual stream: {reason}. Unset rotate.")
    rotation = random_orthogonal(model.config.hidden_size, seed)
    report = rotate_outside_layers(model, rotation, seed=seed, untie_head=untie_head)
    for layer in model.model.layers:
        rotate_layer(layer, rotation)
    return report


#: Bytes of float64 one rotation product works on at a time (a chunk of rows or columns): an
#: 8B model's embeddings in float64 are 4.2 GB, and a chunk gives the same bits as the whole.
_CHUNK_BYTES = 256 << 20


def _row_chunks(weight):
    """Views of ``weight``'s rows, each at most :data:`_CHUNK_BYTES` in float64."""
    rows = max(1, _CHUNK_BYTES // (8 * weight.shape[1]))
    return [weight[start:start + rows] for start in range(0, weight.shape[0], rows)]


def _reads(linear, rotation) -> None:
    """``x Q W'^T = x W^T``  =>  ``W' = W Q``, a chunk of rows at a time."""
    for chunk in _row_chunks(linear.weight):
        chunk.copy_(chunk.double() @ rotation)


def _writes(linear, rotation) -> None:
    """``y' = y Q``  =>  ``W' = Q^T W``, ``b' = b Q``, a chunk of columns at a time."""
    weight = linear.weight
    columns = max(1, _CHUNK_BYTES // (8 * weight.shape[0]))
    for start in range(0, weight.shape[1], columns):
        weight[:, start:start + columns].copy_(rotation.T @ weight[:, start:start + columns].double())
    if linear.bias is not None:
        linear.bias.copy_(linear.bias.double() @ rotation)


def rotate_outside_layers(model, rotation, *, seed: int = 0, untie_head: bool = False) -> RotationReport:
    """The rotation's part outside the decoder layers: embeddings, final norm and head (see :func:`rotate_residual_stream`)."""
    rotate_embeddings(model, rotation, untie_head=untie_head)
    return rotate_head(model, rotation, seed=seed)


def rotate_embeddings(model, rotation, *, untie_head: bool = False) -> None:
    """``E Q`` (a tied head with them); with ``untie_head`` a tied head first gets its own unrotated copy."""
    import torch

    body = model.model
    with torch.no_grad():
        if untie_head and getattr(model.lm_head, "weight", None) is body.embed_tokens.weight:
            model.lm_head.weight = torch.nn.Parameter(body.embed_tokens.weight.detach().clone())
            model.config.tie_word_embeddings = False
        _reads(body.embed_tokens, rotation)


def rotate_head(model, rotation, *, seed: int = 0) -> RotationReport:
    """The final norm and the head, after :func:`rotate_embeddings`: a tied head already reads ``E Q``, and the
    final norm's ``g`` becomes ``Q^T diag(g) Q``; an untied head takes ``g`` into its columns, then ``W Q``."""
    import torch

    body = model.model
    tied = model.lm_head.weight is body.embed_tokens.weight
    with torch.no_grad():
        if tied:
            from ftq_plugins.transforms.rotated_norm import RotatedRMSNorm

            gain = body.norm.weight.detach().double()
            with _one_thread():  # the one float product kept as it is: the same bits on every rank
                matrix = rotation.T @ (gain[:, None] * rotation)
            body.norm = RotatedRMSNorm(matrix, body.norm.variance_epsilon)
        else:
            _fold_norm(body.norm, (model.lm_head,))
            _reads(model.lm_head, rotation)
    return RotationReport(width=model.config.hidden_size, seed=seed, final_norm_matrix=tied)


def rotate_layer(layer, rotation) -> None:
    """The rotation folded into one decoder layer: its norms into their readers, then ``W Q`` and ``Q^T W``."""
    import torch

    attn, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():
        _fold_norm(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))
        _fold_norm(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _reads(linear, rotation)
        for linear in (attn.o_proj, mlp.down_proj):
            _writes(linear, rotation)


def online_rotation_blocks(model) -> dict[str, int]:
    """``{layer name: Hadamard block}`` for the layers whose input only an online rotation reaches (``down_proj``)."""
    from ftq_plugins.int8.hadamard import hadamard_block

    blocks = {}
    for i, layer in enumerate(model.model.layers):
        block = hadamard_block(layer.mlp.down_proj.in_features)
        if block:
            blocks[f"model.layers.{i}.mlp.down_proj"] = block
    return blocks


def rotate_for_int8(model, *, untie_head: bool = False) -> dict[str, int]:
    """What a quantizer does to rotate ``model`` in place: the residual stream folded into the weights
    (:func:`rotate_residual_stream`), then ``{layer name: Hadamard block}`` of the layers that rotate their
    input online (:func:`online_rotation_blocks`)."""
    rotate_residual_stream(model, untie_head=untie_head)
    return online_rotation_blocks(model)
