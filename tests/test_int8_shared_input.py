"""Sibling int8 layers (q/k/v, gate/up) quantize their common input once, with unchanged outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from ftq_testing import make_tiny_gpt2, make_tiny_llama

import ftq_core
from ftq_core.artifacts import load_artifact, save_artifact
from ftq_core.plugins import Plugins
from ftq_plugins.int8 import kernels as int8_kernels
from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear
from ftq_plugins.int8.shared_input import clear, mark_shared_inputs

SIBLINGS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


def tokens(length: int = 20):
    return torch.randint(3, 512, (1, length), generator=torch.Generator().manual_seed(5))


def int8(model, kernel: str = "onednn"):
    return ftq_core.quantize(model, "dynamic", {"kernel": kernel, "attention_dtype": "float32"}).model.eval()


def unshared(model):
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, Int8DynamicLinear):
            module.share_input = False
    return copied


def test_the_probe_flags_exactly_the_layers_fed_one_tensor():
    llama = int8(make_tiny_llama())
    flagged = {name for name, m in llama.named_modules() if isinstance(m, Int8DynamicLinear) and m.share_input}
    int8_layers = {name for name, m in llama.named_modules() if isinstance(m, Int8DynamicLinear)}
    assert flagged == {name for name in int8_layers if name.rsplit(".", 1)[-1] in SIBLINGS}
    assert "o_proj" in str(int8_layers) and "down_proj" in str(int8_layers)  # present, and not flagged
    gpt2 = int8(make_tiny_gpt2())  # fused c_attn, one c_fc: no layer shares its input
    assert not any(m.share_input for m in gpt2.modules() if isinstance(m, Int8DynamicLinear))
    assert mark_shared_inputs(llama, Int8DynamicLinear) == len(flagged)


@pytest.mark.parametrize("kernel", ["onednn", "int-mm"])
@pytest.mark.parametrize("length", [20, 4], ids=["prefill-rows", "decode-rows"])
def test_outputs_are_bit_identical_to_quantizing_each_time(kernel, length):
    model = int8(make_tiny_llama(), kernel)
    reference = unshared(model)
    for mode in (torch.inference_mode, torch.no_grad):
        with mode():
            assert torch.equal(model(tokens(length)).logits, reference(tokens(length)).logits)


def test_siblings_reuse_the_codes(monkeypatch):
    """A forward quantizes 4 inputs per block (q/k/v once, o, gate/up once, down) instead of 7."""
    model = int8(make_tiny_llama(), "onednn")
    reference = unshared(model)  # copied before any forward packs weights (packed forms cannot be copied)
    calls = []
    # where oneDNN int8 is not usable (no AMX), the layers run int-mm, whose codes come from signed_codes
    quantize_fn = "onednn_codes" if int8_kernels.onednn_available() else "signed_codes"
    original = getattr(int8_kernels, quantize_fn)
    monkeypatch.setattr(int8_kernels, quantize_fn, lambda x2: calls.append(x2.shape) or original(x2))
    layers = model.config.num_hidden_layers
    with torch.inference_mode():
        model(tokens())
    assert len(calls) == 4 * layers + 1  # + lm_head
    calls.clear()
    with torch.inference_mode():
        reference(tokens())
    assert len(calls) == 7 * layers + 1


def test_an_input_changed_in_place_between_siblings_is_quantized_again():
    model = int8(make_tiny_llama(), "onednn")
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 12, model.config.hidden_size)
    clear()
    with torch.no_grad():  # tensors outside inference mode carry a version counter
        attn.q_proj(x)
        x.mul_(3)
        got = attn.k_proj(x)
        attn.k_proj.share_input = False
        expected = attn.k_proj(x)
    assert torch.equal(got, expected)


def test_the_flags_are_saved_and_restored(tmp_path, tiny_tokenizer):
    plugins = Plugins(load_entrypoints=False)
    model = ftq_core.quantize(make_tiny_llama(), "dynamic", {"kernel": "onednn"}, plugins=plugins).model
    save_artifact(model, tiny_tokenizer, tmp_path / "art", manifest={"method": "dynamic"}, plugins=plugins)
    loaded = load_artifact(tmp_path / "art", plugins=plugins).model
    flags = lambda m: {n: l.share_input for n, l in m.named_modules() if isinstance(l, Int8DynamicLinear)}  # noqa: E731
    assert flags(loaded) == flags(model) and any(flags(model).values())
    with torch.inference_mode():
        assert torch.equal(loaded(tokens()).logits, model(tokens()).logits)
