"""LoRA over ftq's int8 Linear layers, as a peft custom layer type.

peft supplies LoRA itself (initialisation, dropout, scaling, the adapter file
format); what it cannot know is an int8 base layer, so this module says:

* :class:`Int8LoraLinear`: peft's LoRA ``Linear`` whose base is an
  :class:`~ftq_plugins.int8.dynamic_linear.Int8DynamicLinear` or
  :class:`~ftq_plugins.int8.w8a8_linear.Int8W8A8Linear`.  The forward is
  peft's (base output plus ``B(A(dropout(x))) * scale``); the base passes its
  input gradient through (:mod:`ftq_plugins.int8.autograd`).  ``merge``
  requantizes ``W + scale * B @ A`` into the layer's int8 codes (an export
  to float folds it in :mod:`ftq_plugins.exporters.float_modules`).
* :class:`Int8LoraModel`: peft's LoRA tuner, told where an int8 layer keeps
  its weight (a buffer, where peft looks for a parameter).
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear
from ftq_plugins.int8.w8a8_linear import Int8W8A8Linear

__all__ = ["INT8_LINEAR_TYPES", "Int8LoraLinear", "Int8LoraModel", "inject_lora"]

#: The int8 layer types LoRA wraps: both keep ``weight_int8``/``weight_scale``
#: and offer ``dequantized_weight()`` and ``requantize(weight)``.
INT8_LINEAR_TYPES = (Int8DynamicLinear, Int8W8A8Linear)


class Int8LoraLinear(PeftLoraLinear):
    """peft's LoRA ``Linear`` over a frozen int8 layer (see the module docstring)."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the active adapters into the int8 weight: ``W <- round(W + delta)`` (one more rounding)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            with torch.no_grad():
                weight = base.dequantized_weight() + self.get_delta_weight(name).float()
                if safe_merge and not torch.isfinite(weight).all():
                    raise ValueError(f"NaNs in the merged weights: adapter {name!r} is broken")
                base.requantize(weight)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        raise NotImplementedError("an adapter merged into int8 weights cannot be taken out again (the merge rounds)")


class Int8LoraModel(LoraModel):
    """peft's LoRA tuner, placing adapters of int8 layers on the device of the layer's int8 weight."""

    def _replace_module(self, parent, child_name, new_module, child):
        base = child.base_layer if hasattr(child, "base_layer") else child
        if not isinstance(base, INT8_LINEAR_TYPES):
            return super()._replace_module(parent, child_name, new_module, child)
        setattr(parent, child_name, new_module)
        for name, module in new_module.named_modules():
            if self.prefix in name:
                module.to(base.weight_int8.device)


def inject_lora(model: torch.nn.Module, config) -> torch.nn.Module:
    """Add LoRA layers to ``model`` in place (peft's ``inject_adapter_in_model`` for int8 bases); the model.

    Only the adapters' parameters require grad afterwards.
    """
    config._register_custom_module({base_type: Int8LoraLinear for base_type in INT8_LINEAR_TYPES})
    with warnings.catch_warnings():
        # peft names every layer type it does not ship as "unsupported"; the custom mapping above supports it
        warnings.filterwarnings("ignore", message="Unsupported layer type")
        return Int8LoraModel(model, config, adapter_name="default").model
