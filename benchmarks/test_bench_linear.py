"""Kernel level: one Linear layer, every int8 path against fp32 and bf16 in the same group.

Shapes are SmolLM2-135M's (576->1536 gate/up, 576->576 q/o, 1536->576 down,
576->49152 lm_head) and a large one (4096->4096); M is the number of tokens
(1: decode, 16..512: prefill / batches).  Variants:

* ``fp32``, ``bf16``: ``torch.nn.functional.linear`` (bf16 runs on AMX).
* ``ao-dynamic-<engine>``: ``torch.ao.nn.quantized.dynamic.Linear``, per-channel
  int8 weights, activations quantized per tensor at run time, float in and out.
* ``ao-static-<engine>``: ``torch.ao.nn.quantized.Linear``, quint8 in and out
  (the input is quantized before timing: the kernel alone).
* ``ftq-onednn``, ``ftq-int-mm``, ``ftq-weight-only``, ``ftq-auto``: ftq's
  :class:`Int8DynamicLinear` on each kernel choice, float in and out
  (``auto`` measured for the shape first, as the quantizer does).
  Weight-only runs only for M <= 16 (the kernel ``auto`` uses it for; with
  many tokens it is a GEMV-style kernel and takes seconds).
* ``int8-gemm``: ``torch._int_mm`` alone on pre-quantized int8 activations
  (int32 out): the GEMM inside ``ftq-int-mm``, whose ops/s is compared with
  the AMX int8 peak.  (oneDNN's packed int8 GEMM is inside ``ftq-onednn``.)
"""

from __future__ import annotations

import pytest
from conftest import QUICK, pedantic, thread_counts

SHAPES = [(576, 1536)] if QUICK else [(576, 1536), (576, 576), (1536, 576), (576, 49152), (4096, 4096)]
TOKENS = [1, 128] if QUICK else [1, 16, 128, 512]
ENGINES = ["x86", "fbgemm", "onednn", "qnnpack"]
STATIC_ENGINES = ["x86", "onednn", "qnnpack"]
if QUICK:
    VARIANTS = ["fp32", "bf16", "ao-dynamic-x86", "ao-dynamic-onednn", "ftq-onednn", "ftq-weight-only", "ftq-auto", "int8-gemm"]
else:
    VARIANTS = (
        ["fp32", "bf16"]
        + [f"ao-dynamic-{e}" for e in ENGINES]
        + [f"ao-static-{e}" for e in STATIC_ENGINES]
        + ["ftq-onednn", "ftq-int-mm", "ftq-weight-only", "ftq-auto", "int8-gemm"]
    )


def _use_engine(engine: str) -> None:
    import torch

    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"quantized engine {engine} not in this torch build")
    torch.backends.quantized.engine = engine


def build(variant: str, in_features: int, out_features: int, tokens: int):
    """A zero-argument callable running one forward of ``variant`` (inputs prepared here, untimed)."""
    import torch

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features).eval()
    with torch.no_grad():
        linear.weight.normal_(0, 0.05)
    x = torch.randn(tokens, in_features)
    if variant == "fp32":
        return lambda: linear(x)
    if variant == "bf16":
        lb, xb = linear.to(torch.bfloat16), x.to(torch.bfloat16)
        return lambda: lb(xb)
    if variant.startswith("ao-dynamic-"):
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        _use_engine(variant.removeprefix("ao-dynamic-"))
        linear.qconfig = per_channel_dynamic_qconfig
        qlinear = DynamicLinear.from_float(linear)
        return lambda: qlinear(x)
    if variant.startswith("ao-static-"):
        from torch.ao.nn.quantized import Linear as StaticLinear

        _use_engine(variant.removeprefix("ao-static-"))
        qlinear = StaticLinear(in_features, out_features)
        w_scale = float(linear.weight.abs().max()) / 127
        qlinear.set_weight_bias(torch.quantize_per_tensor(linear.weight.detach(), w_scale, 0, torch.qint8), linear.bias.detach())
        qlinear.scale, qlinear.zero_point = 0.05, 128
        xq = torch.quantize_per_tensor(x, float(x.abs().max()) / 127, 128, torch.quint8)
        return lambda: qlinear(xq)
    if variant.startswith("ftq-"):
        from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear, tune_kernels

        layer = Int8DynamicLinear.from_float(linear, kernel=variant.removeprefix("ftq-"))
        tune_kernels(layer)  # auto only; records the measured decode/prefill kernels
        return lambda: layer(x)
    if variant == "int8-gemm":
        from ftq_plugins.int8.numerics import quantize_per_channel_symmetric, quantize_rows_symmetric

        q, _ = quantize_rows_symmetric(x)
        w, _ = quantize_per_channel_symmetric(linear.weight)
        wt = w.t()  # column-major view, as Int8DynamicLinear passes it
        return lambda: torch._int_mm(q, wt)
    raise AssertionError(f"unknown variant {variant}")


@pytest.mark.parametrize("threads", thread_counts(), indirect=True, ids=lambda t: f"t{t}")
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda m: f"M{m}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_linear(benchmark, variant, shape, tokens, threads):
    import torch

    from ftq_plugins.int8.kernels import quantized_engine

    if variant == "ftq-weight-only" and tokens > 16:
        pytest.skip("weight-only is the few-token kernel; auto never picks it above 16 tokens")
    in_features, out_features = shape
    with quantized_engine(None):  # build() may switch it; the next case starts from the same engine
        fn = build(variant, in_features, out_features, tokens)
        benchmark.group = f"linear {in_features}->{out_features} M={tokens} t={threads}"
        benchmark.extra_info.update(
            variant=variant, threads=threads, tokens=tokens, ops=2 * tokens * in_features * out_features
        )
        with torch.inference_mode():
            pedantic(benchmark, fn)
