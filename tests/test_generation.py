"""The lean decode loop against Hugging Face: same greedy tokens, same logits at every step, clean fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from ftq_testing import make_tiny_gpt2, make_tiny_llama

import ftq_core
from ftq_core.errors import UsageError
from ftq_core.generation import DecodeLoop, LeanDecoder, choose_loop, greedy_generate, supports, unsupported_reason

PROMPT_TOKENS, NEW_TOKENS = 9, 24


def make_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny random-init model of ``model_type``; a larger init spread than HF's default
    so that greedy decoding wanders over many tokens instead of repeating one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
    )
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    return AutoModelForCausalLM.from_config(config).eval()


def prompt(batch: int = 1, seed: int = 1):
    return torch.randint(3, 512, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, ids, new_tokens=NEW_TOKENS, *, logits=False):
    """HF ``generate`` greedy tokens (and, with ``logits``, its raw logits at each step ``[batch, steps, vocab]``)."""
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0, output_logits=logits, return_dict_in_generate=logits,
        )
    return (out.sequences, torch.stack(out.logits, dim=1).float()) if logits else out


def assert_matches_hf(model, ids, *, atol, new_tokens=NEW_TOKENS):
    """Greedy tokens equal HF's, and the lean logits equal HF's at every step (prompt's last position included).

    The reference is HF's own step-by-step decode, so both sides run each
    layer on the same number of rows (an int8 layer's kernel depends on it).
    """
    expected, reference = hf_greedy(model, ids, new_tokens, logits=True)
    start = ids.shape[1]
    assert len(set(expected[0, start:].tolist())) > 3, "degenerate test model: greedy repeats one token"
    got = greedy_generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], loop="lean")
    assert torch.equal(got, expected)
    with torch.inference_mode():
        decoder = LeanDecoder(model, max_length=expected.shape[1], batch_size=ids.shape[0])
        steps = [decoder.prefill(ids)]
        steps += [decoder.step(expected[:, p]) for p in range(start, expected.shape[1] - 1)]
    torch.testing.assert_close(torch.stack(steps, dim=1), reference, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # grouped-query attention: 4 query heads share 2 key/value heads
        {"num_key_value_heads": 4},  # plain multi-head attention
        {"num_key_value_heads": 1, "head_dim": 32},  # multi-query, head_dim set apart from hidden/heads
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
        {
            "rope_parameters": {
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0,
            }
        },
        {"attention_bias": True, "mlp_bias": True},
    ],
    ids=["gqa", "mha", "mqa-head-dim", "rope-linear", "rope-llama3", "biases"],
)
def test_llama_fp32_tokens_and_logits_equal_hf(overrides):
    assert_matches_hf(make_model(**overrides), prompt(), atol=1e-4)


def test_builder_llama_and_batch_of_two_equal_hf():
    model = make_tiny_llama()
    ids = prompt(batch=2)
    assert supports(model, attention_mask=torch.ones_like(ids))
    expected = hf_greedy(model, ids)
    assert torch.equal(greedy_generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=[], loop="lean"), expected)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2"])
def test_other_llama_layout_families_equal_hf(model_type):
    assert_matches_hf(make_model(model_type, sliding_window=None), prompt(), atol=1e-4)


def test_int8_dynamic_model_tokens_and_logits_equal_hf():
    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

    model = ftq_core.quantize(make_model(), "dynamic", {}).model.eval()
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8DynamicLinear)
    assert type(model.model.embed_tokens).__name__ == "Int8Embedding"
    assert_matches_hf(model, prompt(), atol=1e-4)


def test_smoothquant_folded_model_equals_hf():
    calibration = [torch.randint(3, 512, (16,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    model = ftq_core.quantize(make_model(), "dynamic", {"smoothquant_alpha": 0.5}, calibration_data=calibration).model
    assert_matches_hf(model.eval(), prompt(), atol=1e-4)


def test_bf16_model_equals_hf():
    model = make_model().to(torch.bfloat16)
    expected = hf_greedy(model, prompt())
    assert torch.equal(greedy_generate(model, prompt(), max_new_tokens=NEW_TOKENS, eos_token_id=[], loop="lean"), expected)


def test_eos_stops_like_hf():
    model, ids = make_model(), prompt()
    free = hf_greedy(model, ids)
    eos = int(free[0, PROMPT_TOKENS + 5])  # a token greedy decoding reaches mid-way
    with torch.inference_mode():
        expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = greedy_generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=eos, loop="lean")
    assert torch.equal(got, expected) and got.shape[1] < free.shape[1]


def test_gpt2_falls_back_to_hf_generate():
    model, ids = make_tiny_gpt2(), prompt()
    assert not supports(model) and "gpt2" in unsupported_reason(model)
    assert choose_loop(model, "auto") is DecodeLoop.HF
    assert torch.equal(greedy_generate(model, ids, max_new_tokens=8, eos_token_id=[]), hf_greedy(model, ids, 8))
    with pytest.raises(UsageError, match="lean decode loop cannot run.*gpt2"):
        greedy_generate(model, ids, max_new_tokens=8, loop="lean")


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda m: m.model.layers[0].register_forward_hook(lambda *a: None), "forward hooks"),
        (lambda m: m.train(), "training mode"),
        (lambda m: setattr(m.generation_config, "repetition_penalty", 1.3), "repetition_penalty"),
        (lambda m: setattr(m.config, "rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope type"),
    ],
    ids=["hook", "training", "repetition-penalty", "dynamic-rope"],
)
def test_what_the_lean_loop_does_not_cover_goes_to_hf(setup, reason):
    model = make_model()
    setup(model)
    assert choose_loop(model, "auto") is DecodeLoop.HF
    with pytest.raises(UsageError, match=reason):
        choose_loop(model, "lean")


@pytest.mark.parametrize(
    "model_type, overrides",
    [("mistral", {"sliding_window": 16}), ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0})],
    ids=["mistral", "qwen2"],
)
def test_sliding_window_models_go_to_hf(model_type, overrides):
    model = make_model(model_type, **overrides)
    assert "sliding-window" in unsupported_reason(model)
    assert choose_loop(model, "auto") is DecodeLoop.HF


def test_padded_batch_goes_to_hf():
    model, ids = make_model(), prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    assert choose_loop(model, "auto", attention_mask=mask) is DecodeLoop.HF
    assert choose_loop(model, "auto", attention_mask=torch.ones_like(ids)) is DecodeLoop.LEAN


def test_decoder_refuses_overflow_and_late_multi_token_input():
    decoder = LeanDecoder(make_model(), max_length=PROMPT_TOKENS + 1)
    with torch.inference_mode():
        decoder.prefill(prompt())
        decoder.step(torch.tensor([5]))
        with pytest.raises(ValueError, match="max_length"):
            decoder.step(torch.tensor([5]))


def test_decode_speed_measures_either_loop():
    from ftq_core.evaluation import decode_tokens_per_second

    model = make_model()
    for loop in ("lean", "hf"):
        assert decode_tokens_per_second(model, new_tokens=4, prompt_tokens=4, repeats=1, loop=loop) > 0
    with pytest.raises(UsageError):
        decode_tokens_per_second(make_tiny_gpt2(), new_tokens=4, prompt_tokens=4, repeats=1, loop="lean")
    with pytest.raises(UsageError, match="unknown decode loop 'fast'.*auto, fused, lean, hf"):
        decode_tokens_per_second(model, loop="fast")


@pytest.mark.slow
def test_bundled_model_lean_greedy_equals_hf(bundled_model):
    model, tokenizer = bundled_model.model, bundled_model.tokenizer
    ids = tokenizer("The river rose two metres overnight, and the", return_tensors="pt").input_ids
    assert supports(model)
    assert_matches_hf(model, ids, atol=1e-4, new_tokens=6)
    int8 = ftq_core.quantize(copy.deepcopy(model), "dynamic", {}).model.eval()
    assert_matches_hf(int8, ids, atol=1e-4, new_tokens=6)
