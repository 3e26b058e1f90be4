"""The residual-stream rotation: exact in float, refused where it does not fold, saved and decoded as any int8 model."""

from __future__ import annotations

import copy

import pytest
import torch

import ftq_core
from ftq_core.errors import UsageError
from ftq_plugins.transforms.rotation import random_orthogonal, rotate_residual_stream


def make_model(model_type: str = "llama", **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    settings = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
    )
    settings.update(overrides)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **settings)).eval()
    with torch.no_grad():  # norms of non-unit weight, so that folding them is tested
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def test_the_rotation_is_orthogonal_and_seeded():
    q = random_orthogonal(48, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(48, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, random_orthogonal(48, seed=3)) and not torch.equal(q, random_orthogonal(48, seed=4))


@pytest.mark.parametrize("model_type, overrides", [
    ("llama", {}), ("llama", {"tie_word_embeddings": False}), ("qwen2", {}), ("mistral", {"sliding_window": None}),
], ids=["llama-tied", "llama-untied", "qwen2", "mistral"])
def test_rotated_float_model_computes_the_same_function(model_type, overrides):
    model = make_model(model_type, **overrides)
    expected = logits(model, IDS)
    rotated = copy.deepcopy(model)
    report = rotate_residual_stream(rotated)
    torch.testing.assert_close(logits(rotated, IDS), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    assert report.untied_head is overrides.get("tie_word_embeddings", True)
    assert rotated.lm_head.weight is not rotated.model.embed_tokens.weight and not rotated.config.tie_word_embeddings
    assert all(bool((norm.weight == 1).all()) for name, norm in rotated.named_modules() if name.endswith("norm"))
    # the weights really changed: the stream is rotated, not left alone
    assert not torch.allclose(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_gpt2_and_quantized_models_are_refused_with_the_reason():
    from ftq_testing import make_tiny_gpt2

    gpt2 = make_tiny_gpt2()
    before = copy.deepcopy(gpt2.state_dict())
    with pytest.raises(UsageError, match="model type 'gpt2'.*LayerNorm.*Unset rotate"):
        rotate_residual_stream(gpt2)
    assert all(torch.equal(before[k], v) for k, v in gpt2.state_dict().items())  # untouched
    int8 = ftq_core.quantize(make_model(), "dynamic", {"kernel": "int-mm"}).model
    with pytest.raises(UsageError, match="rotate the float model, before quantizing"):
        rotate_residual_stream(int8)
    with pytest.raises(UsageError, match="model type 'gpt2'"):
        ftq_core.quantize(make_tiny_gpt2(), "dynamic", {"rotate": True})


def test_rotate_and_smoothquant_are_one_or_the_other():
    from ftq_core.errors import ConfigError
    from ftq_plugins.quantizers.dynamic import DynamicQuantConfig

    with pytest.raises(ConfigError, match="rotate and smoothquant_alpha"):
        DynamicQuantConfig(rotate=True, smoothquant_alpha=0.5)


def test_rotated_int8_model_saves_loads_and_decodes_fused(tmp_path, tiny_tokenizer):
    from ftq_core.artifacts import save_artifact
    from ftq_core.attention import set_attention_dtype
    from ftq_core.generation import DecodeLoop, choose_loop, greedy_generate

    model = make_model(vocab_size=len(tiny_tokenizer))
    result = ftq_core.quantize(model, "dynamic", {"rotate": True, "kernel": "int-mm"})
    assert any("rotated residual stream" in report.scheme for report in result.layers)
    ids = torch.randint(3, len(tiny_tokenizer), (1, 10), generator=torch.Generator().manual_seed(2))
    save_artifact(result.model, tiny_tokenizer, tmp_path / "a", manifest={"method": "dynamic", "engine": None})
    loaded = ftq_core.load(tmp_path / "a").model
    assert not loaded.config.tie_word_embeddings
    assert [layer.mlp.down_proj.input_rotation_block for layer in loaded.model.layers] == [128, 128]
    torch.testing.assert_close(logits(loaded, ids), logits(result.model, ids), atol=0, rtol=0)
    set_attention_dtype(loaded, None)
    if choose_loop(loaded) is DecodeLoop.FUSED:
        assert torch.equal(greedy_generate(loaded, ids, max_new_tokens=6, eos_token_id=[], loop="fused"),
                           greedy_generate(loaded, ids, max_new_tokens=6, eos_token_id=[], loop="lean"))


@pytest.mark.slow
def test_bundled_model_rotation_lowers_held_out_int8_loss(bundled_model):
    """On held-out legal text the rotated int8 model stays closer to fp32 than the unrotated one."""
    import sysconfig
    from pathlib import Path

    from ftq_core.data import TokenBlocks
    from ftq_core.evaluation import perplexity

    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")
    ids = bundled_model.tokenizer(text, return_tensors="pt").input_ids[0][:1024]
    blocks = TokenBlocks(ids, 512)
    fp32 = perplexity(bundled_model.model, blocks)[0]
    plain = perplexity(ftq_core.quantize(copy.deepcopy(bundled_model.model), "dynamic", {}).model, blocks)[0]
    rotated = perplexity(ftq_core.quantize(copy.deepcopy(bundled_model.model), "dynamic", {"rotate": True}).model, blocks)[0]
    assert abs(rotated / fp32 - 1) < abs(plain / fp32 - 1) / 1.5, (fp32, plain, rotated)


def test_block_hadamard_is_the_orthogonal_sylvester_matrix_and_its_own_inverse():
    from ftq_plugins.int8.hadamard import block_hadamard, hadamard_block

    assert (hadamard_block(1536), hadamard_block(576), hadamard_block(96)) == (512, 64, 0)
    sylvester = torch.ones(1, 1)
    while sylvester.shape[0] < 64:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    x = torch.randn(5, 128, dtype=torch.float64)
    expected = torch.cat([x[:, :64] @ sylvester.double(), x[:, 64:] @ sylvester.double()], 1) / 8
    torch.testing.assert_close(block_hadamard(x, 64), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(block_hadamard(block_hadamard(x, 64), 64), x, atol=1e-12, rtol=0)


def test_an_int8_layer_with_a_rotated_input_computes_the_float_layer_and_trains_through():
    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48)
    plain = Int8DynamicLinear.from_float(linear, kernel="int-mm")
    rotated = Int8DynamicLinear.from_float(linear, kernel="int-mm", input_rotation_block=128)
    assert rotated.input_rotation_block == 128 and rotated.kernel_meta()["input_rotation_block"] == 128
    x = torch.randn(7, 256)
    x[:, 3] *= 40  # an outlier channel, which the rotation spreads
    with torch.no_grad():
        reference = linear(x)
        error_plain = (plain(x) - reference).norm() / reference.norm()
        error_rotated = (rotated(x) - reference).norm() / reference.norm()
    assert error_rotated < error_plain
    torch.testing.assert_close(rotated.dequantized_weight(), linear.weight.detach(), atol=float(rotated.weight_scale.max()), rtol=0)
    before = rotated.weight_int8.clone()
    rotated.requantize(rotated.dequantized_weight())  # the original basis in, the same codes back
    assert (rotated.weight_int8.int() - before.int()).abs().max() <= 1
    xg = x.clone().requires_grad_(True)
    rotated(xg).sum().backward()
    torch.testing.assert_close(xg.grad, linear.weight.detach().sum(0).expand(7, -1), atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="power of two dividing 256"):
        Int8DynamicLinear(256, 8, input_rotation_block=96)
