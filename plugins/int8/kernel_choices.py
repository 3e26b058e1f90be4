"""Remembered ``auto`` kernel choices: measured once per machine and layer shape, kept in ftq's cache.

Which int8 kernel is fastest for a layer shape depends on the CPU, the thread
count and torch, not on the weights; measuring takes a fraction of a second per
shape on a quiet machine and much longer on a loaded one.  The choices live in
``$FTQ_CACHE_DIR/kernel-choices.json`` (never in an artifact: an artifact
records the kernels its layers use, and another machine re-resolves them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["KernelChoices", "machine_key"]

_FILE = "kernel-choices.json"


def machine_key() -> str:
    """What a kernel choice depends on besides the shape: CPU model and ISA, threads, torch."""
    from ftq_core.cpu_features import cpu_has_amx, cpu_model_name, narrowed_to_avx2

    narrowed = "|aten=avx2" if narrowed_to_avx2() else ""
    return f"{cpu_model_name()}|amx={cpu_has_amx()}{narrowed}|threads={torch.get_num_threads()}|torch={torch.__version__}"


@dataclass
class KernelChoices:
    """Choices by machine key and ``"IN×OUT×COUNT"`` (count: same-shape layers timed together)."""

    path: Path
    entries: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    changed: bool = False

    @classmethod
    def load(cls) -> "KernelChoices":
        from ftq_core.models import cache_root

        path = cache_root() / _FILE
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}  # no cache yet, or a damaged one: measure again
        return cls(path, entries if isinstance(entries, dict) else {})

    @staticmethod
    def _shape_key(shape: tuple[int, int], count: int) -> str:
        return f"{shape[0]}x{shape[1]}x{count}"

    def get(self, shape: tuple[int, int], count: int) -> dict | None:
        from .kernels import AUTO_KERNELS

        found = self.entries.get(machine_key(), {}).get(self._shape_key(shape, count))
        # anything else (a damaged file, a choice of an ftq whose auto mixed numerics): measure again
        if not isinstance(found, dict) or not all(found.get(k) in AUTO_KERNELS for k in ("decode_kernel", "prefill_kernel")):
            return None
        choice = {"decode_kernel": found["decode_kernel"], "prefill_kernel": found["prefill_kernel"]}
        if isinstance(found.get("prefill_vs_float"), (int, float)):
            choice["prefill_vs_float"] = float(found["prefill_vs_float"])
        return choice

    def put(self, shape: tuple[int, int], count: int, choice: dict) -> None:
        self.entries.setdefault(machine_key(), {})[self._shape_key(shape, count)] = dict(choice)
        self.changed = True

    def save(self) -> None:
        """Write the file atomically if anything was added; a cache that cannot be written only costs time."""
        if not self.changed:
            return
        from ftq_core.tensor_io import atomic_write_json

        try:
            atomic_write_json(self.path, self.entries)
        except OSError:
            pass
        self.changed = False
