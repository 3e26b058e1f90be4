"""Artifacts: save → load gives identical outputs, with nothing unpickled, verified by checksums."""

from __future__ import annotations

import json

import pytest
import torch
from ftq_testing import make_tiny_gpt2, make_tiny_llama

from ftq_core.artifacts import load_artifact, save_artifact
from ftq_core.errors import ArtifactError
from ftq_core.pipeline import quantize
from ftq_core.plugins import Plugins


def tokens():
    return torch.randint(3, 512, (1, 20), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("make_model", "options"),
    [
        (make_tiny_llama, {}),
        (make_tiny_gpt2, {}),
        (make_tiny_llama, {"activation": "per-tensor", "engine": "x86"}),
        (make_tiny_llama, {"activation": "per-tensor", "engine": "qnnpack", "weight": "per-tensor"}),
        (make_tiny_llama, {"activation": "per-tensor", "dtype": "float16"}),
        (make_tiny_llama, {"keep_float": ["lm_head"]}),
    ],
    ids=["llama-per-token", "gpt2-per-token", "x86", "qnnpack-per-tensor", "float16", "tied-float-head"],
)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, tiny_tokenizer, make_model, options):
    plugins = Plugins(load_entrypoints=False)
    result = quantize(make_model(), "dynamic", options, plugins=plugins)
    with torch.no_grad():
        expected = result.model(tokens()).logits
    save_artifact(result.model, tiny_tokenizer, tmp_path / "art", manifest={"method": "dynamic", "engine": result.engine}, plugins=plugins)
    loaded = load_artifact(tmp_path / "art", plugins=plugins)
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens()).logits, expected)
    assert loaded.tokenizer is not None and loaded.manifest["method"] == "dynamic"
    assert not list(tmp_path.glob("*.partial-*"))


def test_float_model_round_trip_keeps_tied_weights(tmp_path):
    model = make_tiny_llama()
    save_artifact(model, None, tmp_path / "art", manifest={"method": "none"}, plugins=Plugins(load_entrypoints=False))
    loaded = load_artifact(tmp_path / "art", plugins=Plugins(load_entrypoints=False)).model
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_tampered_or_missing_files_are_refused(tmp_path):
    plugins = Plugins(load_entrypoints=False)
    model = quantize(make_tiny_llama(), "dynamic", plugins=plugins).model
    save_artifact(model, None, tmp_path / "art", manifest={"method": "dynamic"}, plugins=plugins)
    config = tmp_path / "art" / "config.json"
    config.write_text(config.read_text().replace('"hidden_act": "silu"', '"hidden_act": "gelu"'))
    with pytest.raises(ArtifactError, match="config.json does not match its checksum"):
        load_artifact(tmp_path / "art", plugins=plugins)
    (tmp_path / "art" / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        load_artifact(tmp_path / "art", plugins=plugins)


def test_codec_from_a_plugin_that_is_not_loaded_is_named(tmp_path):
    plugins = Plugins(load_entrypoints=False)
    model = quantize(make_tiny_llama(), "dynamic", plugins=plugins).model
    save_artifact(model, None, tmp_path / "art", manifest={"method": "dynamic"}, plugins=plugins)
    without_codecs = Plugins(builtins=("dynamic_quantizer",), load_entrypoints=False)
    with pytest.raises(ArtifactError, match="codec 'ftq.int8_dynamic_linear'.*Install or enable"):
        load_artifact(tmp_path / "art", plugins=without_codecs)


def test_manifest_records_versions_and_checksums(tmp_path):
    plugins = Plugins(load_entrypoints=False)
    model = quantize(make_tiny_llama(), "dynamic", plugins=plugins).model
    save_artifact(model, None, tmp_path / "art", manifest={"method": "dynamic", "engine": None}, plugins=plugins)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "config.json"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["modules"]["lm_head"]["codec"] == "ftq.int8_dynamic_linear"


def test_loaded_tensors_are_aligned_for_the_int8_kernels(tmp_path):
    """safetensors packs tensors back to back; torch's int8 weight-only GEMV crashes on an unaligned weight."""
    import torch

    from ftq_core.tensor_io import ALIGNMENT, load_tensors, save_tensors

    tensors = {"a": torch.zeros(3, dtype=torch.int8), "w": torch.randint(-9, 9, (16, 32), dtype=torch.int8),
               "s": torch.rand(16, dtype=torch.bfloat16)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    loaded = load_tensors(tmp_path / "t.safetensors")
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in loaded.values())
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    out = torch.ops.aten._weight_int8pack_mm(torch.randn(3, 32, dtype=torch.bfloat16), loaded["w"], loaded["s"])
    assert out.shape == (3, 16)


def test_a_run_directory_loads_its_model_artifact(tmp_path, tiny_loaded, fast_run_options):
    import ftq_core

    result = ftq_core.run(fast_run_options | {"trainer": "none"}, model=tiny_loaded)
    run_dir = result.artifact_dir.parent
    assert ftq_core.load(run_dir).manifest == ftq_core.load(result.artifact_dir).manifest
    assert ftq_core.evaluate_artifact(run_dir, settings=ftq_core.EvalSettings(max_blocks=1, latency=False)).perplexity
