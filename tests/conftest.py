"""Shared fixtures: tiny random-init models, a tiny tokenizer, a fresh plugin manager.

Tests never see plugins installed on the machine: third-party autoload is off
(``FTQ_LOAD_PLUGINS=""``) unless a test turns it on on purpose.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FTQ_LOAD_PLUGINS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_TEXT = REPO / "plugins" / "data" / "sample.txt"


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch):
    """Each test gets a freshly built process-wide plugin manager."""
    from ftq_core.plugins import reset_plugins

    monkeypatch.setenv("FTQ_LOAD_PLUGINS", "")
    monkeypatch.delenv("FTQ_DISABLE_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token byte-level BPE trained on the bundled sample (well under a second)."""
    return make_tiny_tokenizer()


def make_tiny_tokenizer():
    """The tokenizer of :func:`tiny_tokenizer`, for code that is not a test (helpers, subprocess setups)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT.read_text()], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def make_tiny_llama(vocab_size: int = 512, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2(vocab_size: int = 512, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture
def tiny_loaded(tiny_tokenizer):
    """A LoadedModel of a tiny Llama with the tiny tokenizer (for ftq_core.run(model=...))."""
    from ftq_core.models import LoadedModel

    return LoadedModel(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, "tiny-llama (random init)")


@pytest.fixture
def fast_run_options(tmp_path):
    """A run configuration mapping that finishes in seconds on a tiny model."""
    return {
        "output_dir": str(tmp_path / "out"),
        "dataset": {"name": "text", "block_size": 32},
        "trainer": {"name": "causal-lm", "max_steps": 3, "batch_size": 2, "checkpoint_every": 2, "progress": False},
        "eval": {"max_blocks": 2, "prefill_tokens": 16, "decode_tokens": 4, "repeats": 1},
    }


@pytest.fixture(scope="session")
def bundled_model():
    """The real SmolLM2-135M (loaded once per session; cached as safetensors after the first load)."""
    from ftq_core.models import load_model

    return load_model("smollm2")
