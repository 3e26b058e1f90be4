"""Why the layer picks its compute path: speed of each path at decode (1 row) and prefill (256 rows).

    python -m pytest examples/ftq-weight-only/benchmarks --benchmark-only --benchmark-group-by=param:rows

Compare within one run (same machine, same load): the float32 ``nn.Linear``
row is the baseline.  SmolLM2-135M's MLP shape, 576 -> 1536.
"""

from __future__ import annotations

import pytest
import torch

from ftq_weight_only.linear import Int8WeightOnlyLinear

IN, OUT = 576, 1536


def _layers():
    torch.manual_seed(0)
    linear = torch.nn.Linear(IN, OUT, bias=False).eval()
    return {
        "fp32 nn.Linear": linear,
        "int8 default": Int8WeightOnlyLinear.from_float(linear.weight),
        "int8 fused kernel always": Int8WeightOnlyLinear.from_float(linear.weight, kernel_max_tokens=10**9),
        "int8 float32 compute": Int8WeightOnlyLinear.from_float(linear.weight, compute_dtype=torch.float32),
    }


@pytest.mark.parametrize("rows", [1, 256])
@pytest.mark.parametrize("path", list(_layers()))
def test_linear_paths(benchmark, path, rows):
    layer = _layers()[path]
    x = torch.randn(rows, IN)
    with torch.inference_mode():
        benchmark(layer, x)


@pytest.mark.parametrize("rows", [1])
def test_fused_kernel_with_float32_activations(benchmark, rows):
    """The kernel's float32 path is a scalar loop: the reason activations go to bfloat16."""
    layer = _layers()["int8 default"]
    x = torch.randn(rows, IN)
    benchmark(torch.ops.aten._weight_int8pack_mm, x, layer.weight_int8, layer.weight_scale)
