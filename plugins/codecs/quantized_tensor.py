"""torch quantized tensors (torch.ao packed weights) as plain tensors and JSON, and back: what the torch.ao codecs share."""

from __future__ import annotations

__all__ = ["export_quantized_tensor", "restore_quantized_tensor"]


def export_quantized_tensor(prefix: str, qtensor) -> tuple[dict, dict]:
    """A torch quantized tensor as int8 values + scales + zero points."""
    import torch

    tensors = {f"{prefix}int_repr": qtensor.int_repr()}
    if qtensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        tensors[f"{prefix}scales"] = qtensor.q_per_channel_scales().to(torch.float64)
        tensors[f"{prefix}zero_points"] = qtensor.q_per_channel_zero_points().to(torch.int64)
        meta = {"qscheme": "per_channel", "axis": qtensor.q_per_channel_axis(), "dtype": str(qtensor.dtype)}
    else:
        meta = {"qscheme": "per_tensor", "scale": qtensor.q_scale(), "zero_point": qtensor.q_zero_point(), "dtype": str(qtensor.dtype)}
    return tensors, meta


def restore_quantized_tensor(prefix: str, tensors, meta):
    import torch

    values = tensors[f"{prefix}int_repr"]
    if meta["qscheme"] == "per_channel":
        return torch._make_per_channel_quantized_tensor(
            values, tensors[f"{prefix}scales"], tensors[f"{prefix}zero_points"], meta["axis"]
        )
    return torch._make_per_tensor_quantized_tensor(values, meta["scale"], meta["zero_point"])
