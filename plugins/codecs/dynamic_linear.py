"""Codecs for the `dynamic` quantizer's modules (ftq's Int8DynamicLinear, torch.ao's dynamic Linear): tensors and JSON only."""

from __future__ import annotations

from ftq_core.hookspecs import hookimpl

from .quantized_tensor import export_quantized_tensor, restore_quantized_tensor

__all__ = ["Int8DynamicLinearCodec", "TorchDynamicLinearCodec"]


class Int8DynamicLinearCodec:
    """ftq's per-token int8 Linear: its buffers are already plain tensors."""

    kind = "ftq.int8_dynamic_linear"

    @property
    def module_type(self):
        from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

        return Int8DynamicLinear

    def export(self, module):
        tensors = {"weight_int8": module.weight_int8, "weight_scale": module.weight_scale}
        if module.bias is not None:
            tensors["bias"] = module.bias
        meta = {"in_features": module.in_features, "out_features": module.out_features, **module.kernel_meta()}
        return tensors, meta

    def restore(self, tensors, meta):
        from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

        return Int8DynamicLinear.from_tensors(tensors, meta)


class TorchDynamicLinearCodec:
    """``torch.ao.nn.quantized.dynamic.Linear`` (int8 or float16 packed weights)."""

    kind = "torch.ao.dynamic_linear"

    @property
    def module_type(self):
        from torch.ao.nn.quantized.dynamic import Linear

        return Linear

    def export(self, module):
        weight, bias = module._packed_params._weight_bias()
        meta = {"in_features": module.in_features, "out_features": module.out_features, "dtype": str(module._packed_params.dtype)}
        if weight.is_quantized:
            tensors, qmeta = export_quantized_tensor("weight.", weight)
            meta["weight"] = qmeta
        else:
            tensors = {"weight": weight}
        if bias is not None:
            tensors["bias"] = bias
        return tensors, meta

    def restore(self, tensors, meta):
        import torch
        from torch.ao.nn.quantized.dynamic import Linear

        dtype = torch.float16 if meta["dtype"] == "torch.float16" else torch.qint8
        module = Linear(meta["in_features"], meta["out_features"], bias_=True, dtype=dtype)
        weight = restore_quantized_tensor("weight.", tensors, meta["weight"]) if "weight" in meta else tensors["weight"]
        module.set_weight_bias(weight, tensors.get("bias"))
        return module


@hookimpl
def register_module_codecs(register):
    register(Int8DynamicLinearCodec())
    register(TorchDynamicLinearCodec())
