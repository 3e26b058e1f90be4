"""Sensitivity-based fallback: the budget is met with few float layers, each with its reason."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ftq_testing import make_tiny_llama
from quant_testing import token_blocks

from ftq_core.layers import iter_linear_layers, set_submodule
from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear
from ftq_plugins.transforms.calibration import run_batches
from ftq_plugins.transforms.sensitivity import SensitivityMethod, fallback_to_budget, fisher_sensitivity


class _Noisy(torch.nn.Module):
    """A deliberately bad 'quantized' layer: the float layer plus large noise."""

    def __init__(self, linear, scale):
        super().__init__()
        # a copy: the float layer itself may carry the hooks that call this one
        self.linear, self.scale, self.in_features = copy.deepcopy(linear), scale, linear.in_features

    def forward(self, x):
        y = self.linear(x)
        generator = torch.Generator().manual_seed(0)
        return y + self.scale * y.std() * torch.randn(y.shape, generator=generator)


def _setup(bad: str):
    model = make_tiny_llama()
    floats = dict(iter_linear_layers(model))
    quantized = {name: Int8DynamicLinear.from_float(module) for name, module in floats.items()}
    quantized[bad] = _Noisy(floats[bad], 30.0)
    batches = [b[None] for b in token_blocks(3, 48)]
    return model, floats, quantized, batches


@pytest.mark.parametrize("method", list(SensitivityMethod))
def test_fallback_keeps_the_sensitive_layer_and_meets_the_budget(method):
    bad = "lm_head"  # on a random-init model, noise on the logits is what moves the loss
    model, floats, quantized, batches = _setup(bad)
    result = fallback_to_budget(model, floats, quantized, batches, budget_pct=1.0, method=method, latency=False)
    assert bad in result.kept and "sensitivity" in result.kept[bad]
    assert max(result.sensitivity, key=result.sensitivity.get) == bad
    assert result.final_loss - result.float_loss <= math.log1p(0.01)
    assert len(result.kept) < len(floats) / 2
    for name in floats:  # every layer is float or int8 afterwards, as decided
        module = model.get_submodule(name)
        assert (module is floats[name]) == (name in result.kept)
    assert result.final_loss == pytest.approx(run_batches(model, batches))


def test_fisher_ranks_like_the_exact_loss():
    model, floats, quantized, batches = _setup("lm_head")
    scores = fisher_sensitivity(model, floats, quantized, batches)
    base = run_batches(model, batches)
    exact = {}
    for name in floats:
        set_submodule(model, name, quantized[name])
        exact[name] = run_batches(model, batches) - base
        set_submodule(model, name, floats[name])
    assert max(scores, key=scores.get) == max(exact, key=exact.get)
    assert all(value >= 0 for value in scores.values())


def test_budget_in_a_quantizer_reports_kept_layers_with_latency():
    from ftq_core.pipeline import quantize

    result = quantize(make_tiny_llama(), "dynamic", {"ppl_budget": 0.001, "rotate": False}, calibration_data=token_blocks(),
                      calibration_batches=3)
    kept = [row for row in result.layers if row.reason.startswith("sensitivity")]
    assert kept, "a near-zero budget must keep some layer float"
    assert all("ms per 256-token prefill" in row.reason for row in kept)
    for row in kept:
        assert isinstance(result.model.get_submodule(row.name), torch.nn.Linear)
