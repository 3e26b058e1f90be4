"""The ``int8-weight-only`` quantizer: swaps Linear layers for :class:`Int8WeightOnlyLinear`."""

from __future__ import annotations

from ftq_core.api import (
    LayerReport,
    QuantizerBase,
    iter_linear_layers,
    linear_weight,
    matches_any,
    set_submodule,
    tied_parameter_names,
)

from .config import Int8WeightOnlyConfig

__all__ = ["Int8WeightOnlyQuantizer"]


class Int8WeightOnlyQuantizer(QuantizerBase):
    """Post-training, no calibration, no torch.ao engine: each weight is rounded to int8 on its own."""

    config: Int8WeightOnlyConfig

    def convert(self, model):
        from .linear import Int8WeightOnlyLinear

        model.eval()
        tied = tied_parameter_names(model) if self.config.skip_tied else {}
        options = {
            "compute_dtype": self.config.compute_dtype.torch_dtype,
            "kernel_max_tokens": self.config.kernel_max_tokens,
        }
        self.reports = []
        for name, module in list(iter_linear_layers(model)):
            params = sum(p.numel() for p in module.parameters())
            reason = self._keep_reason(name, module, tied)
            if reason:
                self.reports.append(LayerReport(name, type(module).__name__, "float", False, reason, params))
                continue
            qmodule = Int8WeightOnlyLinear.from_float(linear_weight(module), module.bias, **options)
            set_submodule(model, name, qmodule)
            self.reports.append(LayerReport(name, type(module).__name__, self.config.scheme, True, "", params))
        return model

    def _keep_reason(self, name: str, module, tied: dict[int, list[str]]) -> str:
        pattern = matches_any(name, self.config.keep_float)
        if pattern is not None:
            return f"keep_float {pattern!r}"
        sharing = [n for n in tied.get(module.weight.data_ptr(), []) if not n.startswith(name + ".")]
        if sharing:
            return f"weight tied to {sharing[0]}; int8 would store it twice (skip_tied = false to quantize anyway)"
        return ""
