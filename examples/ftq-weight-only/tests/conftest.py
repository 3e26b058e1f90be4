"""Fixtures for the plugin's tests: a fresh ftq plugin manager with this plugin on it, tiny models.

Run from the package directory with ``python -m pytest`` (installed or not:
``src`` is put on the path when the package is not importable).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("ftq_weight_only") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


@pytest.fixture
def plugins():
    """ftq's built-ins plus this plugin, on a fresh manager: nothing installed on the machine leaks in."""
    import ftq_weight_only
    from ftq_core.plugins import Plugins

    manager = Plugins(load_entrypoints=False)
    info = manager.register(ftq_weight_only, name="weight-only")
    assert info.loaded and not info.errors, info.errors
    return manager


def _tiny_llama(tie: bool = True, hidden: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama():
    """A random-init 2-layer Llama with tied embeddings (like SmolLM2)."""
    return _tiny_llama()


@pytest.fixture
def tiny_llama_untied():
    return _tiny_llama(tie=False)


@pytest.fixture
def tiny_gpt2():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
