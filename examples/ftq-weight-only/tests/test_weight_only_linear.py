"""Int8WeightOnlyLinear: numerics of both compute paths, and when each is taken."""

from __future__ import annotations

import pytest
import torch

from ftq_weight_only.linear import INT8_MAX, Int8WeightOnlyLinear, kernel_available, quantize_weight_per_channel


def _reference(module: Int8WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """``x @ (q * s).T + b`` in float64: what both paths approximate."""
    w = module.weight_int8.double() * module.weight_scale.double()[:, None]
    y = x.double() @ w.t()
    return y + module.bias.double() if module.bias is not None else y


def _layer(in_features=64, out_features=48, bias=True, **options) -> tuple[torch.nn.Linear, Int8WeightOnlyLinear]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    return linear, Int8WeightOnlyLinear.from_float(linear.weight, linear.bias, **options)


def test_per_channel_quantization_round_trips_within_half_a_step():
    weight = torch.randn(32, 64) * torch.logspace(-3, 1, 32)[:, None]  # channels of very different size
    q, scale = quantize_weight_per_channel(weight)
    assert q.dtype == torch.int8 and scale.shape == (32,)
    assert q.abs().max() <= INT8_MAX
    assert (q.abs().amax(dim=1) == INT8_MAX).all()  # each channel uses its full range
    error = (q.float() * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.skipif(not kernel_available(), reason="this torch has no _weight_int8pack_mm")
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_fused_kernel_path_matches_reference(rows, monkeypatch):
    _, module = _layer()
    calls = []
    real = torch.ops.aten._weight_int8pack_mm
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda *a: calls.append(a[0].dtype) or real(*a))
    x = torch.randn(rows, 64)
    assert module.uses_kernel(rows)
    y = module(x)
    assert calls == [torch.bfloat16], "the fused int8 kernel must run, on bfloat16 activations"
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(module, x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("compute_dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_gemm_path_matches_reference(compute_dtype, tol):
    _, module = _layer(compute_dtype=compute_dtype, kernel_max_tokens=4)
    x = torch.randn(2, 10, 64)  # 20 rows > kernel_max_tokens
    assert not module.uses_kernel(20)
    y = module(x)
    assert y.shape == (2, 10, 48) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(module, x.reshape(-1, 64)).reshape(2, 10, 48), rtol=tol, atol=tol)


def test_float32_compute_never_uses_the_kernel():
    # The kernel's float32 path is a scalar loop, far slower than a float32 GEMM.
    _, module = _layer(compute_dtype=torch.float32)
    assert not module.uses_kernel(1)


@pytest.mark.parametrize("in_features", [70, 33])
def test_in_features_not_a_multiple_of_16_takes_the_gemm_path(in_features):
    # The kernel's vector loop would read past the row (wrong results) or fault
    # on unaligned rows; such layers must not reach it.
    _, module = _layer(in_features=in_features, out_features=17)
    assert not module.uses_kernel(1)
    x = torch.randn(1, in_features)
    torch.testing.assert_close(module(x).double(), _reference(module, x), rtol=2e-2, atol=2e-2)


def test_bfloat16_inputs_and_no_bias():
    linear, module = _layer(bias=False)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    y = module(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _reference(module, x), rtol=3e-2, atol=3e-2)


def test_output_stays_close_to_the_float_layer():
    linear, module = _layer(in_features=256, out_features=128)
    x = torch.randn(8, 256)
    with torch.no_grad():
        expected = linear(x)
    relative = (module(x) - expected).norm() / expected.norm()
    assert relative < 0.01, f"int8 weights moved the output by {relative:.2%}"
