"""The ``int8-weight-only`` quantizer: swaps Linear layers for :class:`Int8WeightOnlyLinear`."""

from __future__ import annotations

import fnmatch

from ftq_core.protocols import LayerReport, QuantPhase

from .config import Int8WeightOnlyConfig

__all__ = ["Int8WeightOnlyQuantizer"]


def _linear_types() -> tuple[type, ...]:
    """``nn.Linear`` and GPT-2's ``Conv1D`` (a Linear whose weight is stored ``[in, out]``)."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def _weight_out_in(module):
    from torch import nn

    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


def _matching_pattern(name: str, patterns) -> str | None:
    leaf = name.rsplit(".", 1)[-1]
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p)), None)


def _tied_weights(model) -> dict[int, list[str]]:
    """Parameter names by storage address; more than one name means tied weights."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param.data_ptr(), []).append(name)
    return names


class Int8WeightOnlyQuantizer:
    """Post-training, no calibration: each weight is rounded to int8 on its own."""

    phase = QuantPhase.POST_TRAINING
    needs_calibration = False
    engine = None  # no torch.ao quantized engine involved

    def __init__(self, config: Int8WeightOnlyConfig):
        self.config = config
        self._reports: list[LayerReport] = []

    def prepare(self, model):
        return model

    def convert(self, model):
        from ftq_core.layers import set_submodule

        from .linear import Int8WeightOnlyLinear

        model.eval()
        types = _linear_types()
        tied = _tied_weights(model) if self.config.skip_tied else {}
        options = {
            "compute_dtype": self.config.compute_dtype.torch_dtype,
            "kernel_max_tokens": self.config.kernel_max_tokens,
        }
        self._reports = []
        for name, module in [(n, m) for n, m in model.named_modules() if type(m) in types]:
            params = sum(p.numel() for p in module.parameters())
            reason = self._keep_reason(name, module, tied)
            if reason:
                self._reports.append(LayerReport(name, type(module).__name__, "float", False, reason, params))
                continue
            qmodule = Int8WeightOnlyLinear.from_float(_weight_out_in(module), module.bias, **options)
            set_submodule(model, name, qmodule)
            self._reports.append(LayerReport(name, type(module).__name__, self.config.scheme, True, "", params))
        return model

    def _keep_reason(self, name: str, module, tied: dict[int, list[str]]) -> str:
        pattern = _matching_pattern(name, self.config.keep_float)
        if pattern is not None:
            return f"keep_float {pattern!r}"
        sharing = [n for n in tied.get(module.weight.data_ptr(), []) if not n.startswith(name + ".")]
        if sharing:
            return f"weight tied to {sharing[0]}; int8 would store it twice (skip_tied = false to quantize anyway)"
        return ""

    def layer_report(self, model) -> list[LayerReport]:
        return list(self._reports)
