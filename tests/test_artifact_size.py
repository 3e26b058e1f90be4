"""An int8 artifact is about a quarter of the float model, for every int8 method and every model family.

Measured from the files: ``model.safetensors`` against the float32 bytes of
the model's distinct parameters.  Tiny models are 512 wide, so that the
float32 per-row scales (4 bytes per 512 int8 weights) stay well under the
1% of slack the 26% bound leaves; embeddings are quantized (shared with a
tied head), norms and biases stay float.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ftq_core.artifacts import save_artifact
from ftq_core.plugins import get_plugins

FAMILIES = {
    "llama": dict(intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2": dict(intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen3": dict(intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                  tie_word_embeddings=True),
    "phi3": dict(intermediate_size=1024, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                 pad_token_id=0),
    "gemma2": dict(intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=128),
    "gemma3_text": dict(intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=128),
    "falcon": dict(num_attention_heads=4, new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
    "gpt2": dict(n_embd=512, n_layer=3, n_head=4, n_positions=64),
    "opt": dict(ffn_dim=1024, num_attention_heads=4, word_embed_proj_dim=512, max_position_embeddings=64),
}
METHODS = ["dynamic", "static", "qat", "qat-int8"]


def make(family: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    settings = dict(vocab_size=vocab, hidden_size=512, num_hidden_layers=3, max_position_embeddings=64)
    settings.update(FAMILIES[family])
    if family == "gpt2":
        settings = {k: v for k, v in settings.items() if k not in ("hidden_size", "num_hidden_layers", "max_position_embeddings")}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **settings)).eval()


def float32_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 4
    return total


def fixed_float_bytes(model) -> int:
    """Float tensors an int8 artifact keeps whatever its width, which a 512-wide model magnifies: a rotated
    model's final-norm matrix (hidden x hidden; 0.25% of SmolLM2's float32 size) and learned position tables
    that take positions, not token ids (OPT's), which no int8 embedding replaces."""
    from ftq_plugins.transforms.rotated_norm import RotatedRMSNorm

    total = 0
    for module in model.modules():
        if isinstance(module, RotatedRMSNorm):
            total += module.matrix.numel() * 4
        elif isinstance(module, torch.nn.Embedding) and type(module) is not torch.nn.Embedding:
            total += module.weight.numel() * 4
    return total


def quantized(model, method: str, blocks):
    """prepare, calibrate where the method does, convert: the artifact's model (QAT without its fine-tune)."""
    from ftq_core.pipeline import calibrate

    component = get_plugins().get("quantizer", method)
    quantizer = component.create(component.make_config({}))
    model = quantizer.prepare(model)
    if quantizer.needs_calibration:
        calibrate(model, blocks, batches=2, progress=False)
    if getattr(quantizer, "on_calibrated", None):
        model = quantizer.on_calibrated(model)
    return quantizer.convert(model), quantizer


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_int8_artifact_is_at_most_26_percent_of_float32(family, method, tiny_tokenizer, tmp_path):
    model = make(family, len(tiny_tokenizer))
    baseline = float32_bytes(model)
    blocks = torch.randint(3, len(tiny_tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    int8, quantizer = quantized(copy.deepcopy(model), method, blocks)
    save_artifact(int8, tiny_tokenizer, tmp_path / "a", manifest={"method": method, "engine": quantizer.engine})
    size = (tmp_path / "a" / "model.safetensors").stat().st_size
    fixed = fixed_float_bytes(int8)
    assert size <= 0.26 * baseline + fixed, f"{family} {method}: {(size - fixed) / baseline:.1%} of float32 (+{fixed} B fixed)"
    # what the report calls quantized is what the artifact holds: every embedding and Linear-like layer is
    # int8 or named as float with a reason
    from ftq_core.layers import iter_linear_layers

    floats = {r.name for r in quantizer.layer_report(int8) if not r.quantized}
    assert {name for name, _ in iter_linear_layers(int8)} <= floats
    left = {name for name, m in int8.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert left <= floats
