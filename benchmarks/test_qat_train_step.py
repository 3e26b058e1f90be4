"""CPU training-step speed of ``qat-int8`` vs the plain model, same run (``pytest benchmarks --benchmark-only``).

The GPU numbers come from ``benchmarks/gpu_qat.py``; this keeps the CPU path
honest: compare the two rows' means (a ratio in one run, never a fixed time).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from ftq_testing import make_tiny_llama  # noqa: E402


def _train_step(qat: bool, precision: str):
    model = make_tiny_llama()
    if qat:
        from ftq_plugins.quantizers.qat_int8 import QATInt8Config, QATInt8Quantizer

        model = QATInt8Quantizer(QATInt8Config()).prepare(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(0))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    return step


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", ["plain", "qat-int8"])
def test_train_step(benchmark, variant, precision):
    benchmark.group = f"train step, tiny Llama 4x128, {precision}"
    benchmark(_train_step(variant == "qat-int8", precision))
