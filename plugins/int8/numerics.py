"""Every rule of ftq's symmetric int8 numerics, in one place.

Kernels, int8 modules, embeddings, fake-quant (CPU and the Triton kernel) and
codecs all quantize through these functions, so a scale computed at training
time (QAT), at conversion and at run time is the same number:

* range: symmetric ``[-127, 127]`` (:data:`INT8_MAX`), so negation never
  overflows and zero is exact;
* scale: ``max(absmax, SCALE_FLOOR) / 127`` in float32 (:func:`scale_from_absmax`),
  one per row: per output channel for weights, per token for activations,
  per tensor for calibrated (static) activations;
* codes: ``round(x / scale)`` half to even, clamped to the range.
"""

from __future__ import annotations

import torch

__all__ = [
    "INT8_MAX",
    "SCALE_FLOOR",
    "scale_from_absmax",
    "round_to_codes",
    "symmetric_codes",
    "quantize_rows_symmetric",
    "quantize_per_channel_symmetric",
    "quantize_per_token_symmetric", "per_channel_symmetric_chunks",
]

#: Largest code of symmetric int8.
INT8_MAX = 127

#: Smallest absmax a scale is computed from: an all-zero row gets a tiny,
#: finite scale (its codes are 0) instead of a division by zero.
SCALE_FLOOR = 1e-12


def scale_from_absmax(absmax: torch.Tensor | float) -> torch.Tensor:
    """The float32 scale mapping ``[-absmax, absmax]`` onto ``[-127, 127]`` (any shape).

    On CUDA the division is by a tensor of 127s: PyTorch turns division by a
    Python number into multiplication by its reciprocal there, which differs
    from the CPU's true division in the last bit, and then in int8 codes.
    """
    floor = torch.as_tensor(absmax, dtype=torch.float32).clamp_min(SCALE_FLOOR)
    if floor.device.type == "cpu":
        return floor.div_(INT8_MAX)
    return floor.div_(torch.full_like(floor, INT8_MAX))


def round_to_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``round(x / scale)`` (half to even) clamped to ``[-127, 127]``, as integer-valued float32."""
    return torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX)


def symmetric_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` per row of the last dimension: integer-valued float32 codes and ``scale [..., 1]``.

    What :func:`quantize_per_token_symmetric` (rows = tokens) and
    :func:`quantize_per_channel_symmetric` (rows = output channels) compute
    before their cast to int8; fake-quant trains through it.
    """
    xf = x.float()
    scale = scale_from_absmax(xf.abs().amax(dim=-1, keepdim=True))
    return round_to_codes(xf, scale), scale


def quantize_rows_symmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [rows, features]`` float → ``(int8, float32 scale [rows, 1])``: :func:`symmetric_codes` in fewer passes.

    The run-time path (every int8 layer's input at every token).  No clamp:
    with ``scale = absmax / 127`` every ``|x / scale| <= 127`` up to float
    rounding, which ``round`` keeps at 127; fewer passes over ``x`` is what
    makes small-batch int8 pay off.
    """
    x = x.float()
    scale = scale_from_absmax(x.abs().amax(dim=-1, keepdim=True))
    q = torch.div(x, scale).round_().to(torch.int8)
    return q, scale


def _check_float_tensor(name: str, value, *, min_dims: int, max_dims: int | None, shape_doc: str) -> None:
    """Cheap checks on dtype and shape (metadata only: no pass over the data)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {value.dtype}")
    if value.dim() < min_dims or (max_dims is not None and value.dim() > max_dims):
        raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(value.shape)}")
    if value.shape[-1] == 0:
        raise ValueError(f"{name} has no features to quantize (last dimension 0, shape {tuple(value.shape)})")


def quantize_per_channel_symmetric(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [out, in]`` → ``(int8 [out, in], float32 scale [out])`` with ``w ≈ q * scale``.

    Each row's error is at most half its step: ``|w - q * scale| <= scale / 2``.
    Computed in float32; a weight with inf/NaN (or float64 values beyond the
    float32 range) is refused, since its scale would be meaningless.
    """
    _check_float_tensor("weight", weight, min_dims=2, max_dims=2, shape_doc="2-D [out_features, in_features]")
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for rows, chunk_codes, chunk_scale in per_channel_symmetric_chunks(weight):
        codes[rows], scale[rows] = chunk_codes, chunk_scale
    return codes, scale


def per_channel_symmetric_chunks(weight: torch.Tensor):
    """:func:`quantize_per_channel_symmetric` a chunk of rows at a time: ``(row slice, int8, scale)`` each.

    Each row is rounded on its own, so the chunks are the whole's codes; an 8B model's head rounded at
    once would take three more head-sized float32 temporaries.
    """
    weight = weight.detach()
    step = max(1, WEIGHT_CHUNK_BYTES // (4 * max(1, weight.shape[1])))
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        chunk = weight[rows].float()
        if not bool(torch.isfinite(chunk).all()):  # once per layer at convert time, so affordable
            bad = int((~torch.isfinite(weight.float())).sum())
            raise ValueError(
                f"weight holds {bad} non-finite value(s) (inf/NaN, or beyond the float32 range); it cannot be "
                f"quantized. Check the model (a diverged fine-tune?) before quantizing."
            )
        chunk_codes, chunk_scale = symmetric_codes(chunk)
        yield rows, chunk_codes.to(torch.int8), chunk_scale.squeeze(1)


#: Bytes of float32 rows :func:`quantize_per_channel_symmetric` rounds at a time.
WEIGHT_CHUNK_BYTES = 64 << 20


def quantize_per_token_symmetric(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., features]`` → ``(int8, float32 scale [..., 1])`` with ``x ≈ q * scale``.

    One scale per row (token); each value's error is at most half its row's
    step.  Only dtype and shape are checked (no extra pass over the data): a
    row holding inf/NaN gives a meaningless row, as it would in float.
    """
    _check_float_tensor("x", x, min_dims=1, max_dims=None, shape_doc="at least 1-D [..., features]")
    return quantize_rows_symmetric(x)
