"""Linear layers found by what they compute, not by their exact type: Falcon's FalconLinear is quantized
and takes LoRA; fake-quant Linear subclasses (torch.ao QAT) are not mistaken for plain ones."""

from __future__ import annotations

import copy

import pytest
import torch

import ftq_core
from ftq_core.layers import is_linear_like, iter_linear_layers


def tiny_falcon():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("falcon", vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False)
    return AutoModelForCausalLM.from_config(config).eval()


def _falcon_projections(model) -> dict[str, torch.nn.Module]:
    return {name: module for name, module in model.named_modules() if type(module).__name__ == "FalconLinear"}


def test_falcons_linear_subclass_is_found():
    model = tiny_falcon()
    projections = _falcon_projections(model)
    assert projections, "this transformers' Falcon has no FalconLinear any more: the test needs another subclass"
    found = dict(iter_linear_layers(model))
    assert set(projections) <= set(found)


def test_every_falcon_projection_becomes_int8_and_the_report_says_so():
    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

    model = tiny_falcon()
    names = set(_falcon_projections(model))
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    result = ftq_core.quantize(copy.deepcopy(model), "dynamic", {"kernel": "int-mm"})
    for name in names:
        assert isinstance(result.model.get_submodule(name), Int8DynamicLinear), name
    reported = {r.name for r in result.layers if r.quantized}
    assert names <= reported
    # nothing Linear-like is left float unless the report names it
    left = {name for name, _ in iter_linear_layers(result.model)}
    assert left <= {r.name for r in result.layers if not r.quantized}
    with torch.no_grad():
        got = result.model(input_ids=ids).logits
    assert float((got - expected).norm() / expected.norm()) < 0.1


def test_lora_attaches_to_an_int8_falcon():
    from ftq_plugins.adapters.lora import LoraAdapter, LoraOptions

    int8 = ftq_core.quantize(tiny_falcon(), "dynamic", {"kernel": "int-mm"}).model
    adapted = LoraAdapter(LoraOptions(rank=4)).attach(int8)
    trainable = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert any("query_key_value" in name for name in trainable)


def test_a_fake_quant_subclass_is_not_taken_for_a_plain_linear():
    from torch.ao.nn.qat import Linear as QATLinear
    from torch.ao.quantization import get_default_qat_qconfig

    float_linear = torch.nn.Linear(8, 4)
    float_linear.qconfig = get_default_qat_qconfig("fbgemm")
    qat = QATLinear.from_float(float_linear)
    assert not is_linear_like(qat)

    class Doubled(torch.nn.Linear):  # overrides forward with something else
        def forward(self, x):
            return 2 * super().forward(x)

    class Same(torch.nn.Linear):  # overrides forward with the same function
        def forward(self, x):
            return x @ self.weight.T + self.bias

    assert not is_linear_like(Doubled(8, 4)) and is_linear_like(Same(8, 4))
    meta = Same(8, 4, device="meta")
    assert not is_linear_like(meta)  # nothing to probe: left alone rather than guessed


@pytest.mark.parametrize("subclass_forward", [False, True])
def test_a_probe_never_reaches_forward_hooks(subclass_forward):
    class Same(torch.nn.Linear):
        if subclass_forward:
            def forward(self, x):
                return torch.nn.functional.linear(x, self.weight, self.bias)

    layer, seen = Same(8, 4), []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args))
    assert is_linear_like(layer) and seen == []
