"""The quantizer through ftq's API: layer choice, reports, config checks, saving and loading."""

from __future__ import annotations

import pytest
import torch

import ftq_core
from ftq_core.artifacts import load_artifact, save_artifact
from ftq_core.errors import ConfigError
from ftq_weight_only.linear import Int8WeightOnlyLinear

QUANTIZER = "int8-weight-only"


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def test_registers_through_the_plugin_hooks(plugins):
    info = plugins.infos["weight-only"]
    assert plugins.get("quantizer", QUANTIZER).plugin == "weight-only"
    assert info.components == {"quantizer": [QUANTIZER]}
    assert "ftq-weight-only.int8_linear" in plugins.codecs()
    assert info.api_version == 1


def test_quantizes_every_linear_but_the_tied_lm_head(plugins, tiny_llama):
    ids = torch.randint(0, 256, (1, 24))
    before = _logits(tiny_llama, ids)
    result = ftq_core.quantize(tiny_llama, QUANTIZER, plugins=plugins)
    by_name = {layer.name: layer for layer in result.layers}
    assert not by_name["lm_head"].quantized and "tied to model.embed_tokens.weight" in by_name["lm_head"].reason
    quantized = [layer for layer in result.layers if layer.quantized]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert all(type(result.model.get_submodule(layer.name)) is Int8WeightOnlyLinear for layer in quantized)
    assert result.model.lm_head.weight is result.model.model.embed_tokens.weight  # still tied
    after = _logits(result.model, ids)
    assert (after - before).norm() / before.norm() < 0.02


def test_untied_lm_head_is_quantized_and_keep_float_is_honoured(plugins, tiny_llama_untied):
    result = ftq_core.quantize(tiny_llama_untied, QUANTIZER, {"keep_float": ["*.down_proj"]}, plugins=plugins)
    by_name = {layer.name: layer for layer in result.layers}
    assert by_name["lm_head"].quantized
    assert not by_name["model.layers.0.mlp.down_proj"].quantized
    assert by_name["model.layers.0.mlp.down_proj"].reason == "keep_float '*.down_proj'"


def test_gpt2_conv1d_layers(plugins, tiny_gpt2):
    ids = torch.randint(0, 256, (1, 16))
    before = _logits(tiny_gpt2, ids)
    result = ftq_core.quantize(tiny_gpt2, QUANTIZER, plugins=plugins)
    assert sum(layer.quantized for layer in result.layers) == 2 * 4  # c_attn, c_proj, c_fc, mlp c_proj
    after = _logits(result.model, ids)
    assert (after - before).norm() / before.norm() < 0.02


def test_config_problems_are_reported_together(plugins):
    component = plugins.get("quantizer", QUANTIZER)
    with pytest.raises(ConfigError) as caught:
        component.make_config({"compute_dtype": "float16", "kernel_max_tokens": -1, "keep_flot": "lm_head"})
    text = str(caught.value)
    assert "compute_dtype" in text and "'bfloat16', 'float32'" in text
    assert "kernel_max_tokens must be an integer >= 0" in text
    assert "did you mean 'keep_float'" in text


def test_artifact_saves_and_loads_through_the_codec(plugins, tiny_llama, tmp_path):
    ids = torch.randint(0, 256, (1, 20))
    float_bytes = sum(p.numel() * p.element_size() for p in tiny_llama.parameters())
    result = ftq_core.quantize(tiny_llama, QUANTIZER, {"kernel_max_tokens": 8}, plugins=plugins)
    expected = _logits(result.model, ids)
    directory = save_artifact(result.model, None, tmp_path / "model", manifest={"method": QUANTIZER}, plugins=plugins)
    loaded = load_artifact(directory, plugins=plugins)
    layer = loaded.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer) is Int8WeightOnlyLinear and layer.kernel_max_tokens == 8
    assert loaded.manifest["modules"]["model.layers.0.self_attn.q_proj"]["codec"] == "ftq-weight-only.int8_linear"
    torch.testing.assert_close(_logits(loaded.model, ids), expected)
    # The int8 weights are stored as int8: the artifact is well under the float model.
    assert (directory / "model.safetensors").stat().st_size < 0.8 * float_bytes
