"""torch quantized tensors (torch.ao packed weights) as plain tensors and JSON, and back: what the torch.ao codecs share."""

from __future__ import annotations

__all__ = ["export_quantized_tensor", "restore_quantized_tensor"]


def export_quantized_tensor(prefix: str, qtensor) -> tuple[dict, dict]:
    """A torch quantized tensor as int8 values + scales + zero points."""
    import torch

    tensors = {f"{prefix}int_repr": qtensor.int_repr()}
    if qtensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        # torch keeps these as float64 and int64 (12 bytes a channel more than needed: 1.5% of a 256-wide
        # layer's int8 bytes); the observers computed the scales in float32 and zero points fit int32, so the
        # narrower dtypes are stored where they hold the values exactly
        scales = qtensor.q_per_channel_scales().to(torch.float64)
        narrow = scales.to(torch.float32)
        tensors[f"{prefix}scales"] = narrow if torch.equal(narrow.to(torch.float64), scales) else scales
        tensors[f"{prefix}zero_points"] = qtensor.q_per_channel_zero_points().to(torch.int32)
        meta = {"qscheme": "per_channel", "axis": qtensor.q_per_channel_axis(), "dtype": str(qtensor.dtype)}
    else:
        meta = {"qscheme": "per_tensor", "scale": qtensor.q_scale(), "zero_point": qtensor.q_zero_point(), "dtype": str(qtensor.dtype)}
    return tensors, meta


def restore_quantized_tensor(prefix: str, tensors, meta):
    import torch

    values = tensors[f"{prefix}int_repr"]
    if meta["qscheme"] == "per_channel":
        return torch._make_per_channel_quantized_tensor(  # torch's own dtypes again, whatever was stored
            values, tensors[f"{prefix}scales"].to(torch.float64), tensors[f"{prefix}zero_points"].to(torch.int64),
            meta["axis"],
        )
    return torch._make_per_tensor_quantized_tensor(values, meta["scale"], meta["zero_point"])
