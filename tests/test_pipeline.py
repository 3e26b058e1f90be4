"""The whole chain on a tiny model: run → report → artifact → load, from Python."""

from __future__ import annotations

import json

import pytest
import torch

import ftq_core
from ftq_core.errors import ConfigError, UsageError
from ftq_core.run_config import run_config_from_mapping


def test_run_writes_report_and_an_artifact_that_loads_to_the_same_outputs(tiny_loaded, fast_run_options, tmp_path):
    result = ftq_core.run(fast_run_options, model=tiny_loaded)
    labels = [row.label for row in result.rows]
    assert labels == ["fp32 pretrained", "fp32 fine-tuned", "int8 dynamic"]
    assert result.baseline.label == "fp32 fine-tuned"
    assert all(row.perplexity > 1 and row.prefill_ms > 0 and row.decode_tokens_per_s > 0 for row in result.rows)
    assert result.quantized.size_bytes < result.baseline.size_bytes
    assert result.train.steps == 3
    report = json.loads(result.report_paths["json"].read_text())
    assert report["layers_summary"]["layers_quantized"] == 16 and report["baseline"] == "fp32 fine-tuned"  # 15 Linear + embedding
    table = result.report_paths["markdown"].read_text()
    assert "| int8 dynamic |" in table and "Δ perplexity" in table
    assert result.report_paths["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    artifact = ftq_core.load(result.artifact_dir)
    manifest = artifact.manifest
    assert manifest["method"] == "dynamic" and manifest["dataset_fingerprint"]
    schemes = {layer["name"]: layer["scheme"] for layer in manifest["layers"]}
    assert schemes["model.layers.0.self_attn.q_proj"].startswith("int8 per-channel weight")
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(artifact.model(ids).logits, result.model(ids).logits)


def test_python_users_can_hand_in_their_own_texts(tiny_loaded, fast_run_options):
    texts = [f"Reading {i}: the tide was {i % 5} metres and the wind {i % 3} knots." for i in range(400)]
    options = {**fast_run_options, "trainer": "none", "evaluate_pretrained": False}
    result = ftq_core.run(options, model=tiny_loaded, data=texts)
    assert [row.label for row in result.rows] == ["int8 dynamic"] and result.train is None


def test_all_config_problems_are_reported_before_any_work(tmp_path):
    with pytest.raises(ConfigError) as info:
        ftq_core.run(
            {
                "output_dir": str(tmp_path),
                "modle": "x",
                "quantizer": {"name": "dynamik"},
                "trainer": {"max_steps": 0},
                "eval": {"repeats": 0},
            }
        )
    text = str(info.value)
    assert "unknown key 'modle' (did you mean 'model'?)" in text
    assert "[eval] repeats must be >= 1" in text
    # component names and options are checked together, before the model loads
    with pytest.raises(ConfigError) as info:
        ftq_core.run({"output_dir": str(tmp_path), "quantizer": {"name": "dynamik"}, "trainer": {"max_steps": 0}})
    assert "unknown quantizer 'dynamik'. Known quantizers: dynamic" in str(info.value)
    assert "max_steps must be >= 1" in str(info.value)


def test_unwritable_output_directory_fails_before_training(tmp_path, tiny_loaded, fast_run_options):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match="cannot write to output directory"):
        ftq_core.run({**fast_run_options, "output_dir": str(blocker / "out")}, model=tiny_loaded)


def test_toml_shape_maps_onto_run_config():
    config = run_config_from_mapping({"model": "m", "trainer": "none", "quantizer": {"name": "dynamic", "keep_float": ["lm_head"]}})
    assert not config.trains and config.quantizer.options == {"keep_float": ["lm_head"]}


def test_quantization_aware_run_distils_from_the_float_model(tiny_loaded, fast_run_options):
    trainer = {**fast_run_options["trainer"], "distill": 1.0, "checkpoint_every": 0, "lr": 1e-4}
    options = {**fast_run_options, "trainer": trainer, "quantizer": "qat-int8", "evaluate_pretrained": False}
    result = ftq_core.run(options, model=tiny_loaded)
    # KL to the float model starts near 0 (only int8 rounding differs); next-token loss would be ~ln(vocab)
    assert result.train.train_losses[0][1] < 0.05
    assert [row.label for row in result.rows][-1] == "int8 qat-int8"


def test_report_names_its_baseline_groups_float_reasons_and_shares_float_latency(tmp_path, tiny_loaded, fast_run_options):
    import ftq_core

    options = fast_run_options | {"quantizer": {"name": "dynamic", "keep_float": ["*.down_proj"]}}
    result = ftq_core.run(options, model=tiny_loaded)
    pretrained, tuned, _ = result.rows
    assert (pretrained.prefill_ms, pretrained.decode_tokens_per_s) == (tuned.prefill_ms, tuned.decode_tokens_per_s)
    assert pretrained.extra["latency_from"] == "fp32 fine-tuned"
    markdown = result.report_paths["markdown"].read_text()
    assert "relative to **fp32 fine-tuned**" in markdown and "relative to **fp32 fine-tuned**" in result.table()
    assert "- 2 layers (`model.layers.*.mlp.down_proj`) stay float:" in markdown
    assert markdown.count("stay float") < 5  # grouped, not one bullet per layer
    assert result.report_paths["chart"].read_bytes().startswith(b"\x89PNG")


def test_float_and_int8_speeds_are_measured_in_turns(tmp_path, tiny_loaded, fast_run_options):
    import ftq_core

    result = ftq_core.run(fast_run_options | {"eval": fast_run_options["eval"] | {"repeats": 2}}, model=tiny_loaded)
    _, tuned, int8 = result.rows
    for row in (tuned, int8):
        assert row.extra["latency"]["turns"] == 2 and row.extra["latency"]["prefill_spread"] >= 1.0
        assert row.prefill_ms == pytest.approx(row.extra["latency"]["prefill_ms"], abs=1e-3) and row.decode_tokens_per_s > 0
    assert "Speeds: the best of 2 turns, the models measured in turns." in result.table()


def test_noisy_turns_are_flagged(tiny_loaded):
    from ftq_core.evaluation import Evaluation
    from ftq_core.report import markdown_table

    steady = {"prefill_ms": 1.0, "decode_tokens_per_s": 10.0, "prefill_spread": 1.05, "decode_spread": 1.1, "turns": 3}
    rows = [Evaluation("fp32", 2.0, 100, 1.0, 10.0, extra={"latency": steady}),
            Evaluation("int8 x", 2.1, 25, 0.5, 30.0, extra={"latency": steady | {"decode_spread": 1.6}})]
    table = markdown_table(rows, baseline=rows[0])
    assert "Noise: the turns of int8 x differed by more than 20%" in table
