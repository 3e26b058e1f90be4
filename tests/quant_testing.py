"""Helpers shared by the quantizer tests: calibration blocks, error measures, report checks."""

from __future__ import annotations

import torch

from ftq_core.layers import iter_linear_layers


def token_blocks(count: int = 6, length: int = 32, vocab: int = 512, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=generator) for _ in range(count)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def assert_every_layer_reported(float_model, reports, quantized_type) -> None:
    """Every Linear/Conv1D of the float model has a row; quantized rows hold ``quantized_type`` now."""
    linear_names = [name for name, _ in iter_linear_layers(float_model)]
    by_name = {row.name: row for row in reports}
    missing = [name for name in linear_names if name not in by_name]
    assert not missing, f"layers without a report row: {missing}"
    for row in reports:
        assert row.quantized or row.reason, f"{row.name} stayed float without a reason"
    norms = [row for row in reports if row.module_type.endswith("Norm")]
    assert norms and not any(row.quantized for row in norms), "norms must be reported, and float"
    return by_name
