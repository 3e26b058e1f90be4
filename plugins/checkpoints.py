"""Training checkpoints: model, optimizer, scheduler and RNG state, no pickles.

A checkpoint is a directory ``step-00000010/`` written in a temporary sibling
and renamed into place, then named in ``latest`` (itself replaced
atomically), so a crash leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ftq_core.errors import TrainingError
from ftq_core.tensor_io import atomic_write_json, atomic_write_text, fsync_dir, load_tensors, save_tensors

__all__ = ["save_checkpoint", "load_latest_checkpoint", "latest_checkpoint"]


def _optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, values in state["state"].items():
        plain["state"][str(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value
            else:
                plain["state"][str(index)][key] = value
    return tensors, plain


def _optimizer_from_tensors(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(values) for i, values in plain["state"].items()}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(directory: str | os.PathLike, *, step: int, model, optimizer, scheduler, extra: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``directory`` and drop all but the newest ``keep``."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    staging = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
    try:
        aliases = save_tensors(staging / "model.safetensors", model.state_dict())
        opt_tensors, opt_plain = _optimizer_to_tensors(optimizer.state_dict())
        save_tensors(staging / "optimizer.safetensors", opt_tensors)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_tensors(staging / "rng.safetensors", rng)
        atomic_write_json(
            staging / "state.json",
            {
                "step": step,
                "model_aliases": aliases,
                "optimizer": opt_plain,
                "scheduler": {"last_epoch": scheduler.last_epoch},
                **extra,
            },
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    root = Path(directory)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_latest_checkpoint(directory: str | os.PathLike, *, model, optimizer, scheduler) -> dict | None:
    """Restore the newest checkpoint into the given objects; return its state, or None."""
    path = latest_checkpoint(directory)
    if path is None:
        return None
    try:
        state = json.loads((path / "state.json").read_text())
        model_tensors = load_tensors(path / "model.safetensors", state.get("model_aliases"))
        model.load_state_dict(model_tensors, strict=True)
        optimizer.load_state_dict(_optimizer_from_tensors(load_tensors(path / "optimizer.safetensors"), state["optimizer"]))
        scheduler.last_epoch = state["scheduler"]["last_epoch"]
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        rng = load_tensors(path / "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise TrainingError(
            f"cannot resume from checkpoint {path}: {exc}. It may come from a different model or "
            f"quantizer setup; run without --resume to start over."
        ) from None
    return state
