"""The ``qat-int8`` quantizer: fake-quant numerics, bf16 autocast, conversion to the int8 kernel."""

from __future__ import annotations

import pytest
import torch
from ftq_testing import make_tiny_gpt2, make_tiny_llama
from quant_testing import assert_every_layer_reported

from ftq_core.errors import ConfigError
from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear
from ftq_plugins.int8.numerics import quantize_per_channel_symmetric, quantize_per_token_symmetric
from ftq_plugins.qat.fake_quant import Int8QATLinear, fake_quant_rows, fake_quant_rows_ste
from ftq_plugins.quantizers.qat_int8 import QATInt8Config, QATInt8Quantizer


def _inputs(rows: int = 37, cols: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=generator) * torch.rand(rows, 1, generator=generator) * 5
    x[3] = 0.0  # an all-zero row takes the clamp_min(1e-12) branch
    x[5, 7] = 80.0  # an outlier channel
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_equals_the_int8_kernel_quantizers_bit_for_bit(dtype):
    x = _inputs().to(dtype)
    q, scale = quantize_per_token_symmetric(x)
    assert torch.equal(fake_quant_rows(x, torch.float32), q.float() * scale)
    weight = _inputs(24, 64, seed=1).to(dtype)
    qw, sw = quantize_per_channel_symmetric(weight)
    assert torch.equal(fake_quant_rows(weight, torch.float32), qw.float() * sw[:, None])
    assert fake_quant_rows(x, torch.bfloat16).dtype is torch.bfloat16
    # rounding really happens: at most 255 levels per row
    assert (fake_quant_rows(x, torch.float32) != x.float()).any()


def test_fake_quant_gradient_is_straight_through_in_the_input_dtype():
    x = _inputs().requires_grad_()
    y = fake_quant_rows_ste(x, torch.bfloat16)
    assert y.dtype is torch.bfloat16
    (y.float() * torch.arange(64.0)).sum().backward()
    assert x.grad.dtype is torch.float32
    assert torch.equal(x.grad, torch.arange(64.0).expand(37, 64))


@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_converted_cpu_model_matches_the_fake_quant_model(make_model):
    reference = make_model()
    model = make_model()
    quantizer = QATInt8Quantizer(QATInt8Config())
    prepared = quantizer.prepare(model)
    qat_layers = [m for m in prepared.modules() if isinstance(m, Int8QATLinear)]
    reports = quantizer.layer_report(prepared)
    assert len(qat_layers) == sum(row.quantized for row in reports) > 0
    assert_every_layer_reported(reference, reports, Int8QATLinear)  # embeddings and norms too, as every quantizer does
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        float_logits = reference(input_ids=ids).logits
        fake = prepared(input_ids=ids).logits
    converted = quantizer.convert(prepared)
    assert not any(isinstance(m, Int8QATLinear) for m in converted.modules())
    assert sum(isinstance(m, Int8DynamicLinear) for m in converted.modules()) == len(qat_layers)
    with torch.no_grad():
        real = converted(input_ids=ids).logits
    # float32 QAT computes the int8 kernel's own arithmetic: identical logits
    assert torch.equal(real, fake)
    # siblings fed one tensor (q/k/v, gate/up; GPT-2 fuses them already) quantize it once
    assert any(getattr(m, "share_input", False) for m in converted.modules()) == (make_model is make_tiny_llama)
    # ...and int8 rounding did change them relative to the float model
    assert (fake - float_logits).abs().max() > 1e-3 * fake.abs().max()


def test_float32_layer_gradients_are_those_of_the_dequantized_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    layer = Int8QATLinear.from_float(linear)
    x = _inputs().reshape(37, 1, 64).requires_grad_()
    out_grad = torch.randn(37, 1, 24)
    layer(x).backward(out_grad)
    grads = x.grad.clone(), linear.weight.grad.clone(), linear.bias.grad.clone()
    x.grad = linear.weight.grad = linear.bias.grad = None
    x_fq = fake_quant_rows_ste(x, torch.float32)
    w_fq = fake_quant_rows_ste(linear.weight, torch.float32)
    torch.nn.functional.linear(x_fq, w_fq, linear.bias).backward(out_grad)
    for mine, expected in zip(grads, (x.grad, linear.weight.grad, linear.bias.grad)):
        assert torch.allclose(mine, expected, atol=1e-5)


def test_qat_trains_under_cpu_bf16_autocast():
    model = QATInt8Quantizer(QATInt8Config()).prepare(make_tiny_llama())
    model.train()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype is torch.bfloat16
    out.loss.backward()
    layers = [m for m in model.modules() if isinstance(m, Int8QATLinear)]
    for layer in layers:
        assert layer.weight.grad is not None and layer.weight.grad.dtype is torch.float32
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        fp32_loss = model(input_ids=ids, labels=ids).loss
    assert abs(out.loss.item() - fp32_loss.item()) < 0.05 * fp32_loss.item()


def test_prepare_keeps_tied_weights_and_keep_float():
    model = make_tiny_llama()
    embedding = model.model.embed_tokens.weight
    quantizer = QATInt8Quantizer(QATInt8Config(keep_float=("*.down_proj",)))
    prepared = quantizer.prepare(model)
    assert isinstance(prepared.lm_head, Int8QATLinear) and prepared.lm_head.weight is embedding
    assert type(prepared.model.layers[0].mlp.down_proj) is torch.nn.Linear
    kept = [r for r in quantizer.layer_report(prepared) if r.reason.startswith("user exclusion")]
    assert [r.name for r in kept] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_gpt2_conv1d_is_wrapped_with_its_transposed_weight():
    model = make_tiny_gpt2()
    conv = model.transformer.h[0].attn.c_attn
    layer = Int8QATLinear.from_float(conv)
    assert layer.transposed and layer.weight is conv.weight
    assert (layer.out_features, layer.in_features) == (conv.weight.shape[1], conv.weight.shape[0])
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.to_int8()(x))


def test_config_errors_are_reported():
    with pytest.raises(ConfigError, match="keep_float"):
        QATInt8Config(keep_float=("",))


def test_run_with_qat_int8_saves_an_artifact_that_reproduces_the_model(tiny_loaded, fast_run_options, tiny_tokenizer):
    import ftq_core

    options = dict(fast_run_options, quantizer={"name": "qat-int8"}, evaluate_pretrained=False)
    result = ftq_core.run(options, model=tiny_loaded)
    assert result.train is not None and result.train.steps == 3
    assert result.quantized.perplexity is not None
    artifact = ftq_core.load(result.artifact_dir)
    assert artifact.manifest["method"] == "qat-int8"
    ids = torch.randint(0, len(tiny_tokenizer), (1, 24))
    with torch.no_grad():
        assert torch.equal(artifact.model(input_ids=ids).logits, result.model(input_ids=ids).logits)


@pytest.mark.parametrize("fused_adamw", [False, True], ids=["foreach-adamw", "fused-adamw"])
def test_cached_weight_fake_quant_follows_optimizer_updates(fused_adamw):
    # fused AdamW (the trainer's) writes the weights without bumping their version counters
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 24)
    layer = Int8QATLinear.from_float(linear)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.05, fused=fused_adamw)
    x = _inputs().reshape(37, 1, 64)

    def expected():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            w = fake_quant_rows(linear.weight, torch.bfloat16)
            return torch.nn.functional.linear(fake_quant_rows(x, torch.bfloat16), w, linear.bias)

    for _ in range(2):
        x.requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            # the straight-through reference: a Linear on fake-quantized tensors
            reference = torch.nn.functional.linear(
                fake_quant_rows_ste(x, torch.bfloat16), fake_quant_rows_ste(linear.weight, torch.bfloat16), linear.bias
            )
        assert torch.equal(y.detach(), expected()) and torch.equal(y.detach(), reference.detach())
        grads = torch.autograd.grad(y.float().square().mean(), (x, linear.weight, linear.bias))
        expected_grads = torch.autograd.grad(reference.float().square().mean(), (x, linear.weight, linear.bias))
        for mine, theirs in zip(grads, expected_grads):
            assert mine.dtype is theirs.dtype is torch.float32
            assert torch.allclose(mine, theirs, rtol=2e-2, atol=1e-4)
        linear.weight.grad, linear.bias.grad = grads[1], grads[2]
        optimizer.step()
        optimizer.zero_grad()
        x = x.detach()


def test_bundled_model_converts_to_the_exact_int8_model_it_trained_as(bundled_model):
    import copy

    quantizer = QATInt8Quantizer(QATInt8Config(keep_float=("lm_head",)))
    prepared = quantizer.prepare(copy.deepcopy(bundled_model.model))
    ids = bundled_model.tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        fake = prepared(input_ids=ids).logits
        real = quantizer.convert(prepared)(input_ids=ids).logits
    assert torch.equal(real, fake)


def _prepared_pair(**config):
    """The same tiny Llama prepared with and without sibling groups."""
    grouped = QATInt8Quantizer(QATInt8Config(**config)).prepare(make_tiny_llama())
    separate = QATInt8Quantizer(QATInt8Config(group_siblings=False, **config)).prepare(make_tiny_llama())
    separate.load_state_dict(grouped.state_dict())
    return grouped, separate


def test_sibling_layers_are_grouped_by_parent():
    grouped, separate = _prepared_pair(keep_float=("*.v_proj",))
    attention, mlp = grouped.model.layers[0].self_attn, grouped.model.layers[0].mlp
    q_group, q_index = attention.q_proj._group
    assert q_group.members == [attention.q_proj, attention.k_proj] and q_index == 0
    assert type(attention.v_proj) is torch.nn.Linear  # kept in float: not a member
    assert mlp.gate_proj._group[0].members == [mlp.gate_proj, mlp.up_proj] and mlp.up_proj._group[1] == 1
    assert mlp.down_proj._group is None and grouped.lm_head._group is None
    assert all(m._group is None for m in separate.modules() if isinstance(m, Int8QATLinear))
    import copy

    copied = copy.deepcopy(grouped).model.layers[0].self_attn  # a copy's groups hold the copy's layers
    assert copied.q_proj._group[0].members == [copied.q_proj, copied.k_proj]


def test_grouped_training_matches_separate_layers_under_bf16_autocast():
    grouped, separate = _prepared_pair()
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(grouped.parameters(), lr=1e-2, fused=True)  # the trainer's; no version bumps
    for step in range(2):  # the second step checks the stacked weight fake-quant follows the optimizer
        separate.load_state_dict(grouped.state_dict())
        losses, grads = [], []
        for model in (grouped, separate):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert abs(losses[0] - losses[1]) < 1e-3 * losses[1], step
        assert grads[0].keys() == grads[1].keys()
        for name in grads[0]:
            a, b = grads[0][name], grads[1][name]
            assert a.dtype is torch.float32
            assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6, (step, name)
        optimizer.step()
        optimizer.zero_grad()
        separate.zero_grad()
    separate.load_state_dict(grouped.state_dict())
    with torch.no_grad():  # and both still convert to the same exact int8 model
        assert torch.equal(grouped(input_ids=ids).logits, separate(input_ids=ids).logits)


def test_a_sibling_called_with_another_input_computes_its_own_output():
    grouped, separate = _prepared_pair()
    layer, reference = grouped.model.layers[0].self_attn.k_proj, separate.model.layers[0].self_attn.k_proj
    q_proj = grouped.model.layers[0].self_attn.q_proj
    x, other = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        q_proj(x)  # computes the group's output for x, k's slice waiting
        assert torch.equal(layer(other), reference(other))
        assert torch.equal(layer(x), reference(x))
        x.add_(1.0)  # an in-place change makes the waiting slice stale
        q_proj(x.clone())
        assert torch.equal(layer(x), reference(x))


def test_prepared_model_runs_under_inference_mode_and_autocast():
    grouped, separate = _prepared_pair()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            expected = separate(input_ids=ids).logits
        with torch.inference_mode():  # inference tensors have no version counter to key reuse on
            assert torch.equal(separate(input_ids=ids).logits, expected)
            grouped_logits = grouped(input_ids=ids).logits.float()
    assert (grouped_logits - expected.float()).norm() <= 2e-2 * expected.float().norm()


def test_qat_int8_rotate_trains_down_proj_on_the_rotated_input():
    from ftq_plugins.quantizers.options import Rotation

    rotated = QATInt8Quantizer(QATInt8Config(rotate=Rotation.ON))
    model = rotated.prepare(make_tiny_llama())
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    assert all(isinstance(d, Int8QATLinear) and d.input_rotation_block > 0 for d in downs)
    assert all("rotated residual stream" in r.scheme for r in rotated.layer_report(model) if r.quantized)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the head stays tied
    plain = QATInt8Quantizer(QATInt8Config(rotate=Rotation.OFF)).prepare(make_tiny_llama())
    assert all(layer.mlp.down_proj.input_rotation_block == 0 for layer in plain.model.layers)
    by_default = QATInt8Quantizer(QATInt8Config())  # auto: rotated where the model allows it
    assert all(layer.mlp.down_proj.input_rotation_block > 0 for layer in by_default.prepare(make_tiny_llama()).model.layers)
    gpt2 = by_default.prepare(make_tiny_gpt2())
    assert not any(m.input_rotation_block for m in gpt2.modules() if isinstance(m, Int8QATLinear))
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(d.weight.grad is not None and d.weight.grad.abs().sum() > 0 for d in downs)
    with torch.no_grad():  # float32 QAT is the int8 kernel's own arithmetic, rotation included
        fake = model(input_ids=ids).logits
        real = rotated.convert(model)(input_ids=ids).logits
    assert torch.equal(real, fake)
