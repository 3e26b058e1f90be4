"""Checks that run before any slow work: will the outputs of this run fit on disk?

A fine-tune that dies of a full disk after an hour loses the hour; the space
it needs is known up front from the model's size, so ask for it first.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .errors import UsageError

__all__ = ["model_bytes", "estimate_run_bytes", "check_free_space", "check_free_bytes"]

#: Safety margin on the estimate (tokenizer files, JSON, file-system slack).
MARGIN = 1.1


def model_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def estimate_run_bytes(size: int, *, checkpoints_kept: int) -> int:
    """Peak disk use of a run over a model of ``size`` bytes.

    A checkpoint holds the model and two AdamW moments (3x the model); while
    one is written, ``checkpoints_kept + 1`` exist.  The artifact is at most
    the float model, and its replacement coexists with the previous one.
    """
    checkpoints = 3 * size * (checkpoints_kept + 1) if checkpoints_kept else 0
    return int(MARGIN * (checkpoints + 2 * size))


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(output_dir: str | Path, model: Any, checkpoints_kept: int = 0) -> int:
    """Raise :class:`UsageError` if ``output_dir``'s disk cannot hold this run's outputs; return the estimate.

    ``checkpoints_kept``: what the trainer declares it keeps on disk at once
    (:attr:`ftq_core.protocols.Trainer.checkpoints_kept`).
    """
    kept = int(checkpoints_kept)
    size = model_bytes(model)
    need = estimate_run_bytes(size, checkpoints_kept=kept)
    where = _existing_parent(Path(output_dir))
    free = shutil.disk_usage(where).free
    if free < need:
        parts = f"{kept} checkpoint(s) of model + optimizer state and the artifact" if kept else "the artifact"
        fewer = (
            ", or keep fewer checkpoints (trainer.keep_checkpoints, or trainer.checkpoint_every = 0 for none)" if kept else ""
        )
        raise UsageError(
            f"not enough free disk space for this run under {where}: it needs about {need / 2**30:.2f} GiB "
            f"({parts}, for a {size / 2**20:.0f} MiB model) and {free / 2**30:.2f} GiB are free. Free some space"
            f"{',' if kept else ' or'} choose an output directory on another disk (--output-dir){fewer}."
        )
    return need


def check_free_bytes(output_dir: str | Path, need: int, what: str) -> None:
    """Raise :class:`UsageError` if ``output_dir``'s disk has less than ``need`` bytes free for ``what``."""
    where = _existing_parent(Path(output_dir))
    free = shutil.disk_usage(where).free
    need = int(MARGIN * need)
    if free < need:
        raise UsageError(
            f"not enough free disk space under {where}: {what} needs about {need / 2**30:.2f} GiB and "
            f"{free / 2**30:.2f} GiB are free. Free some space or choose an output directory on another disk."
        )
