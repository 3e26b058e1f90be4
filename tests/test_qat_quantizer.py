"""The ``qat`` quantizer: fake-quant training runs (also under bf16 autocast), converts to int8, saves."""

from __future__ import annotations

import pytest
import torch
from ftq_testing import make_tiny_gpt2, make_tiny_llama
from quant_testing import assert_every_layer_reported, logits, relative_error, token_blocks

from ftq_core.configs import build_config
from ftq_plugins.int8.quant_boundary import QuantBoundary
from ftq_plugins.quantizers.qat import QATQuantConfig, QATQuantizer

FAMILIES = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}


def _prepared(model, **options):
    quantizer = QATQuantizer(build_config(QATQuantConfig, options, where="qat"))
    model = quantizer.prepare(model)
    if quantizer.needs_calibration:
        from ftq_core.pipeline import calibrate

        calibrate(model, token_blocks(), batches=3, progress=False)
        model = quantizer.on_calibrated(model)
    return quantizer, model


def _train_steps(quantizer, model, steps: int, autocast: bool = False) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for step, ids in enumerate(token_blocks(steps, 32, seed=5), start=1):
        batch = ids[None]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        quantizer.on_train_step(step, model)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_qat_trains_converts_and_stays_close(family, engine):
    reference = FAMILIES[family]()
    ids = token_blocks(1, 40, seed=9)[0][None]
    quantizer, model = _prepared(FAMILIES[family](), engine=engine, freeze_observers_after=2)
    fake = [m for m in model.modules() if isinstance(m, QuantBoundary)]
    assert fake and all(type(m.module).__module__.startswith("torch.ao.nn.qat") for m in fake)
    losses = _train_steps(quantizer, model, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert quantizer.frozen
    fake_quant_logits = logits(model.eval(), ids)  # observers are frozen: the ranges int8 will use
    model = quantizer.convert(model)
    by_name = assert_every_layer_reported(reference, quantizer.layer_report(model), QuantBoundary)
    for name, row in by_name.items():
        if row.module_type in ("Linear", "Conv1D"):
            assert row.quantized and type(model.get_submodule(name).module).__name__ == "Linear"
            assert "torch.ao.nn.quantized" in type(model.get_submodule(name).module).__module__
    out = logits(model, ids)
    assert torch.isfinite(out).all()
    # the real int8 model computes what the fake-quant model simulated
    assert relative_error(out, fake_quant_logits) < 0.1


def test_qat_fake_quant_runs_under_bf16_autocast():
    quantizer, model = _prepared(make_tiny_llama(), engine="fbgemm", smoothquant_alpha=None)
    losses = _train_steps(quantizer, model, 2, autocast=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    grads_seen = any(p.grad is None for p in model.parameters())  # zeroed after each step
    assert grads_seen
    model = quantizer.convert(model)
    assert torch.isfinite(logits(model, token_blocks(1, 16)[0][None])).all()


def test_qat_prepared_model_is_close_to_float_before_training():
    reference = make_tiny_gpt2()
    ids = token_blocks(1, 40, seed=2)[0][None]
    quantizer, model = _prepared(make_tiny_gpt2(), engine="qnnpack")
    _train_steps(quantizer, model, 1)  # observers need one training pass to see ranges
    model = quantizer.convert(model)
    assert relative_error(logits(model, ids), logits(reference, ids)) < 0.5


def test_qat_artifact_round_trip(tmp_path):
    from ftq_core.artifacts import save_artifact
    from ftq_core.pipeline import load

    quantizer, model = _prepared(make_tiny_llama(), engine="fbgemm")
    _train_steps(quantizer, model, 2)
    model = quantizer.convert(model)
    ids = token_blocks(1, 24, seed=4)[0][None]
    before = logits(model, ids)
    save_artifact(model, None, tmp_path / "art", manifest={"method": "qat", "engine": quantizer.engine})
    assert torch.equal(logits(load(tmp_path / "art").model, ids), before)


def test_qat_through_the_pipeline(tiny_loaded, fast_run_options):
    from ftq_core.pipeline import run

    options = dict(fast_run_options, quantizer={"name": "qat", "engine": "qnnpack", "freeze_observers_after": 2},
                   evaluate_pretrained=True, calibration_batches=2)
    result = run(options, model=tiny_loaded)
    assert result.train is not None and result.train.steps == 3
    assert sum(layer.quantized for layer in result.layers) == 15
    assert result.quantized.perplexity is not None and result.quantized.perplexity < 2 * result.baseline.perplexity
