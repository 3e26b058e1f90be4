"""The ``static`` quantizer on tiny Llama and GPT-2 models: coverage, accuracy, artifacts, errors."""

from __future__ import annotations

import pytest
import torch
from ftq_testing import make_tiny_gpt2, make_tiny_llama
from quant_testing import assert_every_layer_reported, logits, relative_error, token_blocks

from ftq_core.errors import ConfigError, UsageError
from ftq_core.pipeline import quantize

FAMILIES = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


def _quantized_type(options):
    if options.get("backend") == "torch-ao":
        from ftq_plugins.int8.quant_boundary import QuantBoundary

        return QuantBoundary
    from ftq_plugins.int8.w8a8_linear import Int8W8A8Linear

    return Int8W8A8Linear


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"smoothquant_alpha": None, "ppl_budget": None, "observer": "histogram"},
        {"backend": "torch-ao", "engine": "x86", "ppl_budget": None},
        {"backend": "torch-ao", "engine": "qnnpack", "observer": "moving-average", "ppl_budget": None},
    ],
    ids=["ftq-default", "ftq-histogram-plain", "torch-ao-x86", "torch-ao-qnnpack"],
)
def test_static_quantizes_every_linear_and_stays_close(family, options):
    model = FAMILIES[family]()
    ids = token_blocks(1, 48, seed=7)[0][None]
    expected = logits(model, ids)
    reference = FAMILIES[family]()  # an untouched copy to list the layers
    result = quantize(model, "static", options, calibration_data=token_blocks(), calibration_batches=4)
    by_name = assert_every_layer_reported(reference, result.layers, _quantized_type(options))
    quantized_type = _quantized_type(options)
    for name, row in by_name.items():
        if row.module_type in ("Linear", "Conv1D"):
            module = result.model.get_submodule(name)
            assert row.quantized == isinstance(module, quantized_type), name
    assert sum(row.quantized for row in result.layers) >= 9  # every Linear/Conv1D of the tiny models
    assert relative_error(logits(result.model, ids), expected) < 0.15


def test_gpt2_conv1d_layers_are_quantized():
    result = quantize(make_tiny_gpt2(), "static", {"ppl_budget": None}, calibration_data=token_blocks(), calibration_batches=2)
    conv = [row for row in result.layers if row.module_type == "Conv1D"]
    assert len(conv) == 8 and all(row.quantized for row in conv)


def test_keep_float_is_reported_as_user_exclusion():
    result = quantize(make_tiny_llama(), "static", {"keep_float": ("lm_head",), "ppl_budget": None},
                      calibration_data=token_blocks(), calibration_batches=2)
    row = next(row for row in result.layers if row.name == "lm_head")
    assert not row.quantized and "user exclusion" in row.reason
    assert isinstance(result.model.lm_head, torch.nn.Linear)


@pytest.mark.parametrize("backend", ["ftq", "torch-ao"])
def test_static_artifact_round_trip_gives_identical_outputs(backend, tmp_path):
    from ftq_core.artifacts import save_artifact
    from ftq_core.pipeline import load

    result = quantize(make_tiny_llama(), "static", {"backend": backend, "ppl_budget": None},
                      calibration_data=token_blocks(), calibration_batches=2)
    ids = token_blocks(1, 40, seed=3)[0][None]
    before = logits(result.model, ids)
    save_artifact(result.model, None, tmp_path / "art", manifest={"method": "static", "engine": result.engine})
    loaded = load(tmp_path / "art")
    assert torch.equal(logits(loaded.model, ids), before)
    assert type(loaded.model.model.layers[0].self_attn.q_proj) is type(result.model.model.layers[0].self_attn.q_proj)


def test_static_needs_calibration_data():
    with pytest.raises(UsageError, match="calibration"):
        quantize(make_tiny_llama(), "static", {})


def test_static_config_errors_are_reported_together():
    with pytest.raises(ConfigError) as info:
        quantize(make_tiny_llama(), "static", {"weight": "per-tensor", "smoothquant_alpha": 2.0, "ppl_budget": -1})
    text = str(info.value)
    assert "per-channel" in text and "smoothquant_alpha" in text and "ppl_budget" in text


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_torch_ao_outputs_are_requantized_over_the_whole_range_they_reached_in_calibration(engine):
    """Each torch.ao layer's requantized output keeps its calibrated minmax range on all 8 bits (no clipped
    peaks, no 7-bit range), whatever the input observer; inputs keep the engine's rule."""
    import copy

    model = make_tiny_llama()
    calibration = token_blocks(4, 32)
    name = "model.layers.0.mlp.up_proj"
    seen = []
    float_model = copy.deepcopy(model)
    float_model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        for ids in calibration:
            float_model(input_ids=ids[None])
    outputs = torch.cat([s.flatten() for s in seen])
    low, high = min(float(outputs.min()), 0.0), max(float(outputs.max()), 0.0)
    result = quantize(model, "static", {"backend": "torch-ao", "engine": engine, "rotate": "false", "ppl_budget": None,
                                        "observer": "histogram"},
                      calibration_data=calibration, calibration_batches=4)
    layer = result.model.get_submodule(name).module  # torch.ao's quantized Linear inside the boundary
    assert float(layer.scale) == pytest.approx((high - low) / 255, rel=1e-5)
