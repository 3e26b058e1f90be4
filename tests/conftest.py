"""Shared fixtures: tiny random-init models, a tiny tokenizer, a fresh plugin manager.

Tests never see plugins installed on the machine: third-party autoload is off
(``FTQ_LOAD_PLUGINS=""``) unless a test turns it on on purpose.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FTQ_LOAD_PLUGINS", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ftq_testing import REPO, SAMPLE_TEXT, SHARED_DATA, make_tiny_gpt2, make_tiny_llama, make_tiny_tokenizer  # noqa: F401

_CONFIG = None
_REAL_MODEL_TESTS: set[str] = set()


def pytest_configure(config):
    global _CONFIG
    _CONFIG = config


def _say(line: str) -> None:
    reporter = _CONFIG.pluginmanager.get_plugin("terminalreporter") if _CONFIG is not None else None
    if reporter is not None:
        reporter.write(f"\n{line}\n")  # on lines of their own, between the dots


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("slow") is not None or "bundled_model" in item.fixturenames:
            item.add_marker(pytest.mark.slow)  # every real-model test, so that -m "not slow" leaves them all out
            _REAL_MODEL_TESTS.add(item.nodeid)


def pytest_runtest_logstart(nodeid, location):
    """Say when a real-model test starts and how it ended: each takes tens of seconds (minutes on a busy
    machine), which would otherwise pass under one silent dot."""
    if nodeid in _REAL_MODEL_TESTS:
        _say(f"[real model] {nodeid} ...")


def pytest_runtest_logreport(report):
    if report.when == "call" and report.nodeid in _REAL_MODEL_TESTS:
        _say(f"[real model] {report.nodeid}: {report.outcome} in {report.duration:.0f} s")


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama (with attention dropout, so training draws random numbers) and the tiny
    tokenizer saved as a Hugging Face model directory, for runs through the CLI."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        attention_dropout=0.1,
    )
    path = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory, tiny_model_dir):
    """An int8 artifact of the tiny model written by ``ftq quantize``, once per test module; cases copy and damage it."""
    from click.testing import CliRunner

    from ftq_core.cli import cli
    from ftq_core.plugins import reset_plugins

    reset_plugins()
    path = tmp_path_factory.mktemp("artifact") / "model"
    result = CliRunner().invoke(cli, ["quantize", str(tiny_model_dir), "-o", str(path)])
    assert result.exit_code == 0, result.output
    reset_plugins()
    return path
