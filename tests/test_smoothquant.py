"""SmoothQuant: folding is exact in float, explicit scales are carried by the int8 layer, and it helps."""

from __future__ import annotations

import pytest
import torch
from ftq_testing import make_tiny_gpt2, make_tiny_llama
from quant_testing import logits, relative_error, token_blocks

from ftq_core.layers import iter_linear_layers
from ftq_plugins.transforms.calibration import CalibrationRecorder, run_batches
from ftq_plugins.transforms.smoothquant import plan_groups, smooth_model

FAMILIES = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


def _with_outliers(model):
    """Give a few hidden channels large values, as trained LLMs have."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and module.weight.shape[0] == 64:
                module.weight[[3, 17]] *= 30.0
    return model


def _recorded(model):
    recorder = CalibrationRecorder(keep_batches=4)
    recorder.attach(model, list(iter_linear_layers(model)))
    run_batches(model, [b[None] for b in token_blocks(3, 32)])
    recorder.detach()
    return recorder


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothing_leaves_the_float_function_unchanged(family):
    model = _with_outliers(FAMILIES[family]())
    ids = token_blocks(1, 40, seed=11)[0][None]
    before = logits(model, ids)
    norms_before = {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m).__name__.endswith("Norm")}
    recorder = _recorded(model)
    names = [name for name, _ in iter_linear_layers(model)]
    explicit = smooth_model(model, recorder.absmax, 0.5, names)
    after = logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    changed = [n for n, m in model.named_modules() if n in norms_before and not torch.equal(m.weight, norms_before[n])]
    assert len(changed) >= 4, "the norms feeding q/k/v and the MLP must absorb the scales"
    # layers with nothing to fold into get explicit scales; the tied lm_head is one of them
    assert "lm_head" in explicit
    if family == "gpt2":
        assert {n for n in explicit if n.endswith("mlp.c_proj")} == {f"transformer.h.{i}.mlp.c_proj" for i in range(2)}
    else:
        assert set(explicit) == {"lm_head"}


def test_llama_plan_folds_every_projection():
    model = make_tiny_llama()
    names = [name for name, _ in iter_linear_layers(model)]
    plan = plan_groups(model, names)
    kinds = {consumer: group.kind for group in plan for consumer in group.consumers}
    assert kinds["model.layers.0.self_attn.o_proj"] == "rows" and kinds["model.layers.1.mlp.down_proj"] == "rows"
    assert kinds["model.layers.0.self_attn.q_proj"] == "norm" and kinds["lm_head"] == "explicit"
    o_group = next(g for g in plan if g.consumers == ["model.layers.0.self_attn.o_proj"])
    assert o_group.groups == 2  # 4 query heads share 2 key/value heads


def test_explicit_scale_in_int8_layer_is_exact_in_float():
    from ftq_plugins.int8.w8a8_linear import ActivationMode, Int8W8A8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    x = torch.randn(10, 64)
    x[:, 5] *= 50
    smooth = x.abs().amax(0).sqrt() / linear.weight.abs().amax(0).sqrt()
    layer = Int8W8A8Linear.from_float(linear, mode=ActivationMode.PER_TOKEN, smooth=smooth)
    # dequantized weight on the unsmoothed input is the float weight up to int8 rounding
    assert relative_error(layer.dequantized_weight(), linear.weight.detach()) < 0.05
    assert relative_error(layer(x), linear(x).detach()) < 0.05


def test_smoothing_reduces_static_int8_error_with_outliers():
    from ftq_core.pipeline import quantize

    ids = token_blocks(1, 48, seed=13)[0][None]
    errors = {}
    for alpha in (None, 0.5):
        model = _with_outliers(make_tiny_llama())
        expected = logits(model, ids)
        result = quantize(model, "static", {"smoothquant_alpha": alpha, "ppl_budget": None},
                          calibration_data=token_blocks(), calibration_batches=4)
        errors[alpha] = relative_error(logits(result.model, ids), expected)
    assert errors[0.5] < errors[None]


def test_dynamic_with_smoothing_calibrates_and_reports():
    from ftq_core.errors import UsageError
    from ftq_core.pipeline import quantize

    with pytest.raises(UsageError, match="calibration"):
        quantize(make_tiny_llama(), "dynamic", {"smoothquant_alpha": 0.5})
    ids = token_blocks(1, 48, seed=1)[0][None]
    model = make_tiny_gpt2()
    expected = logits(model, ids)
    result = quantize(model, "dynamic", {"smoothquant_alpha": 0.5}, calibration_data=token_blocks(), calibration_batches=3)
    assert all(row.quantized for row in result.layers if row.module_type in ("Linear", "Conv1D"))
    assert all("SmoothQuant" in row.scheme for row in result.layers if row.quantized and row.module_type in ("Linear", "Conv1D"))
    assert relative_error(logits(result.model, ids), expected) < 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_per_group_alphas_are_chosen_from_the_grid_and_stay_exact_in_float(family):
    from ftq_plugins.transforms.smoothquant import ALPHA_GRID, capture_group_inputs, choose_alphas

    model = _with_outliers(FAMILIES[family]())
    ids = token_blocks(1, 40, seed=11)[0][None]
    before = logits(model, ids)
    recorder = _recorded(model)
    names = [name for name, _ in iter_linear_layers(model)]
    inputs = capture_group_inputs(model, names, recorder.batches, max_tokens=64)
    plan = plan_groups(model, names)
    assert set(inputs) == {group.consumers[0] for group in plan}
    assert all(x.shape[0] == 64 for x in inputs.values())
    alphas = choose_alphas(model, recorder.absmax, inputs, names, per_token=False)
    assert set(alphas) == set(inputs) and set(alphas.values()) <= set(ALPHA_GRID)
    assert len(set(alphas.values())) > 1  # one alpha does not suit every group
    smooth_model(model, recorder.absmax, 0.5, names, alphas)
    torch.testing.assert_close(logits(model, ids), before, rtol=1e-4, atol=1e-4)


def test_per_layer_alphas_beat_one_global_alpha_for_static_on_its_calibration_text():
    from ftq_core.pipeline import quantize

    calibration = token_blocks(6, 48, seed=3)
    ids = torch.stack(calibration[:4])
    errors, schemes = {}, {}
    for per_layer in (False, True):
        model = _with_outliers(make_tiny_llama())
        expected = logits(model, ids)
        result = quantize(model, "static", {"ppl_budget": None, "rotate": "false", "weight_rounding": "nearest",
                                            "smoothquant_alpha": 0.5, "smoothquant_per_layer": per_layer},
                          calibration_data=calibration, calibration_batches=6)
        errors[per_layer] = relative_error(logits(result.model, ids), expected)
        schemes[per_layer] = {row.scheme for row in result.layers if row.quantized and row.module_type != "Embedding"}
    assert errors[True] < errors[False], errors
    assert all("α per layer group" in scheme for scheme in schemes[True])
    assert all("α=0.5" in scheme for scheme in schemes[False])


def test_dynamic_per_layer_alphas_are_searched_on_per_token_activations_and_used(monkeypatch):
    import ftq_plugins.transforms.smoothquant as smoothquant
    from ftq_core.errors import ConfigError
    from ftq_core.pipeline import quantize

    calls = []
    real = smoothquant.choose_alphas

    def spy(*args, **kwargs):
        calls.append(kwargs["per_token"])
        return {first: 1.0 for first in real(*args, **kwargs)}  # every group at alpha 1: not alpha 0.5's result

    monkeypatch.setattr(smoothquant, "choose_alphas", spy)
    calibration = token_blocks(6, 48, seed=3)
    ids = torch.stack(calibration[:4])
    results = {}
    for per_layer in (False, True):
        model = _with_outliers(make_tiny_llama())
        results[per_layer] = quantize(model, "dynamic", {"rotate": "false", "smoothquant_alpha": 0.5,
                                                         "smoothquant_per_layer": per_layer},
                                      calibration_data=calibration, calibration_batches=6)
    assert calls == [True]
    assert all("α per layer group" in row.scheme for row in results[True].layers
               if row.quantized and row.module_type == "Linear")
    assert not torch.equal(logits(results[True].model, ids), logits(results[False].model, ids))
    with pytest.raises(ConfigError, match="smoothquant_per_layer"):
        quantize(make_tiny_llama(), "dynamic", {"smoothquant_per_layer": True})
