"""Codecs for the ``static`` and ``qat`` quantizers' modules (tensors and JSON only).

* :class:`Int8W8A8LinearCodec`: ftq's :class:`Int8W8A8Linear` (static or per-token
  activations, optional SmoothQuant scale): its buffers are plain tensors.
* :class:`QuantBoundaryCodec`: a converted :class:`QuantBoundary` around a
  ``torch.ao.nn.quantized.Linear``: the input quantizer's scale and zero
  point, the int8 weight with its scales, the bias, the output scale and zero
  point, and the smoothing vector.
"""

from __future__ import annotations

from ftq_core.hookspecs import hookimpl

from .quantized_tensor import export_quantized_tensor, restore_quantized_tensor

__all__ = ["Int8W8A8LinearCodec", "QuantBoundaryCodec"]

_OPTIONAL = ("input_scale", "smooth", "bias")


class Int8W8A8LinearCodec:
    kind = "ftq.int8_linear"

    @property
    def module_type(self):
        from ftq_plugins.int8.w8a8_linear import Int8W8A8Linear

        return Int8W8A8Linear

    def export(self, module):
        tensors = {"weight_int8": module.weight_int8, "weight_scale": module.weight_scale}
        tensors.update({key: getattr(module, key) for key in _OPTIONAL if getattr(module, key) is not None})
        meta = {"in_features": module.in_features, "out_features": module.out_features, "mode": module.mode.value}
        if module.input_rotation_block:
            meta["input_rotation_block"] = module.input_rotation_block
        return tensors, meta

    def restore(self, tensors, meta):
        from ftq_plugins.int8.w8a8_linear import ActivationMode, Int8W8A8Linear

        module = Int8W8A8Linear(
            meta["in_features"], meta["out_features"], bias="bias" in tensors,
            mode=ActivationMode(meta["mode"]), smooth="smooth" in tensors,
            input_rotation_block=int(meta.get("input_rotation_block", 0)),
        )
        for key, value in tensors.items():
            getattr(module, key).copy_(value)
        return module


def _tolerant(cls):
    """A subclass of ``cls`` that skips loading when the state dict has none of its keys.

    The artifact loader fills the rest of the model with ``load_state_dict``;
    a codec-restored layer has no entries there (its codec already set its
    weights), but torch's quantized Linear and its packed parameters insist on
    reading their own keys.
    """

    class Tolerant(cls):
        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            if any(key.startswith(prefix) for key in state_dict):
                super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    Tolerant.__name__ = Tolerant.__qualname__ = cls.__name__
    return Tolerant


_RESTORED: dict[str, type] = {}


def _restored_types():
    if not _RESTORED:
        from torch.ao.nn.quantized import Linear as QuantizedLinear
        from torch.ao.nn.quantized.modules.linear import LinearPackedParams

        _RESTORED["linear"], _RESTORED["packed"] = _tolerant(QuantizedLinear), _tolerant(LinearPackedParams)
    return _RESTORED["linear"], _RESTORED["packed"]


class QuantBoundaryCodec:
    kind = "ftq.quant_boundary"

    @property
    def module_type(self):
        from ftq_plugins.int8.quant_boundary import QuantBoundary

        return QuantBoundary

    def export(self, module):
        from torch.ao.nn.quantized import Linear as QuantizedLinear

        from ftq_core.errors import ArtifactError

        linear = module.module
        if not isinstance(linear, QuantizedLinear):
            raise ArtifactError(
                f"a quant/dequant boundary holds a {type(linear).__name__}, not a converted int8 Linear; "
                f"convert the model (quantizer.convert) before saving it"
            )
        weight, bias = linear._packed_params._weight_bias()
        tensors, weight_meta = export_quantized_tensor("weight.", weight)
        if bias is not None:
            tensors["bias"] = bias
        if module.smooth is not None:
            tensors["smooth"] = module.smooth
        meta = {
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "weight": weight_meta,
            "input_scale": float(module.quant.scale),
            "input_zero_point": int(module.quant.zero_point),
            "output_scale": float(linear.scale),
            "output_zero_point": int(linear.zero_point),
        }
        if module.input_rotation_block:
            meta["input_rotation_block"] = module.input_rotation_block
        return tensors, meta

    def restore(self, tensors, meta):
        import torch
        from torch.ao.nn.quantized import DeQuantize, Quantize

        from ftq_plugins.int8.quant_boundary import QuantBoundary

        linear_type, packed_type = _restored_types()
        linear = linear_type(meta["in_features"], meta["out_features"], bias_="bias" in tensors, dtype=torch.qint8)
        linear._packed_params = packed_type(dtype=torch.qint8)
        linear.set_weight_bias(restore_quantized_tensor("weight.", tensors, meta["weight"]), tensors.get("bias"))
        linear.scale, linear.zero_point = meta["output_scale"], meta["output_zero_point"]
        boundary = QuantBoundary(linear, tensors.get("smooth"), int(meta.get("input_rotation_block", 0)))
        boundary.quant = Quantize(meta["input_scale"], meta["input_zero_point"], torch.quint8)
        boundary.dequant = DeQuantize()
        return boundary


@hookimpl
def register_module_codecs(register):
    register(Int8W8A8LinearCodec())
    register(QuantBoundaryCodec())
