"""The real bundled SmolLM2-135M: GGUF load and cache, fine-tune, dynamic int8, report."""

from __future__ import annotations

import copy

import pytest
import torch

import ftq_core
from ftq_core.models import LoadedModel, bundled_gguf_path, load_model, model_cache_dir


def test_cached_safetensors_model_matches_the_gguf_load(bundled_model):
    from ftq_core.models import _load_gguf

    assert bundled_model.model.config.model_type == "llama"
    assert sum(p.numel() for p in bundled_model.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert any(model_cache_dir().glob("SmolLM2-135M-Instruct*/ftq-cache-complete"))
    fresh = _load_gguf(bundled_gguf_path("smollm2"), use_cache=False)
    ids = bundled_model.tokenizer("The river rose two metres overnight.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(fresh.model(ids).logits, bundled_model.model(ids).logits)


def test_real_model_fine_tunes_quantizes_and_reports_both_perplexities(bundled_model, tmp_path):
    loaded = LoadedModel(copy.deepcopy(bundled_model.model), bundled_model.tokenizer, bundled_model.source)
    result = ftq_core.run(
        {
            "output_dir": str(tmp_path / "out"),
            "dataset": {"name": "text", "block_size": 128},
            "trainer": {"name": "causal-lm", "max_steps": 3, "batch_size": 2, "lr": 5e-5, "checkpoint_every": 0, "progress": False},
            "eval": {"max_blocks": 4, "batch_size": 2, "prefill_tokens": 64, "decode_tokens": 4, "repeats": 1},
        },
        model=loaded,
    )
    pretrained, tuned, int8 = result.rows
    # a pretrained 135M model already reads the sample's English; fine-tuning helps further
    assert 1.5 < pretrained.perplexity < 60
    assert tuned.perplexity < pretrained.perplexity
    # per-token int8 stays close to the float model it came from
    assert int8.perplexity < tuned.perplexity * 1.10
    assert int8.size_bytes < 0.5 * tuned.size_bytes
    assert result.report_paths["markdown"].read_text().count("|") > 20


def test_unknown_bundled_or_missing_model_says_what_was_looked_for(tmp_path):
    from ftq_core.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="not a bundled model \\(smollm2\\)"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
