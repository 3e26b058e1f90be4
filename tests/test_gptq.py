"""GPTQ weight rounding: the codes it picks, and ``dynamic weight_rounding = gptq`` end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from quant_testing import relative_error, token_blocks
from test_rotation import make_model

import ftq_core
from ftq_core.errors import ConfigError, UsageError
from ftq_plugins.int8.numerics import quantize_per_channel_symmetric
from ftq_plugins.transforms.gptq import HessianCollector, gptq_codes


def _correlated_inputs(rows: int = 2048, width: int = 96) -> torch.Tensor:
    torch.manual_seed(0)
    mix = torch.randn(width, width) * 0.3 + torch.eye(width)
    return torch.randn(rows, width) @ mix * torch.linspace(0.1, 5.0, width)


def _output_error(x, weight, codes, scale) -> float:
    return relative_error(x @ (codes.float() * scale[:, None]).t(), x @ weight.t())


def test_gptq_keeps_the_nearest_scales_and_lowers_the_output_error_on_correlated_inputs():
    x = _correlated_inputs()
    weight = torch.randn(64, 96)
    codes, scale = gptq_codes(weight, x.t().double() @ x.double())
    nearest, nearest_scale = quantize_per_channel_symmetric(weight)
    assert codes.dtype is torch.int8 and codes.shape == weight.shape
    assert torch.equal(scale, nearest_scale)  # same int8 format, only the codes differ
    assert int(codes.abs().max()) <= 127
    assert _output_error(x, weight, codes, scale) < 0.75 * _output_error(x, weight, nearest, scale)


def test_gptq_on_uncorrelated_inputs_is_round_to_nearest_and_unused_inputs_get_zero():
    weight = torch.randn(16, 32)
    codes, _ = gptq_codes(weight, torch.eye(32, dtype=torch.float64))
    assert torch.equal(codes, quantize_per_channel_symmetric(weight)[0])
    hessian = torch.eye(32, dtype=torch.float64)
    hessian[5, 5] = 0.0  # an input channel that was always zero
    assert torch.all(gptq_codes(weight, hessian)[0][:, 5] == 0)


def test_the_hessian_collector_sums_x_transpose_x_of_what_the_layer_multiplies_and_siblings_share_one():
    first, sibling, other = torch.nn.Linear(8, 4), torch.nn.Linear(8, 6), torch.nn.Linear(8, 4)
    x = torch.randn(3, 5, 8)
    with HessianCollector({"a": first, "b": sibling, "c": other}, {"c": lambda v: 2 * v}) as collector:
        for _ in range(2):
            first(x)
            sibling(x)  # the same input tensor: one Hessian for both
            other(x)
    flat = x.reshape(-1, 8)
    torch.testing.assert_close(collector.hessians["a"], 2 * flat.t() @ flat)
    assert collector.hessians["b"] is collector.hessians["a"]
    torch.testing.assert_close(collector.hessians["c"], 2 * (2 * flat).t() @ (2 * flat))
    before = collector.hessians["a"].clone()
    first(x)  # hooks removed on exit
    assert torch.equal(collector.hessians["a"], before)


def test_dynamic_gptq_rotated_model_is_closer_to_float_and_round_trips(tmp_path, tiny_tokenizer):
    from ftq_core.artifacts import save_artifact
    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

    model = make_model(vocab_size=len(tiny_tokenizer), num_hidden_layers=2)
    calibration = token_blocks(8, 48, vocab=len(tiny_tokenizer))
    ids = torch.stack([calibration[i] for i in range(4)])

    def quantized(options):
        return ftq_core.quantize(copy.deepcopy(model), "dynamic", {"kernel": "int-mm", "rotate": "true", **options},
                                 calibration_data=calibration, calibration_batches=8)

    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    gptq, nearest = quantized({"weight_rounding": "gptq"}), quantized({})
    reports = {r.name: r.scheme for r in gptq.layers if r.quantized}
    assert all("GPTQ" in scheme for name, scheme in reports.items() if ".layers." in name)
    assert "GPTQ" not in reports["lm_head"]  # tied: the nearest codes, shared with the embeddings
    downs = [layer.mlp.down_proj for layer in gptq.model.model.layers]
    assert all(type(d) is Int8DynamicLinear and d.input_rotation_block == 128 for d in downs)
    # GPTQ changed the codes of down_proj (rotated input); a tied head keeps the nearest codes, shared with the embeddings
    for a, b in zip(downs, (layer.mlp.down_proj for layer in nearest.model.model.layers)):
        assert torch.equal(a.weight_scale, b.weight_scale) and not torch.equal(a.weight_int8, b.weight_int8)
    assert gptq.model.lm_head.weight_int8 is gptq.model.model.embed_tokens.weight_int8
    with torch.inference_mode():
        error_gptq = relative_error(gptq.model(input_ids=ids).logits, expected)
        error_nearest = relative_error(nearest.model(input_ids=ids).logits, expected)
    assert error_gptq < error_nearest, (error_gptq, error_nearest)
    save_artifact(gptq.model, tiny_tokenizer, tmp_path / "a", manifest={"method": "dynamic", "engine": None})
    loaded = ftq_core.load(tmp_path / "a").model
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, gptq.model(input_ids=ids).logits)


def test_dynamic_gptq_untied_head_rounds_the_head_too():
    model = make_model(num_hidden_layers=1)
    result = ftq_core.quantize(copy.deepcopy(model), "dynamic",
                               {"kernel": "int-mm", "weight_rounding": "gptq", "untie_head": True},
                               calibration_data=token_blocks(4, 32, vocab=512), calibration_batches=4)
    nearest = ftq_core.quantize(copy.deepcopy(model), "dynamic", {"kernel": "int-mm", "untie_head": True})
    assert result.model.lm_head.weight_int8 is not result.model.model.embed_tokens.weight_int8
    assert not torch.equal(result.model.lm_head.weight_int8, nearest.model.lm_head.weight_int8)


@pytest.mark.parametrize("options", [{"activation": "per-tensor"}, {"smoothquant_alpha": 0.5, "rotate": "false"}])
def test_dynamic_gptq_is_refused_where_it_has_no_per_token_layer_to_round(options):
    with pytest.raises(ConfigError, match="weight_rounding = 'gptq'"):
        ftq_core.quantize(make_model(num_hidden_layers=1), "dynamic", {"weight_rounding": "gptq", **options})


def test_dynamic_gptq_without_calibration_data_says_what_to_pass():
    with pytest.raises(UsageError, match="calibration"):
        ftq_core.quantize(make_model(num_hidden_layers=1), "dynamic", {"weight_rounding": "gptq"})


def test_static_default_gptq_rotated_model_is_closer_to_float_and_round_trips(tmp_path, tiny_tokenizer):
    from ftq_core.artifacts import save_artifact

    model = make_model(vocab_size=len(tiny_tokenizer), num_hidden_layers=2)
    calibration = token_blocks(8, 48, vocab=len(tiny_tokenizer))
    ids = torch.stack([calibration[i] for i in range(4)])

    def quantized(options):
        return ftq_core.quantize(copy.deepcopy(model), "static", {"rotate": "true", "ppl_budget": None, **options},
                                 calibration_data=calibration, calibration_batches=8)

    with torch.inference_mode():
        expected = model(input_ids=ids).logits
    gptq, nearest = quantized({}), quantized({"weight_rounding": "nearest"})  # auto: gptq on backend ftq
    # every Linear but the tied head, which keeps the nearest codes the int8 embeddings share with it
    assert all("GPTQ" in r.scheme for r in gptq.layers if r.quantized and r.module_type != "Embedding" and r.name != "lm_head")
    head = next(r for r in gptq.layers if r.name == "lm_head")
    assert head.quantized and "GPTQ" not in head.scheme
    assert gptq.model.lm_head.weight_int8 is gptq.model.model.embed_tokens.weight_int8
    assert not any("GPTQ" in r.scheme for r in nearest.layers)
    down, down_nearest = gptq.model.model.layers[0].mlp.down_proj, nearest.model.model.layers[0].mlp.down_proj
    assert down.input_rotation_block == 128 and torch.equal(down.input_scale, down_nearest.input_scale)
    assert not torch.equal(down.weight_int8, down_nearest.weight_int8)
    with torch.inference_mode():
        assert relative_error(gptq.model(input_ids=ids).logits, expected) < relative_error(
            nearest.model(input_ids=ids).logits, expected)
    save_artifact(gptq.model, tiny_tokenizer, tmp_path / "a", manifest={"method": "static", "engine": None})
    with torch.inference_mode():
        assert torch.equal(ftq_core.load(tmp_path / "a").model(input_ids=ids).logits, gptq.model(input_ids=ids).logits)


def test_static_gptq_is_refused_on_the_torch_ao_backend_whose_auto_rounds_to_nearest():
    with pytest.raises(ConfigError, match="backend = 'ftq'"):
        ftq_core.quantize(make_model(num_hidden_layers=1), "static", {"weight_rounding": "gptq", "backend": "torch-ao"})
    result = ftq_core.quantize(make_model(num_hidden_layers=1), "static", {"backend": "torch-ao", "ppl_budget": None},
                               calibration_data=token_blocks(4, 32, vocab=512), calibration_batches=4)
    assert result.layers and not any("GPTQ" in r.scheme for r in result.layers)


def test_dynamic_has_no_auto_weight_rounding():
    with pytest.raises(ConfigError, match="auto"):
        ftq_core.quantize(make_model(num_hidden_layers=1), "dynamic", {"weight_rounding": "auto"})


def test_dynamic_gptq_rounds_a_tied_head_when_the_embeddings_stay_float():
    model = make_model(num_hidden_layers=1)
    options = {"kernel": "int-mm", "quantize_embeddings": False}
    gptq = ftq_core.quantize(copy.deepcopy(model), "dynamic", {**options, "weight_rounding": "gptq"},
                             calibration_data=token_blocks(4, 32, vocab=512), calibration_batches=4)
    nearest = ftq_core.quantize(copy.deepcopy(model), "dynamic", options)
    assert not torch.equal(gptq.model.lm_head.weight_int8, nearest.model.lm_head.weight_int8)


def test_bundled_model_dynamic_gptq_untied_is_within_one_percent_on_held_out_text(bundled_model):
    """On held-out code (Python's stdlib, never calibrated on), GPTQ codes with the head untied keep the rotated
    int8 model within 1% of fp32 and closer to it than the nearest codes; calibration is the bundled sample."""
    import sysconfig
    from pathlib import Path

    from ftq_core.data import TokenBlocks
    from ftq_core.evaluation import perplexity
    from ftq_core.plugins import get_plugins

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "\n\n".join((stdlib / name).read_text(encoding="utf-8") for name in ("argparse.py", "textwrap.py"))
    blocks = TokenBlocks(bundled_model.tokenizer(text, return_tensors="pt").input_ids[0][:1024], 512)
    dataset = get_plugins().get("dataset", "text")
    sample = dataset.create(dataset.make_config({"block_size": 512})).build(bundled_model.tokenizer)
    fp32 = perplexity(bundled_model.model, blocks)[0]
    ppl = {}
    for rounding in ("nearest", "gptq"):
        result = ftq_core.quantize(copy.deepcopy(bundled_model.model), "dynamic",
                                   {"weight_rounding": rounding, "untie_head": True},
                                   calibration_data=sample.train, calibration_batches=8)
        ppl[rounding] = perplexity(result.model, blocks)[0]
    assert ppl["gptq"] / fp32 - 1 < 0.01, (fp32, ppl)
    assert ppl["gptq"] < ppl["nearest"], (fp32, ppl)
