"""Saving and rebuilding :class:`Int8WeightOnlyLinear` with tensors and JSON only."""

from __future__ import annotations

__all__ = ["Int8WeightOnlyLinearCodec"]


class Int8WeightOnlyLinearCodec:
    """The layer's buffers are plain tensors; its two options go in the JSON meta."""

    kind = "ftq-weight-only.int8_linear"

    @property
    def module_type(self):
        from .linear import Int8WeightOnlyLinear  # torch only when a codec is used

        return Int8WeightOnlyLinear

    def export(self, module):
        tensors = {"weight_int8": module.weight_int8, "weight_scale": module.weight_scale}
        if module.bias is not None:
            tensors["bias"] = module.bias
        meta = {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "compute_dtype": str(module.compute_dtype).removeprefix("torch."),
            "kernel_max_tokens": module.kernel_max_tokens,
        }
        return tensors, meta

    def restore(self, tensors, meta):
        from ftq_core.api import ArtifactError

        from .config import ComputeDType
        from .linear import Int8WeightOnlyLinear

        try:
            compute = ComputeDType(meta["compute_dtype"])
            module = Int8WeightOnlyLinear(
                int(meta["in_features"]),
                int(meta["out_features"]),
                bias="bias" in tensors,
                compute_dtype=compute.torch_dtype,
                kernel_max_tokens=int(meta["kernel_max_tokens"]),
            )
            # copy_ into freshly allocated buffers: aligned for the kernel, and
            # a shape mismatch raises instead of silently broadcasting.
            if tensors["weight_int8"].shape != module.weight_int8.shape:
                raise ValueError(f"weight_int8 has shape {tuple(tensors['weight_int8'].shape)}")
            module.weight_int8.copy_(tensors["weight_int8"])
            module.weight_scale.copy_(tensors["weight_scale"])
            if "bias" in tensors:
                module.bias.copy_(tensors["bias"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ArtifactError(
                f"an int8 weight-only layer in this artifact cannot be rebuilt ({type(exc).__name__}: {exc}); "
                f"the artifact is damaged or was written by an incompatible ftq-weight-only. Quantize again."
            ) from None
        return module
