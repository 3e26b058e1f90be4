"""bf16 attention for int8 models: close to float32 attention, masks honoured, recorded and reloaded."""

from __future__ import annotations

import copy

import pytest
import torch
from ftq_testing import SHARED_DATA, make_tiny_gpt2, make_tiny_llama

import ftq_core
from ftq_core.artifacts import load_artifact, save_artifact
from ftq_core.attention import BF16_SDPA, CONFIG_KEY, attention_dtype, restore_attention_dtype, set_attention_dtype
from ftq_core.errors import ArtifactError, ConfigError, UsageError
from ftq_core.plugins import Plugins

needs_bf16 = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="bf16 SDPA on CPU needs oneDNN"
)


def tokens(batch: int = 1, length: int = 24, seed: int = 3):
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def int8(model, attention: str, **options):
    """The ``dynamic`` int8 model with ``attention``; a fixed kernel (``auto`` would spend seconds tuning)."""
    return ftq_core.quantize(model, "dynamic", {"kernel": "onednn", "attention_dtype": attention, **options}).model.eval()


def logits(model, ids, **kwargs):
    with torch.inference_mode():
        return model(input_ids=ids, **kwargs).logits.float()


@needs_bf16
@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_bf16_attention_is_close_to_float32_and_really_bf16(make_model):
    exact = int8(make_model(), "float32")
    fast = int8(make_model(), "bfloat16")
    assert getattr(exact.config, CONFIG_KEY, None) is None and exact.config._attn_implementation == "sdpa"
    assert getattr(fast.config, CONFIG_KEY) == "bfloat16" and fast.config._attn_implementation == BF16_SDPA
    ids = tokens()
    expected, got = logits(exact, ids), logits(fast, ids)
    assert not torch.equal(got, expected)  # q/k/v were rounded: the option did something
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)


@needs_bf16
def test_padded_batch_masks_padding_as_float32_attention_does():
    """The bf16 path builds HF's sdpa masks: left padding is masked, not attended to."""
    exact, fast = int8(make_tiny_llama(), "float32"), int8(make_tiny_llama(), "bfloat16")
    ids = tokens(batch=2)
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    expected = logits(exact, ids, attention_mask=mask)
    got = logits(fast, ids, attention_mask=mask)
    unmasked = logits(fast, ids)  # the same ids with no padding mask: the padded row differs a lot
    scale = expected.abs().max().item()
    torch.testing.assert_close(got[:, 10:], expected[:, 10:], atol=0.05 * scale, rtol=0)
    assert (unmasked[0, 10:] - expected[0, 10:]).abs().max() > 0.05 * scale


@needs_bf16
def test_lean_loop_runs_bf16_attention_like_hf():
    from ftq_core.generation import LeanDecoder

    model = int8(make_tiny_llama(), "bfloat16")
    ids = tokens(length=12)
    decoder = LeanDecoder(model, max_length=16)
    with torch.inference_mode():
        lean = decoder.prefill(ids)
        token = lean.argmax(-1)
        step = decoder.step(token)
        # HF the same way: the prompt, then one token with its cache (same rows per call as the lean loop)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # lm_head on one row, as the lean loop
        cache = out.past_key_values
        hf_step = model(input_ids=token[:, None], cache=cache, use_cache=True).logits[:, -1].float()
    assert decoder.keys.dtype == torch.bfloat16 and attention_dtype(model) is torch.bfloat16
    torch.testing.assert_close(lean, out.logits[:, -1].float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(step, hf_step, atol=1e-4, rtol=0)


@needs_bf16
def test_attention_dtype_round_trips_through_save_and_load(tmp_path, tiny_tokenizer):
    plugins = Plugins(load_entrypoints=False)
    for choice in ("bfloat16", "float32"):
        options = {"kernel": "onednn", "attention_dtype": choice}
        model = ftq_core.quantize(make_tiny_llama(), "dynamic", options, plugins=plugins).model
        expected = logits(model, tokens())
        save_artifact(model, tiny_tokenizer, tmp_path / choice, manifest={"method": "dynamic"}, plugins=plugins)
        loaded = load_artifact(tmp_path / choice, plugins=plugins).model
        assert torch.equal(logits(loaded, tokens()), expected)
        assert loaded.config._attn_implementation == (BF16_SDPA if choice == "bfloat16" else "sdpa")


def test_auto_follows_the_cpu_and_float32_restores_sdpa():
    from ftq_core.cpu_features import cpu_has_native_bf16

    model = int8(make_tiny_llama(), "auto")
    assert (attention_dtype(model) is torch.bfloat16) == cpu_has_native_bf16()
    set_attention_dtype(model, None)
    assert model.config._attn_implementation == "sdpa" and attention_dtype(model) is None


def test_bad_choices_are_refused_with_the_fix():
    eager = make_tiny_llama()
    eager.set_attn_implementation("eager")
    with pytest.raises(UsageError, match="uses 'eager'.*attn_implementation='sdpa'"):
        int8(eager, "bfloat16")
    assert int8(copy.deepcopy(eager), "auto").config._attn_implementation == "eager"  # auto leaves it alone
    with pytest.raises(ConfigError, match="attention_dtype"):
        int8(make_tiny_llama(), "float16")
    model = make_tiny_llama()
    setattr(model.config, CONFIG_KEY, "float8")
    with pytest.raises(ArtifactError, match="attention dtype 'float8'"):
        restore_attention_dtype(model)


SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"needs {SHAKESPEARE}: tinyshakespeare.txt from the shared data folder (../shared/data beside the repository)")
@needs_bf16
def test_bundled_model_bf16_attention_keeps_perplexity(bundled_model):
    """On SmolLM2-135M, bf16 attention moves the float model's held-out perplexity by well under 0.3 %.

    The int8 model's perplexity moves by up to ~1 % either way under any small
    change of its numerics (fixed ``onednn`` vs ``int-mm`` kernels: 0.15 %,
    their numerics being equal up to float rounding), so there the bound is
    that int8 noise, not 0.3 % (benchmarks/RESULTS.md, "Prefill: attention and glue").
    """
    from ftq_core.evaluation import perplexity
    from ftq_core.plugins import get_plugins

    dataset = get_plugins().get("dataset", "text")
    config = dataset.make_config({"path": str(SHAKESPEARE), "block_size": 256})
    splits = dataset.create(config).build(bundled_model.tokenizer)
    float_model = copy.deepcopy(bundled_model.model)
    model = int8(copy.deepcopy(float_model), "bfloat16")
    for name, each, bound in (("float", float_model, 0.003), ("int8", model, 0.025)):
        set_attention_dtype(each, "bfloat16")
        fast = perplexity(each, splits.eval, max_blocks=4)[0]
        set_attention_dtype(each, None)
        exact = perplexity(each, splits.eval, max_blocks=4)[0]
        assert fast != exact, name
        assert abs(fast / exact - 1) < bound, f"{name}: bf16 attention ppl {fast:.3f} vs float32 attention {exact:.3f}"
