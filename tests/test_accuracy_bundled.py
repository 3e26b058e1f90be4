"""Perplexity bounds of ``static`` and ``dynamic`` int8 on the real bundled SmolLM2-135M.

Calibration uses the start of tinyshakespeare's training part; perplexity is
measured on its held-out tail (never calibrated on).  Few windows keep this
under a minute on an idle 2-core machine; benchmarks/accuracy.py measures
more windows and a second text.
"""

from __future__ import annotations

import copy

import pytest
from ftq_testing import SHARED_DATA

SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"
WINDOWS, CALIBRATION = 4, 4  # as in benchmarks/accuracy.py (its table: static +4.3 %, dynamic +1.8 %)


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"needs {SHAKESPEARE}: tinyshakespeare.txt from the shared data folder (../shared/data beside the repository)")
def test_static_and_dynamic_perplexity_bounds(bundled_model):
    from ftq_core.evaluation import perplexity
    from ftq_core.pipeline import quantize
    from ftq_core.plugins import get_plugins

    dataset = get_plugins().get("dataset", "text")
    splits = dataset.create(dataset.make_config({"path": str(SHAKESPEARE), "block_size": 512})).build(bundled_model.tokenizer)
    fp32 = perplexity(bundled_model.model, splits.eval, max_blocks=WINDOWS)[0]
    bounds = {"static": ({}, 1.05), "dynamic": ({"smoothquant_alpha": 0.5, "ppl_budget": 3.0}, 1.03)}
    for name, (options, bound) in bounds.items():
        result = quantize(copy.deepcopy(bundled_model.model), name, options, calibration_data=splits, calibration_batches=CALIBRATION)
        ppl = perplexity(result.model, splits.eval, max_blocks=WINDOWS)[0]
        quantized = sum(layer.quantized for layer in result.layers)
        assert quantized >= 150, f"{name}: only {quantized} layers int8"
        assert ppl <= bound * fp32, f"{name}: perplexity {ppl:.2f} vs fp32 {fp32:.2f} (bound ×{bound})"
