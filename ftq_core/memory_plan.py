"""How much memory quantizing a model will take, estimated from its config before anything loads.

The kernel's OOM killer ends a process that asks for more memory than the
machine has, without a word and taking the user's other programs' memory
with it.  ftq estimates each way of quantizing from the checkpoint's tensor
sizes and picks the one that fits, or refuses with the figures and the
option that would fit.  The factors were measured (benchmarks/RESULTS.md,
"Models of real sizes"): loading whole holds the float32 model and the
quantizer's copies, about 1.6x the float32 bytes at peak; layer by layer
holds the int8 model, the float32 embeddings and head, and one float32
decoder layer with its float64 rotation work.
"""

from __future__ import annotations

import enum
import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layerwise", "MemoryPlan", "available_bytes", "plan_quantize_memory", "gib"]

#: Peak resident memory of a whole-model quantization over the float32 model's bytes (measured: 1.6)
WHOLE_MODEL_FACTOR = 1.7
#: Process baseline: torch, transformers and the tokenizer loaded
BASELINE_BYTES = 700 << 20


class Layerwise(enum.Enum):
    """``ftq quantize --layerwise``: load one decoder layer at a time (``on``), the whole model (``off``), or
    whichever fits in memory, the whole model when both do (``auto``)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def available_bytes() -> int:
    """Memory this process can still take: ``MemAvailable``, capped by a cgroup limit where one is set."""
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 1 << 62  # unknown: never refuse on a guess
    try:  # a cgroup (v2) limit: a container's share, which MemAvailable does not see
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return available


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak bytes of each way to quantize one model."""

    whole: int
    layerwise: int
    int8: int


def plan_quantize_memory(checkpoint, config) -> MemoryPlan:
    """Peak estimates from the checkpoint's tensor sizes (read from the shard headers, no weights)."""
    elements = {name: math.prod(shape) for name, (_, shape) in checkpoint.info.items()}
    total = sum(elements.values())
    layer_sizes: dict[str, int] = {}
    for name, count in elements.items():
        if name.startswith("model.layers."):
            index = name.split(".")[2]
            layer_sizes[index] = layer_sizes.get(index, 0) + count
    outside = total - sum(layer_sizes.values())
    largest_layer = max(layer_sizes.values(), default=0)
    largest_matrix = max(elements.values(), default=0)
    whole = int(WHOLE_MODEL_FACTOR * 4 * total) + BASELINE_BYTES
    # int8 model, float32 embeddings/head (and a tied head's separate int8 copy), one float32 layer, rotation's
    # float64 chunks and a float64 copy of the largest matrix's chunk (bounded to 256 MB each)
    layerwise = total + 4 * outside + 4 * largest_layer + min(8 * largest_matrix, 2 * (256 << 20)) + BASELINE_BYTES
    if getattr(config, "tie_word_embeddings", False):
        layerwise += outside // 2
    return MemoryPlan(whole=whole, layerwise=layerwise, int8=total)

