"""Codec for a rotated model's final norm: its matrix as a tensor, the epsilon as JSON."""

from __future__ import annotations

from ftq_core.hookspecs import hookimpl

__all__ = ["RotatedRMSNormCodec"]


class RotatedRMSNormCodec:
    """:class:`ftq_plugins.transforms.rotated_norm.RotatedRMSNorm`: ``rmsnorm(x) @ matrix``."""

    kind = "ftq.rotated_rmsnorm"

    @property
    def module_type(self):
        from ftq_plugins.transforms.rotated_norm import RotatedRMSNorm

        return RotatedRMSNorm

    def export(self, module):
        return {"matrix": module.matrix}, {"eps": module.variance_epsilon}

    def restore(self, tensors, meta):
        from ftq_core.api import ArtifactError
        from ftq_plugins.transforms.rotated_norm import RotatedRMSNorm

        matrix = tensors["matrix"]
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ArtifactError(f"a rotated final norm's matrix must be square, not {list(matrix.shape)}")
        return RotatedRMSNorm(matrix, float(meta["eps"]))


@hookimpl
def register_module_codecs(register):
    register(RotatedRMSNormCodec())
