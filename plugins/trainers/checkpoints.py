"""Training checkpoints: model, optimizer, scheduler and RNG state, no pickles.

A checkpoint is a directory ``step-00000010/`` written in a temporary sibling
and renamed into place, then named in ``latest`` (itself replaced
atomically), so a crash leaves either the previous checkpoint or the new one.
A crash mid-save leaves a ``.step-*`` staging directory behind; the next save
removes it.  If ``latest`` is missing or names a damaged checkpoint, the
newest complete ``step-*`` directory is used instead.

The checkpoints directory may have been prepared by someone else, so nothing
here follows a link: the directory itself must be a real directory, ``latest``
must hold a plain ``step-N`` name, and rotation deletes only real folders
inside it (a link it meets is unlinked, never what it points at).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch

from ftq_core.errors import TrainingError
from ftq_core.file_safety import link_problems, plain_directory_problem, read_regular_file, remove_tree
from ftq_core.tensor_io import (
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    load_tensors,
    save_tensors,
    write_failure_kind,
)
from ftq_core.untrusted_json import parse_untrusted_json

__all__ = ["save_checkpoint", "load_latest_checkpoint", "latest_checkpoint", "read_checkpoint_state"]

STATE = "state.json"
#: What ``latest`` may name: one checkpoint folder inside the checkpoints directory.
_STEP_NAME = re.compile(r"step-[0-9]+")


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


def _remove_stale_staging(root: Path) -> None:
    """Drop staging directories left by a save that was killed (one trainer per directory)."""
    for stale in root.glob(".step-*"):
        remove_tree(stale)


def _check_root(root: Path) -> None:
    """Refuse a checkpoints directory that is a link or not a directory: writes and rotation would happen elsewhere."""
    problem = plain_directory_problem(root)
    if problem:
        raise TrainingError(
            f"{problem}; ftq writes, rotates and deletes checkpoints there and will not do that in another "
            f"directory. Remove it, or choose another output directory."
        )


def _write_failed(root: Path, step: int, exc: OSError) -> TrainingError:
    previous = latest_checkpoint(root)
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    fix = {
        "no-space": "free disk space, lower trainer.keep_checkpoints, or set trainer.checkpoint_every = 0",
        "not-writable": "make the directory writable or choose another --output-dir",
    }.get(write_failure_kind(exc), "check the disk, then resume with --resume")
    return TrainingError(
        f"could not write the checkpoint of step {step} in {root}: {exc.strerror or exc}; {kept}. "
        f"To go on, {fix}, then run again with --resume."
    )


def has_frozen_parameters(model) -> bool:
    """Whether some parameters of ``model`` do not train: its checkpoints then hold only the ones that do."""
    return any(not p.requires_grad for p in model.parameters())


def frozen_fingerprint(model) -> str:
    """SHA-256 of the names, shapes and bytes of every frozen parameter and buffer of ``model``.

    A checkpoint of a run with a frozen part (an int8 base under an adapter)
    keeps only what trains; resuming over another base (another quantizer,
    another artifact, other adapter placement) must be refused, not silently
    continued.
    """
    import hashlib

    digest = hashlib.sha256()
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad] + list(model.named_buffers())
    for name, tensor in sorted(frozen, key=lambda item: item[0]):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _trained_state(model) -> tuple[dict[str, torch.Tensor], bool]:
    """What a checkpoint keeps of ``model``: its whole state, or only the parameters that train when some are frozen.

    An adapter run trains a few million parameters over a frozen int8 model:
    the frozen part is the artifact's to keep (the run rebuilds it the same
    way before resuming), so its checkpoints hold the adapter alone.
    Returns ``(tensors, partial)``.
    """
    if not has_frozen_parameters(model):
        return model.state_dict(), False
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}, True


def save_checkpoint(directory: str | os.PathLike, *, step: int, model, optimizer, scheduler, extra: dict, keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``directory`` and drop all but the newest ``keep``.

    A failed write (disk full, say) raises :class:`TrainingError` and leaves the
    previous checkpoint as it was.
    """
    root = Path(directory)
    final = root / f"step-{step:08d}"
    staging = None
    _check_root(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(root)
        staging = Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.", dir=root))
        tensors, partial = _trained_state(model)
        aliases = save_tensors(staging / "model.safetensors", tensors)
        opt_tensors, opt_plain = _optimizer_to_tensors(optimizer.state_dict())
        save_tensors(staging / "optimizer.safetensors", opt_tensors)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_tensors(staging / "rng.safetensors", rng)
        atomic_write_json(
            staging / STATE,
            {
                "step": step,
                "model_aliases": aliases,
                "trained_only": partial,
                "optimizer": opt_plain,
                "scheduler": {"last_epoch": scheduler.last_epoch, "step_count": getattr(scheduler, "_step_count", None)},
                **extra,
            },
        )
        remove_tree(final)
        os.replace(staging, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
    except OSError as exc:
        if staging is not None:
            remove_tree(staging)
        raise _write_failed(root, step, exc) from None
    except BaseException:
        if staging is not None:
            remove_tree(staging)
        raise
    for old in sorted(root.glob("step-*"))[:-keep] if keep > 0 else []:
        remove_tree(old)
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names, else the newest ``step-*`` with a state file.

    A ``latest`` naming anything but a ``step-N`` folder of ``directory`` (a
    path, ``..``, a link) is refused with :class:`TrainingError`: resuming
    from it would read state and weights from outside the run.
    """
    root = Path(directory)
    _check_root(root)
    named = _named_by_latest(root)
    if named is not None and (named / STATE).is_file():
        return named
    complete = [p for p in sorted(root.glob("step-*")) if not plain_directory_problem(p) and (p / STATE).is_file()]
    return complete[-1] if complete else None


def _named_by_latest(root: Path) -> Path | None:
    """The folder ``latest`` names (None when it is absent or unreadable); refuses one outside ``root``."""
    pointer = root / "latest"
    try:
        mode = os.lstat(pointer).st_mode
    except FileNotFoundError:
        return None
    try:
        name = read_regular_file(pointer, limit=4096).decode("utf-8").strip() if stat.S_ISREG(mode) else None
    except (OSError, UnicodeDecodeError):
        return None  # damaged: the newest complete folder is used instead
    if name == "":
        return None
    if name is None:
        problem = "is not a file"
    elif not _STEP_NAME.fullmatch(name):
        problem = f"names {name!r}"
    else:
        linked = plain_directory_problem(root / name)
        problem = f"names {name!r}, and {linked}" if linked else ""
    if problem:
        raise TrainingError(
            f"cannot resume: {pointer} {problem}, not a step-N folder inside {root} (ftq writes only such a name "
            f"there). Delete {pointer} to resume from the newest complete checkpoint, or run without --resume."
        )
    return root / name


def read_checkpoint_state(path: Path) -> dict:
    """The JSON state of a checkpoint directory (whose checkpoints root must hold no links)."""
    links = link_problems(path.parent)
    if links:
        raise TrainingError(
            f"cannot resume from {path.parent}: {'; '.join(links)}. ftq writes checkpoints without links and never "
            f"reads files outside them; delete the checkpoints directory and run without --resume to start over."
        )
    try:
        return parse_untrusted_json((path / STATE).read_text())
    except (OSError, ValueError) as exc:
        raise TrainingError(f"checkpoint {path} is damaged ({exc}); delete it to resume from an earlier one") from None


def _load_trained(model, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's trained parameters back; they must be exactly the model's trainable ones."""
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"the trained parameters differ (missing {missing[:3]}, unexpected {extra[:3]})")
    model.load_state_dict(tensors, strict=False)


def load_latest_checkpoint(directory: str | os.PathLike, *, model, optimizer, scheduler) -> dict | None:
    """Restore the newest checkpoint into the given objects; return its state, or None."""
    from safetensors import SafetensorError

    path = latest_checkpoint(directory)
    if path is None:
        return None
    state = read_checkpoint_state(path)
    try:
        model_tensors = load_tensors(path / "model.safetensors", state.get("model_aliases"))
        if state.get("trained_only"):
            _load_trained(model, model_tensors)
        else:
            model.load_state_dict(model_tensors, strict=True)
        optimizer.load_state_dict(_optimizer_from_tensors(load_tensors(path / "optimizer.safetensors"), state["optimizer"]))
        scheduler.last_epoch = state["scheduler"]["last_epoch"]
        if state["scheduler"].get("step_count") is not None:
            scheduler._step_count = state["scheduler"]["step_count"]
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        rng = load_tensors(path / "rng.safetensors")
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, SafetensorError) as exc:
        raise TrainingError(
            f"cannot resume from checkpoint {path}: {exc}. It may come from a different model or "
            f"quantizer setup; run without --resume to start over."
        ) from None
    return state
