"""The measurement scripts in benchmarks/ run, parse their settings and check what they claim (CPU, tiny sizes)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accuracy_method_labels_carry_qat_settings():
    accuracy = load_script("accuracy")
    defaults = argparse.Namespace(qat_lr=1e-5, qat_steps=30, qat_batch=1, freeze_after=None, distill=0.0)
    method, args = accuracy.resolve("qat fbgemm sq0.5 lr1e-4 s200 b4 f100 d1", defaults)
    assert method == "qat fbgemm sq0.5"
    assert (args.qat_lr, args.qat_steps, args.qat_batch, args.freeze_after, args.distill) == (1e-4, 200, 4, 100, 1.0)
    assert accuracy.resolve("static ftq", defaults) == ("static ftq", defaults)
    with pytest.raises(SystemExit, match="unknown method 'qat fbgemm sq0.5 x3'"):
        accuracy.resolve("qat fbgemm sq0.5 x3", defaults)


def test_accuracy_interleaves_two_texts_for_calibration():
    accuracy = load_script("accuracy")
    mixed = accuracy.Interleaved(["a0", "a1", "a2"], ["b0"])
    assert [mixed[i] for i in range(len(mixed))] == ["a0", "b0", "a1", "a2"]


def test_gpu_qat_script_runs_on_the_cpu_and_its_conversion_is_exact(tmp_path):
    out = tmp_path / "single.json"
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "gpu_qat.py"), "single", "--tiny", "--modes", "eager",
         "--warmup", "1", "--steps", "1", "--windows", "1", "--batch", "2", "--seq", "32", "--out", str(out)],
        check=True, capture_output=True, timeout=300,
    )
    results = json.loads(out.read_text())
    assert [run["variant"] for run in results["runs"]] == ["plain bf16 eager", "qat-int8 eager"]
    assert all(run["tokens_per_s"] > 0 for run in results["runs"])
    agreement = results["agreement"]
    # on one device the fake-quant model and its int8 conversion agree exactly...
    assert agreement["fp32_fake_quant_cpu_vs_int8_cpu"]["rel_l2"] == 0.0
    # ...while int8 rounding itself does change the outputs
    assert agreement["reference_float_vs_int8_cpu (what int8 rounding changes)"]["rel_l2"] > 1e-4


def test_gpu_lora_script_runs_on_the_cpu_and_its_artifact_reloads_exactly(tmp_path):
    out = tmp_path / "lora.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "gpu_lora.py"), "--tiny", "--out", str(out)],
                   check=True, capture_output=True, timeout=300, env={**os.environ, "FTQ_LOAD_PLUGINS": ""})
    results = json.loads(out.read_text())
    assert [label for label, _ in results["lora"]["rows"]] == ["int8 dynamic", "int8 dynamic + lora"]
    assert results["full"]["tokens_per_second"] > 0 and results["lora"]["tokens_per_second"] > 0
    assert results["lora"]["reload_max_abs_diff"] == 0.0


def test_heldout_accuracy_texts_are_three_genres_no_calibration_sees():
    heldout = load_script("heldout_accuracy")
    texts = heldout.held_out_texts()
    assert sorted(texts) == ["code", "drama", "legal"] and all(len(t) > 10_000 for t in texts.values())
    sample = (Path(__file__).resolve().parent.parent / "plugins" / "data" / "sample.txt").read_text()
    for text in texts.values():  # nothing of the calibration text (the bundled sample) is in them
        assert text[1000:1200] not in sample


@pytest.mark.parametrize("by", ["type", "layer"])
def test_heldout_breakdown_groups_leave_exactly_one_group_to_the_quantizer(by, tiny_llama):
    """Each group's keep_float patterns, given to ``dynamic`` through accuracy.quantize_one, quantize that group's
    layers and nothing else (the tiny Llama: 2 layers, tied head)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        breakdown = load_script("heldout_breakdown")
        accuracy = load_script("accuracy")
    finally:
        sys.path.remove(str(BENCHMARKS))
    groups = breakdown.groups(tiny_llama.config.num_hidden_layers, by)
    assert len(groups) == (len(breakdown.PROJECTIONS) if by == "type" else 2)
    for label, keep_float in groups.items():
        model, _ = accuracy.quantize_one(tiny_llama, "dynamic", None, argparse.Namespace(), {"keep_float": keep_float})
        int8 = {name for name, module in model.named_modules()
                if type(module).__name__ in ("Int8DynamicLinear", "Int8Embedding")}
        expected = ({name for name, _ in tiny_llama.named_modules() if name.rsplit(".", 1)[-1] == label}
                    if by == "type" else
                    {name for name, m in tiny_llama.named_modules()
                     if name.startswith(f"model.layers.{label.split()[1]}.") and isinstance(m, torch.nn.Linear)})
        assert int8 == expected, label
