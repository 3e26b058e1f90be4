"""The family matrix: every family of ``ftq_core.model_families`` through quantize → save → load → generate → export.

Tiny random-init models of each family (2 layers, the tiny tokenizer, each
family's quirks on: Qwen2's biases, Qwen3's q/k norms, Phi-3's fused
projections, Gemma's norm offset, soft-capping and output norms).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from ftq_testing import FAMILY_MODEL_TYPES, make_tiny_family_model

import ftq_core
from ftq_core.artifacts import save_artifact
from ftq_core.generation import DecodeLoop, choose_loop, greedy_generate, loop_reasons
from ftq_core.model_families import FAMILIES, family_of


def _fast_loop() -> DecodeLoop:
    """The fused loop where its native library builds on this machine, else the lean loop."""
    from ftq_plugins.fused import build

    return DecodeLoop.FUSED if build.unavailable_reason() is None and build.load_library() is not None else DecodeLoop.LEAN


#: Whether ``auto`` takes a fast loop (fused, or lean without the native library) for each family's int8 model.
FAST_LOOP = {"llama": True, "mistral": True, "qwen2": True, "qwen3": True, "phi3": True, "gemma2": False,
             "gemma3_text": False}


@pytest.fixture(scope="module", params=FAMILY_MODEL_TYPES)
def family_artifact(request, tmp_path_factory, tiny_tokenizer):
    """``(model_type, float model, int8 artifact directory)`` of a tiny model of each family."""
    model_type = request.param
    model = make_tiny_family_model(model_type, vocab_size=len(tiny_tokenizer))
    float_model = make_tiny_family_model(model_type, vocab_size=len(tiny_tokenizer))
    quantized = ftq_core.quantize(model, "dynamic").model
    directory = tmp_path_factory.mktemp(f"art-{model_type}")
    save_artifact(quantized, tiny_tokenizer, directory, manifest={"method": "dynamic"})
    return model_type, float_model, directory


def test_every_family_has_one_entry_and_every_entry_says_why_not():
    model_types = [t for family in FAMILIES for t in family.model_types]
    assert len(model_types) == len(set(model_types))
    assert set(FAMILY_MODEL_TYPES) <= set(model_types)
    for family in FAMILIES:
        for feature, has in (("fused_decode", family.fused_decode), ("rotatable", family.rotatable),
                             ("gguf", family.gguf_arch is not None)):
            assert has or dict(family.why_not).get(feature), (family.name, feature)


def test_an_int8_artifact_of_every_family_loads_with_the_logits_it_was_saved_with(family_artifact):
    model_type, float_model, directory = family_artifact
    loaded = ftq_core.load(directory)
    assert model_type in family_of(loaded.model).model_types
    ids = torch.arange(24)[None] * 5 % float_model.config.vocab_size
    with torch.no_grad():
        reference = float_model(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits
    # the int8 model computes the float one up to 8-bit rounding
    assert float((got - reference).norm() / reference.norm()) < 0.1


def test_every_family_decodes_with_its_loop_and_the_same_greedy_tokens_as_hf(family_artifact):
    model_type, _, directory = family_artifact
    model = ftq_core.load(directory).model
    reasons = loop_reasons(model, max_length=20)
    chosen = next(loop for loop, reason in reasons.items() if reason is None)
    assert chosen is (_fast_loop() if FAST_LOOP[model_type] else DecodeLoop.HF), reasons
    if chosen is DecodeLoop.HF:
        assert family_of(model).reason("fused_decode") in reasons[DecodeLoop.LEAN]  # the family's reason is shown
        return
    prompt = torch.arange(1, 9)[None]
    eager = greedy_generate(model, prompt, max_new_tokens=12, loop="hf")
    for loop in {chosen.value, "lean"}:
        assert torch.equal(greedy_generate(model, prompt, max_new_tokens=12, loop=loop), eager), loop


@pytest.mark.parametrize("read_back", ["logits", "tensors"])
def test_every_family_exports_a_gguf_file_that_reads_back(family_artifact, read_back, tmp_path):
    model_type, _, directory = family_artifact
    written = ftq_core.export(directory, tmp_path / "gguf", "gguf", {"type": "q8_0", "read_back": read_back})
    arch = family_of(ftq_core.load(directory).model).gguf_arch
    assert written.startswith(f"model-q8_0.gguf: {arch} GGUF with q8_0 weights") and "tokenizer identical" in written
    assert ("read back by transformers" in written) == (read_back == "logits")
    assert ("without the model's 64-token sliding window" in written) == (model_type in ("mistral", "phi3"))
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / "model-q8_0.gguf"))
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == arch
    names = {t.name for t in reader.tensors}
    assert "blk.1.ffn_down.weight" in names and "token_embd.weight" in names


def test_gguf_export_writes_the_family_layout_llama_cpp_reads(tmp_path, tiny_tokenizer):
    """Gemma's norms carry its offset, Qwen2's biases and Qwen3's q/k norms are kept, Phi-3's projections stay fused."""
    expectations = {
        "gemma2": lambda t: "blk.0.post_ffw_norm.weight" in t and "output.weight" not in t,
        "qwen2": lambda t: {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= t.keys(),
        "qwen3": lambda t: {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= t.keys(),
        "phi3": lambda t: "blk.0.attn_qkv.weight" in t and "blk.0.attn_q.weight" not in t,
    }
    for model_type, expected in expectations.items():
        model = make_tiny_family_model(model_type, vocab_size=len(tiny_tokenizer))
        norm = model.model.layers[0].input_layernorm.weight.detach().clone()
        save_artifact(model, tiny_tokenizer, tmp_path / model_type, manifest={"method": "none"})
        ftq_core.export(tmp_path / model_type, tmp_path / f"{model_type}-gguf", "gguf", {"type": "f32"})
        reader = gguf.GGUFReader(str(tmp_path / f"{model_type}-gguf" / "model-f32.gguf"))
        tensors = {t.name: t for t in reader.tensors}
        assert expected(tensors), (model_type, sorted(tensors))
        written = np.asarray(tensors["blk.0.attn_norm.weight"].data)
        offset = family_of(model).norm_offset
        assert np.array_equal(written, norm.numpy() + np.float32(offset)), model_type


def test_gguf_export_refuses_what_llama_cpp_would_compute_otherwise(tmp_path, tiny_tokenizer):
    from ftq_core.errors import ArtifactError

    model = make_tiny_family_model("gemma2", vocab_size=len(tiny_tokenizer))
    model.config.query_pre_attn_scalar = 256  # llama.cpp scales Gemma's attention by head_dim (16 here)
    save_artifact(model, tiny_tokenizer, tmp_path / "art", manifest={"method": "none"})
    with pytest.raises(ArtifactError, match="query_pre_attn_scalar = 256, and llama.cpp scales this Gemma's attention "
                                            "by head_dim = 16; export it with --format hf"):
        ftq_core.export(tmp_path / "art", tmp_path / "gguf", "gguf")
    assert not (tmp_path / "gguf").exists()


def test_gguf_export_takes_llama_cpps_attention_scale_for_the_27b_gemma():
    from transformers import Gemma2Config

    from ftq_core.errors import ArtifactError
    from ftq_plugins.exporters.gguf_layout import exportable_family

    # Gemma-2-27B: 46 layers, hidden 4608, 32 heads of 128; llama.cpp scales by 4608 / 32 = 144, as the model does
    config = Gemma2Config(num_hidden_layers=46, hidden_size=4608, num_attention_heads=32, num_key_value_heads=16,
                          head_dim=128, query_pre_attn_scalar=144)
    assert exportable_family(config).gguf_arch == "gemma2"
    config.query_pre_attn_scalar = 128
    with pytest.raises(ArtifactError, match="by hidden_size / heads \\(its 27B layout\\) = 144"):
        exportable_family(config)


@pytest.mark.parametrize("model_type", ["mistral", "phi3"])
def test_a_sliding_window_keeps_the_fast_loops_only_where_it_would_mask_nothing(model_type, tiny_tokenizer):
    model = ftq_core.quantize(make_tiny_family_model(model_type, vocab_size=len(tiny_tokenizer)), "dynamic").model
    window = model.config.sliding_window
    assert loop_reasons(model, max_length=window)[DecodeLoop.LEAN] is None
    longer = loop_reasons(model, max_length=window + 1)
    assert f"sliding-window attention over {window} tokens" in longer[DecodeLoop.LEAN]
    assert "sliding-window" in loop_reasons(model)[DecodeLoop.LEAN]  # length unknown: the window may bind
    assert choose_loop(model, max_length=window + 8) is DecodeLoop.HF  # HF's loop masks beyond the window


def test_every_family_exports_a_float_directory_transformers_loads(family_artifact, tmp_path):
    from transformers import AutoModelForCausalLM

    model_type, _, directory = family_artifact
    written = ftq_core.export(directory, tmp_path / "hf")
    assert "read back bit for bit" in written
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=False)
    assert reloaded.config.model_type == model_type
