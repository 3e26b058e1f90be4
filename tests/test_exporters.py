"""``ftq export``: artifacts written as float Hugging Face directories that transformers loads as they ran."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from ftq_testing import make_tiny_llama
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import ftq_core
from ftq_core.artifacts import LoadedArtifact, save_artifact
from ftq_core.errors import ArtifactError

FIXTURES = Path(__file__).parent / "fixtures" / "artifacts_v1"
EXPECTED = load_file(str(FIXTURES / "expected_logits.safetensors"))


@pytest.mark.parametrize("name", ["dynamic", "dynamic-torch-ao", "static", "static-torch-ao", "qat-int8", "qat"])
def test_every_quantized_module_type_exports_to_a_directory_transformers_loads(name, tmp_path):
    written = ftq_core.export(FIXTURES / name, tmp_path / "hf")
    assert "read back bit for bit" in written
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files and not any(f.endswith(".py") for f in files)
    assert not list(tmp_path.glob(".hf.partial-*"))  # the staging directory became the export
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    assert not hasattr(model.config, "ftq_attention_dtype")
    aliases = json.loads((FIXTURES / name / "manifest.json").read_text())["aliases"]
    shared = aliases.get("lm_head.weight_int8") == "model.embed_tokens.weight_int8"  # one int8 tensor for both
    # tied where the artifact applies one weight for both; apart where the quantizer rounded lm_head on its own
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == shared
    with torch.no_grad():
        logits = model(input_ids=EXPECTED["input_ids"][None]).logits[0]
    # the float model differs from the int8 one by activation rounding only (7-bit activations on torch.ao)
    error = ((logits - EXPECTED[name]).norm() / EXPECTED[name].norm()).item()
    assert error < 0.05, error


def test_exported_weights_are_the_saved_int8_values_times_their_scales(tmp_path):
    for name, layer in (("dynamic", "model.layers.0.self_attn.q_proj"), ("static", "model.layers.1.mlp.down_proj")):
        ftq_core.export(FIXTURES / name, tmp_path / name)
        saved = load_file(str(FIXTURES / name / "model.safetensors"))
        weight = saved[f"{layer}.weight_int8"].float() * saved[f"{layer}.weight_scale"][:, None]
        if f"{layer}.smooth" in saved:  # SmoothQuant: the layer saw x / smooth
            weight = weight / saved[f"{layer}.smooth"][None, :]
        exported = load_file(str(tmp_path / name / "model.safetensors"))
        assert torch.equal(exported[f"{layer}.weight"], weight)


def test_float_layers_export_bit_identical(tmp_path, tiny_tokenizer):
    model = make_tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    kept = ftq_core.quantize(model, "dynamic", {"keep_float": ["*"], "quantize_embeddings": False})
    save_artifact(kept.model, tiny_tokenizer, tmp_path / "art", manifest={"method": "dynamic"})
    ftq_core.export(tmp_path / "art", tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).state_dict()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_bfloat16_export_halves_the_weights(tmp_path):
    ftq_core.export(FIXTURES / "dynamic", tmp_path / "hf", options={"dtype": "bfloat16"})
    tensors = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_a_module_type_the_exporter_does_not_know_is_refused_with_the_fix(tmp_path):
    from ftq_plugins.exporters.hf import HFExportConfig, HFExporter

    class PluginLinear(torch.nn.Module):
        def forward(self, x):
            return x

    model = make_tiny_llama()
    model.model.layers[0].mlp.up_proj = PluginLinear()
    with pytest.raises(ArtifactError, match="layer 'model.layers.0.mlp.up_proj' is a PluginLinear .* to_float"):
        HFExporter(HFExportConfig()).export(LoadedArtifact(model, None, {}), tmp_path)


def test_cli_export_writes_once_and_refuses_what_it_would_overwrite(tmp_path):
    from ftq_core.cli import cli

    runner = CliRunner()
    out = tmp_path / "hf"
    done = runner.invoke(cli, ["export", str(FIXTURES / "dynamic"), "-o", str(out)])
    assert done.exit_code == 0, done.output
    # (transformers' own bars, silenced in a fresh ftq process, may precede it here)
    assert f"exported {FIXTURES / 'dynamic'} to {out}: a float32 Hugging Face directory" in done.output
    again = runner.invoke(cli, ["export", str(FIXTURES / "dynamic"), "-o", str(out)])
    assert again.exit_code != 0 and "already exists and is not an empty directory; choose another -o" in again.output
    unknown = runner.invoke(cli, ["export", str(FIXTURES / "dynamic"), "-o", str(tmp_path / "x"), "--format", "onnx"])
    assert unknown.exit_code != 0 and "hf" in unknown.output and "Traceback" not in unknown.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("storage, tolerance", [("q8_0", 0.05), ("f16", 5e-3), ("f32", 1e-5)])
def test_gguf_export_reads_back_in_transformers_with_its_tokenizer(storage, tolerance, tmp_path):
    from transformers import AutoTokenizer

    written = ftq_core.export(FIXTURES / "static", tmp_path / "gguf", "gguf", {"type": storage})
    assert written.startswith(f"model-{storage}.gguf: llama GGUF with {storage} weights") and "tokenizer identical" in written
    ftq_core.export(FIXTURES / "static", tmp_path / "hf")  # the float weights, to compare with
    float_model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    name = f"model-{storage}.gguf"
    from_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gguf"), gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "gguf"), gguf_file=name)
    assert tokenizer("To be, or not to be")["input_ids"] == AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(
        "To be, or not to be")["input_ids"]
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(str(tmp_path / "hf")).chat_template
    with torch.no_grad():
        expected = float_model(input_ids=EXPECTED["input_ids"][None]).logits
        got = from_gguf(input_ids=EXPECTED["input_ids"][None]).logits
    assert float((got - expected).norm() / expected.norm()) < tolerance


def test_gguf_export_of_a_family_the_exporter_does_not_write_is_refused_with_the_reason(tmp_path, tiny_gpt2, tiny_tokenizer):
    save_artifact(tiny_gpt2, tiny_tokenizer, tmp_path / "art", manifest={"method": "none"})
    with pytest.raises(ArtifactError, match="GPT-2's fused Conv1D layout is not among them; export it with --format hf"):
        ftq_core.export(tmp_path / "art", tmp_path / "gguf", "gguf")
    assert not (tmp_path / "gguf").exists() and not list(tmp_path.glob(".gguf.partial-*"))


@pytest.mark.slow
def test_bundled_model_q8_0_gguf_is_closer_to_float_than_ftq_int8(bundled_model, tmp_path):
    """llama.cpp's q8_0 (8-bit weights only) of the real SmolLM2, read back by transformers, against ftq's W8A8."""
    import copy

    float_model, tokenizer = bundled_model.model, bundled_model.tokenizer
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 12, return_tensors="pt").input_ids[:, :128]
    int8 = ftq_core.quantize(copy.deepcopy(float_model), "dynamic", {"kernel": "int-mm"}).model
    as_float = ftq_core.quantize(copy.deepcopy(float_model), "dynamic", {"keep_float": ["*"], "quantize_embeddings": False})
    save_artifact(as_float.model, tokenizer, tmp_path / "art", manifest={"method": "dynamic"})
    ftq_core.export(tmp_path / "art", tmp_path / "gguf", "gguf", {"type": "q8_0", "verify": False})  # read back here
    from_gguf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gguf"), gguf_file="model-q8_0.gguf", dtype=torch.float32)
    with torch.no_grad():
        reference = float_model(input_ids=ids).logits
        gguf_error = (from_gguf(input_ids=ids).logits - reference).norm() / reference.norm()
        int8_error = (int8(input_ids=ids).logits - reference).norm() / reference.norm()
    assert gguf_error < int8_error, (float(gguf_error), float(int8_error))


def test_gguf_vocabulary_must_be_byte_level_bpe():
    from ftq_plugins.exporters.gguf_vocabulary import byte_level

    assert byte_level({"pre_tokenizer": {"type": "ByteLevel"}})
    assert byte_level({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel"}]}})
    assert not byte_level({"pre_tokenizer": {"type": "Metaspace"}})  # SentencePiece-style (Llama 2, Mistral)
    assert not byte_level({"pre_tokenizer": None})


def test_gguf_export_reads_back_tensor_by_tensor_where_two_float_copies_would_not_fit(tmp_path, monkeypatch):
    import ftq_core.memory_plan

    monkeypatch.setattr(ftq_core.memory_plan, "available_bytes", lambda: 1 << 20)  # 1 MiB: no float copy fits
    written = ftq_core.export(FIXTURES / "static", tmp_path / "gguf", "gguf")
    assert "read back tensor by tensor: each within" in written and "tokenizer identical" in written


@pytest.mark.parametrize("read_back", ["tensors", "logits"])
def test_a_gguf_file_that_does_not_read_back_as_written_is_not_kept(read_back, tmp_path, monkeypatch):
    import numpy as np

    from ftq_plugins.exporters import gguf_file

    encoded = gguf_file._encoded

    def damaged(data, storage):  # one weight of one tensor written wrong, as a faulty encoder would
        out = encoded(data, storage)
        if storage is gguf_file.GGUFType.F16 and out.ndim == 2 and out.shape[0] > 100:
            out = out.copy()
            out[:50] = np.float16(3.0)
        return out

    monkeypatch.setattr(gguf_file, "_encoded", damaged)
    with pytest.raises(ArtifactError, match="the export was not kept"):
        ftq_core.export(FIXTURES / "static", tmp_path / "gguf", "gguf", {"type": "f16", "read_back": read_back})
    assert not (tmp_path / "gguf").exists() and not list(tmp_path.glob(".gguf.partial-*"))


@pytest.mark.parametrize("options", [{}, {"rotate": "off"}], ids=["rotated", "plain"])
def test_streamed_float_tensors_are_the_float_models_and_leave_the_artifact_as_it_was(options, tiny_tokenizer):
    import copy

    from ftq_plugins.exporters.float_modules import float_tensors, head_is_embeddings, to_float_model

    model = ftq_core.quantize(make_tiny_llama(len(tiny_tokenizer)), "dynamic", options).model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    streamed = dict(float_tensors(model))
    planned = [(name, tuple(tensor.shape)) for name, tensor in float_tensors(model, shapes_only=True)]
    assert planned == [(name, tuple(tensor.shape)) for name, tensor in streamed.items()]  # the plan, without the work
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed in place
    floated = copy.deepcopy(model)
    to_float_model(floated)
    expected = floated.state_dict()
    tied = head_is_embeddings(model)
    assert tied == bool(floated.config.tie_word_embeddings) == (options == {"rotate": "off"})
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in expected), [k for k in expected
                                                                         if not torch.equal(streamed[k], expected[k])]


def test_gguf_pre_tokenizer_names_the_tokenizers_own_splitting_rules_or_refuses(tiny_tokenizer):
    import copy

    from tokenizers import Regex, pre_tokenizers

    from ftq_plugins.exporters.gguf_vocabulary import pre_tokenizer_name

    qwen2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
    llama3 = qwen2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
    cases = {
        "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False)]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(qwen2), "isolated"),
                                          pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), "isolated"),
                                              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }
    tokenizer = copy.deepcopy(tiny_tokenizer)
    for name, pre in cases.items():
        tokenizer.backend_tokenizer.pre_tokenizer = pre
        assert pre_tokenizer_name(tokenizer, {}) == name
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s+"), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    with pytest.raises(ArtifactError, match=r"no llama.cpp name for \('\\\\s\+'\), and llama.cpp would tokenize prompts"):
        pre_tokenizer_name(tokenizer, {})
