"""LoRA adapters trained over a frozen int8 model: gradients through int8 layers, training, saving, merging."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from ftq_testing import make_tiny_llama

import ftq_core
from ftq_core.errors import ArtifactError, UsageError
from ftq_core.models import LoadedModel
from ftq_plugins.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter, LoraOptions
from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear
from ftq_plugins.int8.w8a8_linear import ActivationMode, Int8W8A8Linear

INPUT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])


def _run_options(fast_run_options, *, quantizer="dynamic", steps=3, **adapter):
    options = copy.deepcopy(fast_run_options)
    options["trainer"] |= {"max_steps": steps, "checkpoint_every": 0}
    options["quantizer"] = {"name": quantizer}
    options["adapter"] = {"name": "lora", "rank": 4, **adapter}
    options["eval"]["latency"] = False
    return options


def _logits(model, ids=INPUT):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _int8_buffers(model) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for name, buf in model.named_buffers() if buf.dtype == torch.int8}


# -- gradients through int8 layers ------------------------------------------------


@pytest.mark.parametrize("smooth", [False, True])
def test_int8_linear_passes_the_gradient_of_the_float_map_it_stands_for(smooth):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    if smooth:
        layer = Int8W8A8Linear.from_float(linear, mode=ActivationMode.PER_TOKEN, smooth=torch.rand(64) + 0.5)
    else:
        layer = Int8DynamicLinear.from_float(linear)
    x = torch.randn(2, 7, 64, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ layer.dequantized_weight(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # outside autograd the layer runs its int8 kernel alone, unchanged
        assert torch.equal(layer(x), y.detach())
    assert not any(p.requires_grad for p in layer.parameters())  # nothing to update: buffers only


def test_adapter_gradients_match_those_over_the_dequantized_float_model(tiny_tokenizer):
    """Adapters low in the stack learn through the int8 layers above them: their gradients are those of the
    same adapters over the float model the int8 one stands for (up to activation rounding)."""
    from ftq_plugins.exporters.float_modules import to_float_model

    int8 = ftq_core.quantize(make_tiny_llama(len(tiny_tokenizer)), "dynamic").model
    reference = copy.deepcopy(int8)
    to_float_model(reference)
    adapter = LoraAdapter(LoraOptions(rank=4))
    int8, reference = adapter.attach(int8), adapter.attach(reference)
    torch.manual_seed(1)
    with torch.no_grad():  # the same non-zero adapters in both (B starts at zero, which would hide A's gradient)
        for name, p in int8.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.05)
                reference.get_parameter(name).copy_(p)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 24))
    for model in (int8, reference):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in int8.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    first = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    cosine = torch.nn.functional.cosine_similarity(grads[first].flatten(), expected[first].flatten(), dim=0)
    assert cosine > 0.99, cosine
    for name in grads:
        error = (grads[name] - expected[name]).norm() / expected[name].norm()
        assert error < 0.1, (name, error)


# -- training over each int8 quantizer's output ---------------------------------------


@pytest.mark.parametrize("quantizer", ["dynamic", "static"])
def test_lora_trains_over_the_frozen_int8_model(quantizer, fast_run_options, tiny_loaded, monkeypatch):
    from ftq_plugins.trainers import causal_lm

    seen = {}
    original = causal_lm.CausalLMTrainer._setup

    def spy(self, model, data, teacher):
        run = original(self, model, data, teacher)
        seen["before"] = _int8_buffers(model)
        seen["optimized"] = sum(p.numel() for group in run.optimizer.param_groups for p in group["params"])
        seen["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seen["lr"] = run.optimizer.defaults["lr"]
        return run

    monkeypatch.setattr(causal_lm.CausalLMTrainer, "_setup", spy)
    float_parameters = sum(p.numel() for p in tiny_loaded.model.parameters())
    result = ftq_core.run(_run_options(fast_run_options, quantizer=quantizer, steps=6), model=tiny_loaded)
    labels = [row.label for row in result.rows]
    assert labels == ["fp32 pretrained", f"int8 {quantizer}", f"int8 {quantizer} + lora"]
    untuned, tuned = result.rows[1].perplexity, result.rows[2].perplexity
    assert tuned < untuned
    # only the adapters train: the int8 base is bitwise as the quantizer left it, with no optimizer state
    assert seen["optimized"] == seen["trainable"] and 0 < seen["trainable"] < 0.2 * float_parameters
    assert seen["lr"] == causal_lm.ADAPTER_LR
    after = _int8_buffers(result.model)
    assert seen["before"].keys() == after.keys() and seen["before"]
    assert all(torch.equal(seen["before"][k], after[k]) for k in after)
    assert not any(p.requires_grad for n, p in result.model.named_parameters() if "lora_" not in n)


def test_lora_over_a_qat_int8_artifact(fast_run_options, tiny_loaded, tmp_path):
    qat = copy.deepcopy(fast_run_options)
    qat["quantizer"] = {"name": "qat-int8"}
    qat["trainer"] |= {"checkpoint_every": 0}
    qat["eval"]["latency"] = False
    base = ftq_core.run(qat, model=tiny_loaded).artifact_dir
    options = _run_options(fast_run_options)
    options.pop("quantizer")
    options |= {"model": str(base), "output_dir": str(tmp_path / "adapted")}
    result = ftq_core.run(options)
    assert [row.label for row in result.rows] == ["int8 qat-int8", "int8 qat-int8 + lora"]
    manifest = json.loads((result.artifact_dir / "manifest.json").read_text())
    assert manifest["method"] == "qat-int8" and manifest["base_artifact"] == str(base)
    assert manifest["adapter"]["name"] == "lora" and not manifest["adapter"]["merged"]
    torch.testing.assert_close(_logits(ftq_core.load(result.artifact_dir).model), _logits(result.model), rtol=0, atol=0)


# -- saving, loading, merging -------------------------------------------------------------


def test_saved_adapter_loads_back_to_identical_outputs_in_peft_format(fast_run_options, tiny_loaded):
    result = ftq_core.run(_run_options(fast_run_options), model=tiny_loaded)
    directory = result.artifact_dir
    manifest = json.loads((directory / "manifest.json").read_text())
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS} <= set(manifest["files"])  # checksummed with the base
    assert manifest["adapter"]["files"] == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    loaded = ftq_core.load(directory)
    assert type(loaded.model.model.layers[0].self_attn.q_proj).__name__ == "Int8LoraLinear"
    assert torch.equal(_logits(loaded.model), _logits(result.model))
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    # the base holds no adapter tensors; the adapter file holds nothing else, under peft's key names
    from safetensors.torch import load_file

    base_keys, adapter_keys = load_file(str(directory / "model.safetensors")), load_file(str(directory / ADAPTER_WEIGHTS))
    assert not any("lora_" in k or "base_layer" in k for k in base_keys)
    assert adapter_keys and all(k.startswith("base_model.model.") and ".lora_" in k for k in adapter_keys)


def test_peft_loads_the_adapter_onto_a_float_copy_of_the_base(fast_run_options, tiny_loaded, tmp_path):
    from peft import PeftModel

    from ftq_plugins.exporters.float_modules import to_float_model

    result = ftq_core.run(_run_options(fast_run_options), model=tiny_loaded)
    with LoraAdapter(LoraOptions()).detached(result.model) as base:
        float_base = copy.deepcopy(base)
    to_float_model(float_base)
    with_peft = PeftModel.from_pretrained(float_base, str(result.artifact_dir)).eval()
    ftq_core.export(result.artifact_dir, tmp_path / "hf")  # the float export folds the adapter in
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    torch.testing.assert_close(_logits(with_peft), _logits(exported), rtol=1e-4, atol=1e-4)
    # and the float export computes what the int8 model with its adapter does, up to activation rounding
    int8 = _logits(result.model)
    assert ((_logits(exported) - int8).norm() / int8.norm()).item() < 0.05


def test_a_changed_adapter_file_is_refused(fast_run_options, tiny_loaded):
    result = ftq_core.run(_run_options(fast_run_options), model=tiny_loaded)
    config = result.artifact_dir / ADAPTER_CONFIG
    config.write_text(config.read_text().replace('"r": 4', '"r": 8'))
    with pytest.raises(ArtifactError, match="adapter_config.json does not match its checksum"):
        ftq_core.load(result.artifact_dir)


def test_merge_requantizes_the_adapter_into_the_int8_weights(fast_run_options, tiny_loaded):
    result = ftq_core.run(_run_options(fast_run_options, merge=True), model=tiny_loaded)
    labels = [row.label for row in result.rows]
    assert labels[-2:] == ["int8 dynamic + lora (unmerged)", "int8 dynamic + lora (merged)"]
    unmerged, merged = result.rows[-2].perplexity, result.rows[-1].perplexity
    assert abs(merged - unmerged) / unmerged < 0.01  # one more int8 rounding of W + BA
    assert not any("lora" in name for name, _ in result.model.named_modules())
    files = {p.name for p in result.artifact_dir.iterdir()}
    assert ADAPTER_CONFIG not in files and ADAPTER_WEIGHTS not in files
    loaded = ftq_core.load(result.artifact_dir)
    assert isinstance(loaded.model.model.layers[0].self_attn.q_proj, Int8DynamicLinear)
    assert torch.equal(_logits(loaded.model), _logits(result.model))


def test_merge_of_one_layer_is_the_requantized_sum():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", Int8DynamicLinear.from_float(torch.nn.Linear(32, 16)))
    model.add_module("norm", torch.nn.LayerNorm(16))
    adapter = LoraAdapter(LoraOptions(rank=2, target_modules=("proj",)))
    model = adapter.attach(model)
    layer = model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        expected = layer.get_base_layer().dequantized_weight() + layer.get_delta_weight("default")
    adapter.merge(model)
    assert isinstance(model.proj, Int8DynamicLinear)
    error = (model.proj.dequantized_weight() - expected).abs().max()
    assert error <= expected.abs().amax(dim=1).max() / 127  # within half an int8 step of the largest row


# -- resume ------------------------------------------------------------------------------


def test_adapter_run_resumes_from_a_checkpoint_of_the_adapter_alone(fast_run_options, tiny_tokenizer, tmp_path):
    from ftq_plugins.trainers.checkpoints import latest_checkpoint

    def options(out, steps):
        opts = _run_options(fast_run_options, steps=steps)
        opts["trainer"] |= {"checkpoint_every": 2}
        return opts | {"output_dir": str(out), "keep_checkpoints": True}

    def tiny():
        return LoadedModel(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, "tiny")

    clean = ftq_core.run(options(tmp_path / "clean", 4), model=tiny())
    ftq_core.run(options(tmp_path / "cut", 2), model=tiny())  # as if killed after step 2's checkpoint
    checkpoint = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["trained_only"]  # the int8 base is rebuilt, not checkpointed
    size = (checkpoint / "model.safetensors").stat().st_size
    assert size < 0.5 * (tmp_path / "cut" / "model" / "model.safetensors").stat().st_size
    other_base = options(tmp_path / "cut", 4) | {"resume": True, "quantizer": {"name": "dynamic", "kernel": "int-mm",
                                                                                "keep_float": ["*.o_proj"]}}
    with pytest.raises(UsageError, match=r"cannot resume .*frozen: checkpoint"):  # the adapter alone was saved
        ftq_core.run(other_base, model=tiny())
    resumed = ftq_core.run(options(tmp_path / "cut", 4) | {"resume": True}, model=tiny())
    assert resumed.train.resumed_from == 2
    assert resumed.train.train_losses == clean.train.train_losses
    assert torch.equal(_logits(resumed.model), _logits(clean.model))


# -- refusals ---------------------------------------------------------------------------------


def test_adapter_with_a_quantizer_that_trains_is_refused_before_loading(fast_run_options):
    options = _run_options(fast_run_options, quantizer="qat-int8")
    options["model"] = "/nonexistent/model"  # never reached
    with pytest.raises(UsageError, match=r"run 'qat-int8' first, then train the adapter over its artifact"):
        ftq_core.run(options)


def test_adapter_without_a_trainer_is_refused(fast_run_options, tiny_loaded):
    options = _run_options(fast_run_options)
    options["trainer"] = {"name": "none"}
    with pytest.raises(UsageError, match="set a trainer"):
        ftq_core.run(options, model=tiny_loaded)


def test_adapter_over_torch_ao_layers_is_refused_with_the_fix(fast_run_options, tiny_loaded):
    options = _run_options(fast_run_options)
    options["quantizer"] = {"name": "dynamic", "activation": "per-tensor"}  # torch.ao's eager int8 kernels
    with pytest.raises(UsageError, match="torch.ao quantized layer, which passes no gradient"):
        ftq_core.run(options, model=tiny_loaded)


def test_target_patterns_that_match_nothing_are_refused(fast_run_options, tiny_loaded):
    with pytest.raises(UsageError, match=r"match no Linear layer .*for example: model.layers.0"):
        ftq_core.run(_run_options(fast_run_options, target_modules=["*.nope"]), model=tiny_loaded)


def test_requantizing_an_artifact_base_is_refused(fast_run_options, tiny_loaded, tmp_path):
    base = ftq_core.run(_run_options(fast_run_options, merge=True), model=tiny_loaded).artifact_dir  # plain int8
    options = _run_options(fast_run_options, quantizer="static") | {"model": str(base), "output_dir": str(tmp_path / "o")}
    with pytest.raises(UsageError, match="already quantized"):
        ftq_core.run(options)


def test_lora_options_are_checked():
    from ftq_core.errors import ConfigError

    with pytest.raises(ConfigError, match="rank must be >= 1"):
        LoraOptions(rank=0)
    with pytest.raises(ConfigError, match="dropout must be in"):
        LoraOptions(dropout=1.0)


# -- the command line and the real model -----------------------------------------------------------


def test_cli_trains_an_adapter_and_eval_and_generate_use_it(tiny_model_dir, tmp_path):
    from ftq_core.cli import cli

    out = tmp_path / "out"
    args = ["run", "--model", str(tiny_model_dir), "--adapter", "lora", "--max-steps", "2", "-o", str(out),
            "--set", "dataset.block_size=32", "--set", "trainer.batch_size=2", "--set", "trainer.progress=false",
            "--set", "eval.max_blocks=2", "--set", "eval.latency=false", "--set", "adapter.rank=4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "int8 dynamic + lora" in result.output
    evaluated = CliRunner().invoke(cli, ["eval", str(out), "--set", "dataset.block_size=32", "--set", "eval.max_blocks=2",
                                          "--no-latency"])
    assert evaluated.exit_code == 0, evaluated.output
    generated = CliRunner().invoke(cli, ["generate", str(out), "-p", "The", "-n", "3"])
    assert generated.exit_code == 0, generated.output


@pytest.mark.slow
def test_lora_steps_on_the_bundled_model_lower_held_out_perplexity(bundled_model, tmp_path):
    loaded = LoadedModel(copy.deepcopy(bundled_model.model), bundled_model.tokenizer, bundled_model.source)
    options = {
        "output_dir": str(tmp_path / "out"), "evaluate_pretrained": False,
        "trainer": {"name": "causal-lm", "max_steps": 3, "batch_size": 2, "checkpoint_every": 0, "progress": False},
        "adapter": {"name": "lora"},
        "eval": {"max_blocks": 4, "latency": False},
    }
    result = ftq_core.run(options, model=loaded)
    untuned, tuned = result.rows
    assert (untuned.label, tuned.label) == ("int8 dynamic", "int8 dynamic + lora")
    assert tuned.perplexity < untuned.perplexity
    assert torch.equal(_logits(ftq_core.load(result.artifact_dir).model), _logits(result.model))


# -- the chunked loss (activation checkpointing) -----------------------------------------------------


def test_chunked_loss_equals_the_models_own_loss_and_gradients(tiny_tokenizer, monkeypatch):
    from ftq_plugins.trainers import chunked_loss

    monkeypatch.setattr(chunked_loss, "CHUNK_TOKENS", 7)  # several chunks, the last one short
    model = make_tiny_llama(len(tiny_tokenizer))
    ids = torch.randint(0, len(tiny_tokenizer), (2, 20))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt without loss
    expected = model(input_ids=ids, labels=labels).loss
    expected.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert chunked_loss.supports_chunked_loss(model)
    with chunked_loss.hidden_states_instead_of_logits(model) as head:
        hidden = model(input_ids=ids).logits
    assert hidden.shape[-1] == model.config.hidden_size and model.get_output_embeddings() is head
    loss = chunked_loss.chunked_next_token_loss(head, hidden, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-4, atol=1e-6)


def test_adapter_training_checkpoints_activations_by_default(fast_run_options, tiny_loaded, monkeypatch):
    from ftq_plugins.trainers import causal_lm

    seen = {}
    original = causal_lm.CausalLMTrainer._setup

    def spy(self, model, data, teacher):
        run = original(self, model, data, teacher)
        seen.update(checkpointing=run.checkpointing, chunked=run.chunked_loss)
        return run

    monkeypatch.setattr(causal_lm.CausalLMTrainer, "_setup", spy)
    result = ftq_core.run(_run_options(fast_run_options), model=tiny_loaded)
    assert seen == {"checkpointing": True, "chunked": True}
    assert not any(getattr(m, "gradient_checkpointing", False) for m in result.model.modules())  # off after training


# -- what an artifact's adapter files may ask for -------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("use_dora", True), ("modules_to_save", ["lm_head"]), ("layer_replication", [[0, 1]]),
    ("megatron_config", {"core": 1}), ("init_lora_weights", "pissa"), ("auto_mapping", {"base_model_class": "X"}),
])
def test_an_adapter_config_asking_for_more_than_plain_lora_is_refused(key, value, tmp_path, tiny_tokenizer):
    base = ftq_core.quantize(make_tiny_llama(len(tiny_tokenizer)), "dynamic").model
    adapter = LoraAdapter(LoraOptions(rank=4))
    files = adapter.files(adapter.attach(base))
    config = json.loads(files[ADAPTER_CONFIG])
    assert value != config.get(key)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**config, key: value}))
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(files[ADAPTER_WEIGHTS])
    with pytest.raises(ArtifactError, match=f"sets {key} beyond plain LoRA"):
        adapter.load(ftq_core.quantize(make_tiny_llama(len(tiny_tokenizer)), "dynamic").model, tmp_path)
    (tmp_path / ADAPTER_CONFIG).write_bytes(files[ADAPTER_CONFIG])  # the file as written loads
    adapter.load(ftq_core.quantize(make_tiny_llama(len(tiny_tokenizer)), "dynamic").model, tmp_path)


def test_adapter_file_names_that_would_replace_base_files_are_refused():
    from ftq_core.errors import PluginError
    from ftq_core.stages import _check_adapter_files

    class Component:
        name, plugin = "evil", "evil_plugin"

    for name in ("model.safetensors", "../x.json", "tokenizer.json", "adapter.bin", "hook.py"):
        with pytest.raises(PluginError, match="asked to save"):
            _check_adapter_files(Component, {name: b"{}"})
    _check_adapter_files(Component, {ADAPTER_CONFIG: b"{}", ADAPTER_WEIGHTS: b""})


def test_an_artifact_that_already_carries_an_adapter_is_refused_as_a_base(fast_run_options, tiny_loaded, tmp_path):
    adapted = ftq_core.run(_run_options(fast_run_options), model=tiny_loaded).artifact_dir
    options = _run_options(fast_run_options)
    options.pop("quantizer")
    with pytest.raises(UsageError, match="already carries a 'lora' adapter"):
        ftq_core.run(options | {"model": str(adapted), "output_dir": str(tmp_path / "again")})


def test_adapter_with_distillation_is_refused_before_loading(fast_run_options):
    options = _run_options(fast_run_options)
    options["trainer"]["distill"] = 0.5
    options["model"] = "/nonexistent/model"
    with pytest.raises(UsageError, match="set trainer.distill = 0"):
        ftq_core.run(options)


def test_export_folds_adapters_over_layers_kept_float(fast_run_options, tiny_loaded, tmp_path):
    from transformers import AutoModelForCausalLM

    options = _run_options(fast_run_options)
    options["quantizer"] = {"name": "dynamic", "keep_float": ["*.down_proj"]}
    result = ftq_core.run(options, model=tiny_loaded)
    assert type(result.model.model.layers[0].mlp.down_proj.get_base_layer()) is torch.nn.Linear
    ftq_core.export(result.artifact_dir, tmp_path / "hf")
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    int8 = _logits(result.model)
    assert ((_logits(exported) - int8).norm() / int8.norm()).item() < 0.05


def test_a_full_fine_tune_with_a_few_frozen_layers_keeps_the_full_defaults(tiny_tokenizer):
    from ftq_plugins.trainers.causal_lm import FULL_LR, CausalLMTrainer, CausalLMTrainerConfig

    model = make_tiny_llama(len(tiny_tokenizer))
    model.model.layers[0].requires_grad_(False)
    trainer = CausalLMTrainer(CausalLMTrainerConfig())
    assert trainer.learning_rate(model) == FULL_LR and not trainer.checkpoints_activations(model)
