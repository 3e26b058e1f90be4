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
            assert row.quantized
            layer = model.get_submodule(name)
            if name.endswith("mlp.down_proj"):  # per_token's default: ftq's per-token layer
                assert type(layer).__name__ == "Int8DynamicLinear"
                assert layer.input_rotation_block == (128 if family == "llama" else 0)
            elif name == "lm_head" and reference.config.tie_word_embeddings:
                # a tied head trains per-token, so that it and the int8 embeddings share one tensor
                assert type(layer).__name__ == "Int8DynamicLinear"
                embeddings = model.get_input_embeddings()
                assert layer.weight_int8 is embeddings.weight_int8
            else:
                assert "torch.ao.nn.quantized" in type(layer.module).__module__
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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_qat_starts_from_calibrated_ranges_that_convert_keeps(family, engine):
    """Before any training the fake-quant model is already the calibrated int8 model, and convert
    computes what it simulates: the engine's reduced input range sets the scale, not the clamp."""
    from ftq_plugins.qat.calibrated_ranges import activation_fake_quants

    reference = FAMILIES[family]()
    ids = token_blocks(1, 40, seed=2)[0][None]
    quantizer, model = _prepared(FAMILIES[family](), engine=engine)
    fake_quants = activation_fake_quants([m for m in model.modules() if isinstance(m, QuantBoundary)])
    assert fake_quants and not any(bool(fq.observer_enabled) for fq in fake_quants)
    assert all(fq.activation_post_process.quant_max == 255 for fq in fake_quants)
    fake_quant_logits = logits(model.eval(), ids)
    model = quantizer.convert(model)
    out = logits(model, ids)
    assert relative_error(out, fake_quant_logits) < 0.05
    assert relative_error(out, logits(reference, ids)) < 0.2


def test_qat_rotates_llama_and_falls_back_to_smoothquant_elsewhere():
    quantizer, _ = _prepared(make_tiny_llama(), engine="fbgemm")
    assert quantizer.outliers.rotate and quantizer.blocks
    assert all("rotated" in r.scheme for r in quantizer.reports if r.quantized)
    quantizer, _ = _prepared(make_tiny_gpt2(), engine="fbgemm")
    assert not quantizer.outliers.rotate and quantizer.outliers.alpha == 0.5


def test_qat_per_token_none_puts_every_layer_on_the_engine():
    quantizer, model = _prepared(make_tiny_llama(), engine="fbgemm", per_token=[])
    model = quantizer.convert(model)
    assert all(type(layer.mlp.down_proj) is QuantBoundary for layer in model.model.layers)


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
    assert sum(layer.quantized for layer in result.layers) == 15 + 1  # 14 Linear layers and the head, the embeddings
    assert result.quantized.perplexity is not None and result.quantized.perplexity < 2 * result.baseline.perplexity
