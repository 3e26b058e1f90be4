"""The ``dynamic`` quantizer on tiny Llama and GPT-2 models: every path, keep_float, reports."""

from __future__ import annotations

import pytest
import torch
from ftq_testing import make_tiny_gpt2, make_tiny_llama

from ftq_core.errors import ConfigError
from ftq_core.layers import iter_linear_layers
from ftq_core.plugins import Plugins
from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear


def quantizer(options=None):
    component = Plugins(load_entrypoints=False).get("quantizer", "dynamic")
    return component.create(component.make_config(options or {}))


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def tokens():
    return torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_per_token_default_converts_every_linear_layer(make_model, tokens):
    model = make_model()
    with torch.no_grad():
        reference = model(tokens).logits
    candidates = [name for name, _ in iter_linear_layers(model)]
    q = quantizer()
    converted = q.convert(model)
    reports = [r for r in q.layer_report(converted) if r.name in candidates]
    assert [r.name for r in reports] == candidates and all(r.quantized for r in reports)
    # embeddings and norms are reported too, as float with the reason
    assert all(r.reason for r in q.layer_report(converted) if not r.quantized)
    assert list(iter_linear_layers(converted)) == []  # GPT-2 Conv1D too: none left in float
    assert all(isinstance(converted.get_submodule(n), Int8DynamicLinear) for n in candidates)
    with torch.no_grad():
        out = converted(tokens).logits
    assert relative_error(out, reference) < 0.05


@pytest.mark.parametrize("engine", [e for e in ("x86", "fbgemm", "onednn", "qnnpack") if e in torch.backends.quantized.supported_engines])
@pytest.mark.parametrize("weight", ["per-channel", "per-tensor"])
def test_torch_ao_per_tensor_path_each_engine(engine, weight, tokens):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model = make_tiny_llama()
    with torch.no_grad():
        reference = model(tokens).logits
    converted = quantizer({"activation": "per-tensor", "weight": weight, "engine": engine}).convert(model)
    assert isinstance(converted.model.layers[0].mlp.down_proj, DynamicLinear)
    assert torch.backends.quantized.engine == engine
    with torch.no_grad():
        out = converted(tokens).logits
    assert relative_error(out, reference) < 0.1


def test_float16_dynamic_path(tokens):
    model = make_tiny_llama()
    with torch.no_grad():
        reference = model(tokens).logits
    converted = quantizer({"activation": "per-tensor", "dtype": "float16"}).convert(model)
    with torch.no_grad():
        assert relative_error(converted(tokens).logits, reference) < 0.01


def test_keep_float_patterns_leave_layers_in_float_and_say_why():
    model = make_tiny_llama()
    q = quantizer({"keep_float": ["lm_head", "*.down_proj"]})
    converted = q.convert(model)
    assert type(converted.lm_head) is torch.nn.Linear
    assert type(converted.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(converted.model.layers[1].mlp.up_proj, Int8DynamicLinear)
    kept = {r.name: r.reason for r in q.layer_report(converted) if not r.quantized and r.module_type == "Linear"}
    assert kept == {
        "model.layers.0.mlp.down_proj": "user exclusion: keep_float '*.down_proj'",
        "model.layers.1.mlp.down_proj": "user exclusion: keep_float '*.down_proj'",
        "lm_head": "user exclusion: keep_float 'lm_head'",
    }


def test_contradictory_options_are_all_reported():
    component = Plugins(load_entrypoints=False).get("quantizer", "dynamic")
    with pytest.raises(ConfigError) as info:
        component.make_config({"dtype": "float16", "weight": "per-tensor", "engine": "tpu"})
    text = str(info.value)
    assert "engine: must be one of" in text
    assert "float16" in text and "per-tensor" in text


def test_int8_linear_matches_integer_reference():
    """The int8 GEMM result equals an exact integer computation of the same quantized values."""
    from ftq_plugins.int8.numerics import quantize_per_token_symmetric

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q = Int8DynamicLinear.from_float(linear)
    x = torch.randn(5, 7, 64)
    xq, xs = quantize_per_token_symmetric(x.reshape(-1, 64))
    exact = (xq.long() @ q.weight_int8.long().t()).double() * xs.double() * q.weight_scale.double() + q.bias.double()
    assert torch.allclose(q(x).reshape(-1, 48).double(), exact, rtol=1e-5, atol=1e-5)
    assert relative_error(q(x), linear(x)) < 0.02
