"""Quantizing one decoder layer at a time (ftq_core.layerwise): the same artifact as the whole model, resume
after a kill, sharded artifacts that load, and refusals before any weight is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ftq_core import load
from ftq_core.errors import ArtifactError, ModelNotFoundError, UsageError
from ftq_core.pipeline import quantize_to_artifact


def _save_tiny(path: Path, tokenizer, *, tied: bool, family: str = "llama", dtype=torch.bfloat16) -> Path:
    """A tiny model of ``family`` with random norm gains (so folding them matters), in several bf16 shards."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    config = AutoConfig.for_model(
        family, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.05, 0.5)
    model.to(dtype).save_pretrained(path, safe_serialization=True, max_shard_size="60KB")
    tokenizer.save_pretrained(path)
    assert (path / "model.safetensors.index.json").is_file()  # really sharded
    return path


def _killed_before_writing(monkeypatch, *, layer: int):
    """Make layer-by-layer quantization stop as a kill would, just before writing ``layer``; returns the real
    writer, to put back."""
    import ftq_core.layerwise as layerwise

    real_write = layerwise._write_layer

    def killed(journal, index, *args):
        if index == layer:
            raise KeyboardInterrupt
        return real_write(journal, index, *args)

    monkeypatch.setattr(layerwise, "_write_layer", killed)
    return real_write


def _tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def _assert_same_artifact(whole: Path, layerwise: Path) -> None:
    a, b = _tensors(whole), _tensors(layerwise)
    assert a.keys() == b.keys()
    unequal = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert unequal == []
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (whole, layerwise))
    ma.pop("files"), mb.pop("files")
    assert ma == mb
    assert json.loads((whole / "config.json").read_text()) == json.loads((layerwise / "config.json").read_text())


@pytest.mark.parametrize(
    "family, tied, quantizer, options",
    [
        ("llama", True, "dynamic", {}),
        ("llama", False, "dynamic", {"kernel": "int-mm"}),
        ("llama", True, "dynamic", {"untie_head": True, "kernel": "int-mm"}),
        ("qwen2", True, "dynamic", {"rotate": "false", "keep_float": ["*.down_proj"], "quantize_embeddings": False}),
        ("mistral", False, "dynamic", {"kernel": "int-mm"}),
        ("llama", True, "dynamic", {"weight_rounding": "gptq", "kernel": "int-mm"}),
        ("llama", False, "dynamic", {"weight_rounding": "gptq", "untie_head": True, "kernel": "int-mm"}),
        ("llama", True, "static", {"ppl_budget": None}),
        ("llama", False, "static", {"rotate": "false", "ppl_budget": None}),
        ("qwen2", False, "static", {"quantize_embeddings": False, "ppl_budget": None}),
    ],
)
def test_layer_by_layer_gives_the_whole_models_artifact(tmp_path, tiny_tokenizer, family, tied, quantizer, options):
    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=tied, family=family)
    whole, _ = quantize_to_artifact(str(source), tmp_path / "whole", quantizer, options, layerwise="off")
    sharded, result = quantize_to_artifact(str(source), tmp_path / "lw", quantizer, options, layerwise="on")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    _assert_same_artifact(whole, sharded)
    assert sum(r.quantized for r in result.layers) > 0
    # the sharded artifact loads, and computes what the whole-model one does
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        assert torch.equal(load(whole).model(ids).logits, load(sharded).model(ids).logits)
    assert not any(p.name.endswith(".layerwise") for p in tmp_path.iterdir())  # work directory removed


@pytest.mark.parametrize("quantizer, options", [("dynamic", {"kernel": "int-mm"}), ("static", {"ppl_budget": None})])
def test_a_killed_run_resumes_after_the_last_written_layer(tmp_path, tiny_tokenizer, monkeypatch, quantizer, options):
    import ftq_core.layerwise as layerwise
    from ftq_plugins.quantizers.layerwise import LayerwiseConversion

    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=True)
    whole, _ = quantize_to_artifact(str(source), tmp_path / "whole", quantizer, options, layerwise="off")

    real_write = _killed_before_writing(monkeypatch, layer=2)
    with pytest.raises(KeyboardInterrupt):
        quantize_to_artifact(str(source), tmp_path / "out", quantizer, options, layerwise="on")
    work = layerwise.work_dir_for((tmp_path / "out").absolute())
    assert sorted(json.loads((work / "progress.json").read_text())["layers"]) == ["0", "1"]
    assert not (tmp_path / "out").exists()

    monkeypatch.setattr(layerwise, "_write_layer", real_write)
    converted = []
    real_convert = LayerwiseConversion.convert_layer
    monkeypatch.setattr(LayerwiseConversion, "convert_layer",
                        lambda self, model, index, run=None: (converted.append(index), real_convert(self, model, index, run)))
    path, _ = quantize_to_artifact(str(source), tmp_path / "out", quantizer, options, layerwise="on")
    assert converted == [2]
    _assert_same_artifact(whole, path)
    assert not work.exists()


def test_a_damaged_written_layer_is_converted_again(tmp_path, tiny_tokenizer, monkeypatch):
    import ftq_core.layerwise as layerwise
    from ftq_plugins.quantizers.layerwise import LayerwiseConversion

    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=False)
    options = {"kernel": "int-mm"}
    whole, _ = quantize_to_artifact(str(source), tmp_path / "whole", "dynamic", options, layerwise="off")
    real_write = _killed_before_writing(monkeypatch, layer=2)
    with pytest.raises(KeyboardInterrupt):
        quantize_to_artifact(str(source), tmp_path / "out", "dynamic", options, layerwise="on")
    work = layerwise.work_dir_for((tmp_path / "out").absolute())
    shard = work / json.loads((work / "progress.json").read_text())["layers"]["1"]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    monkeypatch.setattr(layerwise, "_write_layer", real_write)
    converted = []
    real_convert = LayerwiseConversion.convert_layer
    monkeypatch.setattr(LayerwiseConversion, "convert_layer",
                        lambda self, model, index, run=None: (converted.append(index), real_convert(self, model, index, run)))
    path, _ = quantize_to_artifact(str(source), tmp_path / "out", "dynamic", options, layerwise="on")
    assert converted == [1, 2]
    _assert_same_artifact(whole, path)


def test_other_options_start_over_instead_of_reusing_layers(tmp_path, tiny_tokenizer, monkeypatch):
    import ftq_core.layerwise as layerwise

    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=True)
    real_write = _killed_before_writing(monkeypatch, layer=1)
    with pytest.raises(KeyboardInterrupt):
        quantize_to_artifact(str(source), tmp_path / "out", "dynamic", {"kernel": "int-mm"}, layerwise="on")
    monkeypatch.setattr(layerwise, "_write_layer", real_write)
    options = {"kernel": "int-mm", "keep_float": ["*.o_proj"]}
    path, _ = quantize_to_artifact(str(source), tmp_path / "out", "dynamic", options, layerwise="on")
    whole, _ = quantize_to_artifact(str(source), tmp_path / "whole", "dynamic", options, layerwise="off")
    _assert_same_artifact(whole, path)


def test_layerwise_on_refuses_what_it_cannot_do_before_reading_weights(tmp_path, tiny_tokenizer, monkeypatch):
    import ftq_core.checkpoint as checkpoint

    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=True)
    monkeypatch.setattr(checkpoint.SafetensorsCheckpoint, "read", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(UsageError, match="smoothquant_alpha compare.* layers across the whole float model; set smoothquant_alpha=none"):
        quantize_to_artifact(str(source), tmp_path / "a", "dynamic", {"smoothquant_alpha": 0.5}, layerwise="on")
    with pytest.raises(UsageError, match="converts the whole model only"):
        quantize_to_artifact(str(source), tmp_path / "b", "qat-int8", {}, layerwise="on")
    with pytest.raises(UsageError, match="ppl_budget compare.* layers across the whole float model; set ppl_budget=none"):
        quantize_to_artifact(str(source), tmp_path / "b", "static", {}, layerwise="on")  # static's default budget
    with pytest.raises(UsageError, match="backend 'torch-ao' converts the whole model"):
        quantize_to_artifact(str(source), tmp_path / "b", "static", {"backend": "torch-ao"}, layerwise="on")
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UsageError, match="not a Hugging Face safetensors directory"):
        quantize_to_artifact(str(gguf), tmp_path / "c", "dynamic", {}, layerwise="on")
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2)).save_pretrained(gpt2)
    tiny_tokenizer.save_pretrained(gpt2)
    with pytest.raises(UsageError, match="decoder layers are not at model.layers"):
        quantize_to_artifact(str(gpt2), tmp_path / "e", "dynamic", {}, layerwise="on")
    with pytest.raises(UsageError, match="layerwise must be one of"):
        quantize_to_artifact(str(source), tmp_path / "d", "dynamic", {}, layerwise="sometimes")


def test_memory_that_does_not_fit_is_refused_or_goes_layer_by_layer(tmp_path, tiny_tokenizer, monkeypatch):
    from transformers import AutoConfig

    import ftq_core.memory_plan as memory_plan
    from ftq_core.checkpoint import SafetensorsCheckpoint

    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=True)
    plan = memory_plan.plan_quantize_memory(SafetensorsCheckpoint(source), AutoConfig.from_pretrained(source))
    assert plan.layerwise < plan.whole
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: plan.layerwise // 2)
    with pytest.raises(UsageError, match=r"layer by layer needs about .* GiB of memory and .* is available"):
        quantize_to_artifact(str(source), tmp_path / "a", "dynamic", {}, layerwise="auto")
    with pytest.raises(UsageError, match=r"as a whole model needs .*use --layerwise on|as a whole model needs"):
        quantize_to_artifact(str(source), tmp_path / "b", "dynamic", {}, layerwise="off")
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: (plan.layerwise + plan.whole) // 2)
    with pytest.raises(UsageError, match="use --layerwise on"):
        quantize_to_artifact(str(source), tmp_path / "c", "dynamic", {}, layerwise="off")
    path, _ = quantize_to_artifact(str(source), tmp_path / "d", "dynamic", {"kernel": "int-mm"}, layerwise="auto")
    assert (path / "model.safetensors.index.json").is_file()  # auto chose layer by layer
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: plan.whole * 2)
    path, _ = quantize_to_artifact(str(source), tmp_path / "e", "dynamic", {"kernel": "int-mm"}, layerwise="auto")
    assert (path / "model.safetensors").is_file()  # both fit: the whole model, as before


def test_checkpoints_that_do_not_fit_their_config_are_refused_from_the_headers(tmp_path, tiny_tokenizer):
    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=True)
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match="not a .safetensors file beside it"):
        quantize_to_artifact(str(source), tmp_path / "a", "dynamic", {}, layerwise="on")

    source = _save_tiny(tmp_path / "src2", tiny_tokenizer, tied=True)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError, match=r"do not fit the model's config: \d+ weight\(s\) missing"):
        quantize_to_artifact(str(source), tmp_path / "b", "dynamic", {}, layerwise="on")


def test_a_sharded_artifact_is_verified_shard_by_shard(tmp_path, tiny_tokenizer):
    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=True)
    path, _ = quantize_to_artifact(str(source), tmp_path / "lw", "dynamic", {"kernel": "int-mm"}, layerwise="on")
    shard = path / "model-00002-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model-00002-of-00004.safetensors does not match its checksum"):
        load(path)


def test_the_cli_quantizes_layer_by_layer(tmp_path, tiny_tokenizer):
    from click.testing import CliRunner

    from ftq_core.cli import cli

    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=True)
    result = CliRunner().invoke(cli, ["quantize", str(source), "-o", str(tmp_path / "out"), "--layerwise", "on"])
    assert result.exit_code == 0, result.output
    assert "saved to" in result.output and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    result = CliRunner().invoke(cli, ["quantize", str(source), "-o", str(tmp_path / "x"), "--layerwise", "on",
                                      "--set", "ppl_budget=3"])
    assert result.exit_code != 0 and "cannot quantize layer by layer: ppl_budget" in result.output
    assert "Traceback" not in result.output


def _adapter_run(source: Path, out: Path, tokenizer_dir: Path | None = None, **extra) -> dict:
    return {"model": str(source), "output_dir": str(out), "adapter": "lora", "evaluate_pretrained": False,
            "trainer": {"max_steps": 2, "progress": False, "batch_size": 2},
            "dataset": {"block_size": 32}, "eval": {"latency": False, "max_blocks": 2}, **extra}


def test_an_adapter_run_over_a_model_too_big_to_load_quantizes_it_layer_by_layer_first(tmp_path, tiny_tokenizer,
                                                                                       monkeypatch):
    import ftq_core
    import ftq_core.memory_plan as memory_plan
    import ftq_core.models as models

    source = _save_tiny(tmp_path / "src", tiny_tokenizer, tied=True)
    whole_loads = []
    real_load = models.load_model
    monkeypatch.setattr("ftq_core.stages.load_model", lambda *a, **k: whole_loads.append(a) or real_load(*a, **k))
    plan = memory_plan.plan_quantize_memory(*_lazy_parts(source))
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: (plan.layerwise + plan.whole) // 2)  # only layer by layer fits
    result = ftq_core.run(_adapter_run(source, tmp_path / "out"))
    assert whole_loads == []  # the float model was never loaded whole
    base = tmp_path / "out" / "base"
    assert (base / "model.safetensors.index.json").is_file() and result.artifact_dir == tmp_path / "out" / "model"
    assert load(result.artifact_dir).manifest["adapter"]["name"] == "lora"
    _assert_same_artifact(quantize_to_artifact(str(source), tmp_path / "lw", "dynamic", {}, layerwise="on")[0], base)

    monkeypatch.setattr(memory_plan, "available_bytes", lambda: plan.whole * 4)  # fits whole: one chain, as before
    ftq_core.run(_adapter_run(source, tmp_path / "whole"))
    assert not (tmp_path / "whole" / "base").exists() and len(whole_loads) == 1
    ftq_core.run(_adapter_run(source, tmp_path / "forced", layerwise="on"))
    assert (tmp_path / "forced" / "base" / "model.safetensors.index.json").is_file()


def _lazy_parts(source: Path):
    from transformers import AutoConfig

    from ftq_core.checkpoint import SafetensorsCheckpoint

    return SafetensorsCheckpoint(source), AutoConfig.from_pretrained(source)


@pytest.mark.slow
@pytest.mark.parametrize("quantizer, options", [("dynamic", {}), ("static", {"ppl_budget": None})])
def test_bundled_model_layer_by_layer_is_the_same_artifact(tmp_path, bundled_model, quantizer, options):
    """The real SmolLM2 (its dequantized safetensors cache, a Hugging Face directory): both paths, same bits."""
    from ftq_core.models import bundled_gguf_path, model_cache_dir

    source = sorted(model_cache_dir().glob(bundled_gguf_path("smollm2").stem + "-*"))[-1]
    whole, _ = quantize_to_artifact(str(source), tmp_path / "whole", quantizer, options, layerwise="off")
    sharded, _ = quantize_to_artifact(str(source), tmp_path / "lw", quantizer, options, layerwise="on")
    _assert_same_artifact(whole, sharded)
