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
    ("qwen3", {"head_dim": 16}),
], ids=["llama-tied", "llama-untied", "qwen2", "mistral", "qwen3"])
def test_rotated_float_model_computes_the_same_function(model_type, overrides):
    model = make_model(model_type, **overrides)
    expected = logits(model, IDS)
    rotated = copy.deepcopy(model)
    report = rotate_residual_stream(rotated)
    torch.testing.assert_close(logits(rotated, IDS), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    from ftq_plugins.transforms.rotated_norm import RotatedRMSNorm

    tied = overrides.get("tie_word_embeddings", True)
    assert report.final_norm_matrix is tied
    # a tied head stays tied (one embedding-sized matrix), the final norm's weight in a matrix instead
    assert (rotated.lm_head.weight is rotated.model.embed_tokens.weight) is tied
    assert bool(rotated.config.tie_word_embeddings) is tied
    assert isinstance(rotated.model.norm, RotatedRMSNorm) is tied
    # the residual stream's norms (Qwen3's per-head q/k norms act after the projections, outside the stream)
    stream_norm = lambda name: name.endswith("norm") and not name.endswith(("q_norm", "k_norm"))  # noqa: E731
    norms = [norm for name, norm in rotated.named_modules() if stream_norm(name) and hasattr(norm, "weight")]
    assert len(norms) == 2 * len(rotated.model.layers) + (not tied)
    # each norm is left a uniform gain (commutes with the rotation), at its old weight's scale
    assert all(bool((norm.weight == norm.weight[0]).all()) for norm in norms)
    originals = dict(model.named_modules())
    for name, norm in rotated.named_modules():
        if stream_norm(name) and hasattr(norm, "weight"):
            old = originals[name].weight.detach()
            torch.testing.assert_close(norm.weight[0], old.square().mean().sqrt(), rtol=1e-6, atol=0)
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
        ftq_core.quantize(make_tiny_gpt2(), "dynamic", {"rotate": "true"})


def test_rotate_and_smoothquant_are_one_or_the_other():
    from ftq_core.errors import ConfigError
    from ftq_plugins.quantizers.dynamic import DynamicQuantConfig
    from ftq_plugins.quantizers.options import Rotation

    with pytest.raises(ConfigError, match="rotate and smoothquant_alpha"):
        DynamicQuantConfig(rotate=Rotation.ON, smoothquant_alpha=0.5)


def test_rotated_int8_model_saves_loads_and_decodes_fused(tmp_path, tiny_tokenizer):
    from ftq_core.artifacts import save_artifact
    from ftq_core.attention import set_attention_dtype
    from ftq_core.generation import DecodeLoop, choose_loop, greedy_generate

    model = make_model(vocab_size=len(tiny_tokenizer))
    result = ftq_core.quantize(model, "dynamic", {"rotate": "true", "kernel": "int-mm"})
    assert any("rotated residual stream" in report.scheme for report in result.layers)
    ids = torch.randint(3, len(tiny_tokenizer), (1, 10), generator=torch.Generator().manual_seed(2))
    save_artifact(result.model, tiny_tokenizer, tmp_path / "a", manifest={"method": "dynamic", "engine": None})
    loaded = ftq_core.load(tmp_path / "a").model
    assert loaded.config.tie_word_embeddings  # the head still shares the embedding's int8 codes
    assert loaded.lm_head.weight_int8 is loaded.model.embed_tokens.weight_int8
    assert torch.equal(loaded.model.norm.matrix, result.model.model.norm.matrix)
    assert [layer.mlp.down_proj.input_rotation_block for layer in loaded.model.layers] == [128, 128]
    torch.testing.assert_close(logits(loaded, ids), logits(result.model, ids), atol=0, rtol=0)
    set_attention_dtype(loaded, None)
    if choose_loop(loaded) is DecodeLoop.FUSED:
        assert torch.equal(greedy_generate(loaded, ids, max_new_tokens=6, eos_token_id=[], loop="fused"),
                           greedy_generate(loaded, ids, max_new_tokens=6, eos_token_id=[], loop="lean"))


def test_rotated_int8_model_exports_to_a_float_directory_transformers_loads(tmp_path, tiny_tokenizer):
    """The final-norm matrix goes back into an untied head: transformers' Llama computes what the artifact does."""
    from transformers import AutoModelForCausalLM

    from ftq_core.artifacts import save_artifact

    model = make_model(vocab_size=len(tiny_tokenizer))
    result = ftq_core.quantize(model, "dynamic", {"rotate": "true", "kernel": "int-mm"})
    save_artifact(result.model, tiny_tokenizer, tmp_path / "a", manifest={"method": "dynamic", "engine": None})
    ftq_core.export(tmp_path / "a", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False).eval()
    assert not exported.config.tie_word_embeddings and exported.lm_head.weight is not exported.model.embed_tokens.weight
    assert bool((exported.model.norm.weight == 1).all())
    ids = torch.randint(3, len(tiny_tokenizer), (1, 10), generator=torch.Generator().manual_seed(2))
    int8 = logits(result.model, ids)
    error = ((logits(exported, ids) - int8).norm() / int8.norm()).item()
    assert error < 0.05, error  # activation rounding only


@pytest.mark.slow
def test_bundled_model_default_dynamic_rotates_and_holds_on_held_out_text(bundled_model):
    """On held-out legal text (no calibration anywhere) ``dynamic``'s defaults rotate the model, stay within 2%
    of fp32, and lose well under what the unrotated int8 model loses."""
    import sysconfig
    from pathlib import Path

    from ftq_core.data import TokenBlocks
    from ftq_core.evaluation import perplexity

    text = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text(encoding="utf-8")
    ids = bundled_model.tokenizer(text, return_tensors="pt").input_ids[0][:1024]
    blocks = TokenBlocks(ids, 512)
    fp32 = perplexity(bundled_model.model, blocks)[0]
    plain = perplexity(ftq_core.quantize(copy.deepcopy(bundled_model.model), "dynamic", {"rotate": False}).model, blocks)[0]
    default = ftq_core.quantize(copy.deepcopy(bundled_model.model), "dynamic", {})
    assert any("rotated residual stream" in layer.scheme for layer in default.layers)
    rotated = perplexity(default.model, blocks)[0]
    assert rotated / fp32 - 1 < 0.02, (fp32, plain, rotated)
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


def test_static_rotate_saves_loads_and_calibrates_the_rotated_inputs(tmp_path, tiny_tokenizer):
    """``static rotate``: every down_proj rotates its input online, calibrated on what it will see; the artifact
    reloads bit for bit, and the model stays close to float."""
    from quant_testing import relative_error, token_blocks

    from ftq_core.artifacts import save_artifact
    from ftq_plugins.int8.w8a8_linear import Int8W8A8Linear

    model = make_model(vocab_size=len(tiny_tokenizer))
    ids = torch.randint(3, len(tiny_tokenizer), (1, 24), generator=torch.Generator().manual_seed(2))
    expected = logits(model, ids)
    result = ftq_core.quantize(copy.deepcopy(model), "static", {"rotate": "true", "smoothquant_alpha": None,
                                                                 "ppl_budget": None},
                               calibration_data=token_blocks(4, 32, vocab=len(tiny_tokenizer)), calibration_batches=4)
    downs = [layer.mlp.down_proj for layer in result.model.model.layers]
    assert all(type(d) is Int8W8A8Linear and d.input_rotation_block == 128 for d in downs)
    assert result.model.model.layers[0].self_attn.q_proj.input_rotation_block == 0
    assert relative_error(logits(result.model, ids), expected) < 0.1
    save_artifact(result.model, tiny_tokenizer, tmp_path / "a", manifest={"method": "static", "engine": None})
    loaded = ftq_core.load(tmp_path / "a").model
    assert [layer.mlp.down_proj.input_rotation_block for layer in loaded.model.layers] == [128, 128]
    assert torch.equal(logits(loaded, ids), logits(result.model, ids))


def test_static_rotate_is_refused_with_smoothquant():
    from ftq_core.errors import ConfigError
    from ftq_plugins.quantizers.options import Rotation
    from ftq_plugins.quantizers.static import StaticQuantConfig

    with pytest.raises(ConfigError, match="rotate and smoothquant_alpha"):
        StaticQuantConfig(rotate=Rotation.ON, smoothquant_alpha=0.5)


def test_a_quant_boundary_with_a_rotated_input_is_the_float_layer_in_float():
    from ftq_plugins.int8.quant_boundary import QuantBoundary, float_linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48)
    x = torch.randn(5, 256)
    boundary = QuantBoundary(float_linear(linear, None, 128), None, 128)  # stubs are identities until prepared
    assert torch.allclose(boundary(x), linear(x), atol=1e-5)
    assert "128-wide Hadamard" in repr(boundary)
    with pytest.raises(ValueError, match="not both"):
        QuantBoundary(float_linear(linear), torch.ones(256), 128)


def test_static_torch_ao_rotates_and_round_trips(tmp_path, tiny_tokenizer):
    from quant_testing import relative_error, token_blocks

    from ftq_core.artifacts import save_artifact
    from ftq_plugins.int8.quant_boundary import QuantBoundary

    model = make_model(vocab_size=len(tiny_tokenizer))
    ids = torch.randint(3, len(tiny_tokenizer), (1, 24), generator=torch.Generator().manual_seed(2))
    expected = logits(model, ids)
    result = ftq_core.quantize(copy.deepcopy(model), "static", {"backend": "torch-ao", "engine": "fbgemm",
                                                                 "ppl_budget": None},
                               calibration_data=token_blocks(4, 32, vocab=len(tiny_tokenizer)), calibration_batches=4)
    downs = [layer.mlp.down_proj for layer in result.model.model.layers]
    assert all(type(d) is QuantBoundary and d.input_rotation_block == 128 for d in downs)  # rotate = auto
    assert relative_error(logits(result.model, ids), expected) < 0.2
    save_artifact(result.model, tiny_tokenizer, tmp_path / "a", manifest={"method": "static", "engine": "fbgemm"})
    loaded = ftq_core.load(tmp_path / "a").model
    assert [layer.mlp.down_proj.input_rotation_block for layer in loaded.model.layers] == [128, 128]
    assert torch.equal(logits(loaded, ids), logits(result.model, ids))


def test_a_static_int8_layer_with_a_rotated_input_computes_the_float_layer():
    from ftq_plugins.int8.hadamard import block_hadamard
    from ftq_plugins.int8.w8a8_linear import ActivationMode, Int8W8A8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 48)
    x = torch.randn(7, 256)
    x[:, 3] *= 40  # an outlier channel: one static scale per tensor must cover it, unless it is spread
    rotated_absmax = float(block_hadamard(x, 128).abs().max())
    plain = Int8W8A8Linear.from_float(linear, mode=ActivationMode.STATIC, input_absmax=float(x.abs().max()))
    rotated = Int8W8A8Linear.from_float(linear, mode=ActivationMode.STATIC, input_absmax=rotated_absmax,
                                        input_rotation_block=128)
    with torch.no_grad():
        reference = linear(x)
        assert (rotated(x) - reference).norm() < (plain(x) - reference).norm()
        torch.testing.assert_close(rotated.dequantized_weight(), linear.weight, atol=2e-2 * float(linear.weight.abs().max()), rtol=0)


def test_rotate_auto_picks_rotation_smoothquant_or_neither_and_says_which():
    """``auto``: rotation for Llama-family models unless SmoothQuant is asked for; static falls back to
    SmoothQuant α=0.5 where the model cannot be rotated, dynamic stays calibration-free."""
    from ftq_testing import make_tiny_gpt2
    from quant_testing import token_blocks

    calibration = {"calibration_data": token_blocks(), "calibration_batches": 2}

    def schemes(model, name, options, **kwargs):
        result = ftq_core.quantize(model, name, {"ppl_budget": None, **options} if name == "static" else options, **kwargs)
        return {layer.scheme for layer in result.layers if layer.quantized and "weight," in layer.scheme}

    assert all("rotated" in s for s in schemes(make_model(), "static", {}, **calibration))
    assert all("SmoothQuant α=0.5" in s and "rotated" not in s for s in schemes(make_tiny_gpt2(), "static", {}, **calibration))
    smoothed = schemes(make_model(), "static", {"smoothquant_alpha": 0.3}, **calibration)
    assert all("SmoothQuant α=0.3" in s and "rotated" not in s for s in smoothed)
    assert all("rotated" not in s and "SmoothQuant" not in s for s in schemes(make_tiny_gpt2(), "dynamic", {}))
    with pytest.raises(UsageError, match="model type 'gpt2'"):
        ftq_core.quantize(make_tiny_gpt2(), "static", {"rotate": True}, **calibration)


def test_a_hadamard_matrix_first_built_under_inference_mode_still_trains():
    from ftq_plugins.int8.hadamard import _sylvester, block_hadamard

    _sylvester.cache_clear()
    with torch.inference_mode():
        block_hadamard(torch.randn(2, 256), 256)  # an int8 model's inference builds and caches the matrix
    x = torch.randn(2, 256, requires_grad=True)
    block_hadamard(x, 256).square().sum().backward()  # a rotated QAT layer reuses it under autograd
    torch.testing.assert_close(x.grad, 2 * x.detach(), rtol=1e-5, atol=1e-5)  # H H = I
