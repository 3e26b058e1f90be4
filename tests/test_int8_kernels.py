"""ftq's int8 kernel paths against float references, and the kernel choice in artifacts.

Tolerances come from int8 rounding: per-token W8A8 rounds every activation and
weight to half a step of 1/127 of its row's largest magnitude, so outputs are
within a few percent of the row-norm-scaled float result; the exact-integer
reference (the same int8 values multiplied in int64) must match to float
rounding.
"""

from __future__ import annotations

import pytest
import torch

from ftq_plugins.int8 import kernels as int8_kernels
from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear, tune_kernels
from ftq_plugins.int8.kernels import KERNELS, resolve_kernel
from ftq_plugins.int8.numerics import quantize_per_channel_symmetric, quantize_rows_symmetric

CONCRETE = [k for k in KERNELS if k != "auto"]


def _linear(in_features, out_features, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
        linear.weight[:, 3] *= 20  # an outlier input channel, as LLMs have
    return linear.eval()


def _exact_w8a8(x2, layer):
    """The per-token W8A8 result computed in exact integer arithmetic."""
    q, x_scale = quantize_rows_symmetric(x2)
    acc = q.long() @ layer.weight_int8.long().t()
    return acc.double() * x_scale.double() * layer.weight_scale.double()


@pytest.mark.parametrize("kernel", CONCRETE)
@pytest.mark.parametrize("tokens", [1, 5, 33])
@pytest.mark.parametrize("shape", [(64, 96), (100, 40), (576, 192)])
def test_every_kernel_matches_float_reference(kernel, tokens, shape):
    in_features, out_features = shape
    linear = _linear(in_features, out_features)
    layer = Int8DynamicLinear.from_float(linear, kernel=kernel)
    torch.manual_seed(1)
    x = torch.randn(tokens, in_features)
    with torch.inference_mode():
        y = layer(x)
        reference = linear(x)
    assert y.shape == reference.shape and y.dtype == torch.float32
    concrete = layer.kernel_for(tokens)
    scale = float(reference.abs().amax())
    # Worst-case int8 rounding bound per output: |x||w - w^| + |x - x^||w^|, with
    # |w - w^| <= s_w / 2 and |x - x^| <= s_x / 2 (bf16: 2^-8 |x|).
    w_hat = layer.dequantized_weight()
    weight_term = x.abs().sum(-1, keepdim=True) * layer.weight_scale / 2
    if concrete == "fbgemm":  # asymmetric uint8 over the row's [min, max]: step <= 2 * s_x
        act_term = quantize_rows_symmetric(x)[1] * w_hat.abs().sum(-1)
    elif concrete == "weight-only":
        act_term = (x.abs() * 2.0**-8) @ w_hat.abs().t()
    else:
        act_term = quantize_rows_symmetric(x)[1] / 2 * w_hat.abs().sum(-1)
    bound = weight_term + act_term + 1e-4 * scale
    assert ((y - reference).abs() <= bound).all()
    assert (y - reference).abs().amax() < 0.1 * scale  # and the bound itself is tight enough to mean something
    if concrete in ("onednn", "int-mm"):  # fbgemm's uint8 zero point makes it round differently
        exact = _exact_w8a8(x, layer) + linear.bias.double()
        torch.testing.assert_close(y.double(), exact, rtol=1e-4, atol=1e-4 * scale)
    else:
        bf16_ref = x.bfloat16().float() @ w_hat.t() + linear.bias
        torch.testing.assert_close(y, bf16_ref, rtol=2e-2, atol=1e-2 * scale)


def test_weight_only_falls_back_where_its_kernel_cannot_run():
    # torch 2.13's _weight_int8pack_mm crashes for widths that are not multiples of 8
    assert resolve_kernel("weight-only", 100) == "int-mm"
    assert resolve_kernel("weight-only", 96) == "weight-only"
    layer = Int8DynamicLinear.from_float(_linear(100, 40), kernel="weight-only")
    assert layer.kernel_for(1) == "int-mm"


def test_fbgemm_runs_one_row_only():
    layer = Int8DynamicLinear.from_float(_linear(64, 96), kernel="fbgemm")
    assert layer.kernel_for(1) == resolve_kernel("fbgemm", 64)
    assert layer.kernel_for(2) == resolve_kernel("onednn", 64)
    with pytest.raises(ValueError, match="prefill_kernel"):
        layer.set_kernel("auto", prefill_kernel="fbgemm")


def test_onednn_falls_back_to_int_mm_without_onednn(monkeypatch):
    monkeypatch.setattr(int8_kernels, "onednn_available", lambda: False)
    assert resolve_kernel("onednn", 64) == "int-mm"


def test_auto_runs_decode_and_prefill_kernels_by_token_count():
    layer = Int8DynamicLinear.from_float(_linear(64, 96))
    layer.set_kernel("auto", decode_kernel="weight-only", prefill_kernel="int-mm", decode_max_tokens=4)
    assert layer.kernel_for(1) == "weight-only"
    assert layer.kernel_for(4) == "weight-only"
    assert layer.kernel_for(5) == "int-mm"


def test_tune_kernels_records_a_measured_choice_per_shape():
    model = torch.nn.Sequential(
        Int8DynamicLinear.from_float(_linear(64, 96)),
        Int8DynamicLinear.from_float(_linear(96, 64)),
        Int8DynamicLinear.from_float(_linear(64, 96)),
    )
    chosen = tune_kernels(model)
    assert set(chosen) == {(64, 96), (96, 64)}
    for choice in chosen.values():
        # auto mixes no numerics: only W8A8 kernels, and the float product timed beside them
        assert choice["decode_kernel"] in int8_kernels.AUTO_KERNELS and choice["prefill_kernel"] in int8_kernels.AUTO_KERNELS
        assert choice["prefill_vs_float"] > 0
    assert model[0].kernel_meta() == model[2].kernel_meta()
    assert model[0].decode_kernel == chosen[(64, 96)]["decode_kernel"]


def test_kernel_choices_are_remembered_per_machine_and_shape(tmp_path, monkeypatch):
    """A second quantization of the same shapes on the same machine measures nothing."""
    import json

    from ftq_plugins.int8 import kernels

    monkeypatch.setenv("FTQ_CACHE_DIR", str(tmp_path))

    def model():
        return torch.nn.Sequential(Int8DynamicLinear.from_float(_linear(64, 96)), Int8DynamicLinear.from_float(_linear(96, 64)))

    first = tune_kernels(model())
    stored = json.loads((tmp_path / "kernel-choices.json").read_text())
    (machine,) = stored
    assert f"threads={torch.get_num_threads()}" in machine and f"torch={torch.__version__}" in machine
    assert set(stored[machine]) == {"64x96x1", "96x64x1"}

    def refuse(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(kernels, "measure_kernels", refuse)
    again = model()
    assert tune_kernels(again) == first
    assert again[0].decode_kernel == first[(64, 96)]["decode_kernel"]
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: another key, so it measures
    with pytest.raises(AssertionError, match="measured again"):
        tune_kernels(model())


def test_invalid_kernel_names_are_rejected():
    with pytest.raises(ValueError, match="unknown int8 kernel"):
        Int8DynamicLinear(8, 8, kernel="fast")
    with pytest.raises(ValueError, match="decode_kernel"):
        Int8DynamicLinear(8, 8, decode_kernel="auto")


def test_dynamic_quantizer_rejects_unknown_kernel():
    import ftq_core
    from ftq_core.errors import ConfigError

    with pytest.raises(ConfigError, match="kernel"):
        ftq_core.quantize(torch.nn.Linear(4, 4), "dynamic", {"kernel": "fastest"})


def test_quantized_model_output_close_to_float(tiny_llama):
    import copy

    import ftq_core

    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = tiny_llama(input_ids=ids).logits
        model = ftq_core.quantize(copy.deepcopy(tiny_llama), "dynamic").model
        prefill = model(input_ids=ids).logits
        decode = model(input_ids=ids[:, :1]).logits
    assert (prefill - reference).abs().amax() < 0.05 * reference.abs().amax()
    assert (decode[0, 0] - reference[0, 0]).abs().amax() < 0.05 * reference.abs().amax()
    assert all(m.kernel == "auto" for m in model.modules() if isinstance(m, Int8DynamicLinear))


@pytest.mark.parametrize("options", [{}, {"kernel": "weight-only"}, {"kernel": "int-mm"}])
def test_kernel_choice_is_saved_and_restored(tiny_llama, tmp_path, options):
    import ftq_core
    from ftq_core.artifacts import load_artifact, save_artifact

    model = ftq_core.quantize(tiny_llama, "dynamic", options).model
    save_artifact(model, None, tmp_path / "art", manifest={"method": "dynamic"})
    loaded = load_artifact(tmp_path / "art")
    saved = {n: m.kernel_meta() for n, m in model.named_modules() if isinstance(m, Int8DynamicLinear)}
    restored = {n: m.kernel_meta() for n, m in loaded.model.named_modules() if isinstance(m, Int8DynamicLinear)}
    assert saved and restored == saved
    assert loaded.manifest["modules"]["model.layers.0.mlp.up_proj"]["meta"]["kernel"] == options.get("kernel", "auto")
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_layers_saved_before_kernel_choices_load_on_int_mm():
    layer = Int8DynamicLinear.from_float(_linear(16, 8))
    tensors = {"weight_int8": layer.weight_int8, "weight_scale": layer.weight_scale, "bias": layer.bias}
    restored = Int8DynamicLinear.from_tensors(tensors, {"in_features": 16, "out_features": 8})
    assert restored.kernel == "int-mm"


def test_damaged_tensor_is_reported():
    from ftq_core.errors import ArtifactError

    with pytest.raises(ArtifactError, match="weight_int8"):
        Int8DynamicLinear.from_tensors(
            {"weight_int8": torch.zeros(3, 3, dtype=torch.int8), "weight_scale": torch.ones(8)},
            {"in_features": 16, "out_features": 8},
        )


def test_per_channel_weight_quantization_is_within_half_a_step():
    weight = _linear(32, 16).weight
    q, scale = quantize_per_channel_symmetric(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert ((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("amx", [True, False], ids=["amx", "vnni-only"])
def test_onednn_is_never_chosen_on_a_cpu_whose_onednn_int8_is_the_reference_path(monkeypatch, request, amx):
    """Without AMX, oneDNN's per-token int8 linear runs its reference code (~1000x slower): int-mm instead."""
    from ftq_plugins.int8 import kernels
    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

    if amx and not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")):
        pytest.skip("this torch has no oneDNN int8 linear")
    from ftq_plugins.int8.dynamic_linear import _resolved

    monkeypatch.setattr(kernels, "cpu_has_amx", lambda: amx)
    _resolved.cache_clear()  # kernel resolution is cached per process; this test changes the CPU under it
    request.addfinalizer(_resolved.cache_clear)
    assert kernels.resolve_kernel("onednn", 64) == ("onednn" if amx else "int-mm")
    layer = Int8DynamicLinear.from_float(torch.nn.Linear(64, 32))
    chosen = kernels.measure_kernels(layer, repeats=2)
    assert {chosen["decode_kernel"], chosen["prefill_kernel"]} <= set(kernels.AUTO_KERNELS)
    if not amx:
        assert "onednn" not in chosen.values()
        assert layer.kernel_for(1) == "int-mm" and layer.kernel_for(64) == "int-mm"  # its default, resolved


@pytest.mark.parametrize("kernel", CONCRETE)
def test_a_layer_that_ran_its_kernel_deep_copies_and_the_copy_computes_the_same(kernel):
    import copy

    layer = Int8DynamicLinear.from_float(_linear(64, 32), kernel=kernel)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = layer(x)  # builds the kernel's packed weight (an opaque tensor for oneDNN)
        copied = copy.deepcopy(layer)
        assert torch.equal(copied(x), expected)
    assert copied.weight_int8.data_ptr() != layer.weight_int8.data_ptr()
