"""What an artifact's manifest records about how it was made (one builder for ``run`` and ``quantize``).

:func:`ftq_core.artifacts.save_artifact` adds the rest (format, versions,
module table, codecs, checksums).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .protocols import DataSplits, LayerReport

__all__ = ["component_provenance", "build_manifest"]


def component_provenance(plugins, component) -> dict[str, str]:
    """The component's name and the plugin, package and version it came from (for manifest and report)."""
    return {"name": component.name, **plugins.provenance(component.plugin)}


def build_manifest(
    *,
    method: str,
    quantizer_options: dict[str, Any],
    engine: str | None,
    layers: list[LayerReport],
    source_model: str,
    components: dict[str, dict[str, str]],
    splits: DataSplits | None = None,
) -> dict[str, Any]:
    """The manifest fields that describe the making of a quantized model; ``splits``: the data it was trained or
    calibrated on in a run (``ftq quantize`` records none)."""
    manifest = {
        "method": method,
        "quantizer_options": quantizer_options,
        "engine": engine,
        "layers": [asdict(layer) for layer in layers],
        "source_model": source_model,
    }
    if splits is not None:
        manifest |= {"dataset_fingerprint": splits.fingerprint, "dataset": splits.description}
    return manifest | {"components": components}
