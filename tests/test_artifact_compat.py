"""Artifacts saved before ``plugins/`` was grouped into subfolders still load and compute the same logits.

``tests/fixtures/artifacts_v1`` holds one tiny-Llama artifact per codec kind
(ftq int8 dynamic and embedding, torch.ao dynamic, ftq static int8, torch.ao
static and QAT boundaries), written by the flat layout together with the
logits each model gave on a fixed input.  Codec kinds are names in the
manifest, never module paths, so moving modules must not change what loads.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftq_core.artifacts import load_artifact

FIXTURES = Path(__file__).parent / "fixtures" / "artifacts_v1"
EXPECTED = load_file(str(FIXTURES / "expected_logits.safetensors"))


@pytest.mark.parametrize("name", ["dynamic", "dynamic-torch-ao", "static", "static-torch-ao", "qat-int8", "qat"])
def test_artifact_from_flat_layout_loads_with_same_logits(name):
    loaded = load_artifact(FIXTURES / name)
    with torch.inference_mode():
        logits = loaded.model(input_ids=EXPECTED["input_ids"][None]).logits[0].float()
    torch.testing.assert_close(logits, EXPECTED[name], rtol=1e-5, atol=1e-5)  # int8 products are exact; float rescaling may differ by CPU
