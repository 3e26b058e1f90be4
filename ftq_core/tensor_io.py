"""Atomic, pickle-free file writing: safetensors for tensors, JSON for the rest."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = [
    "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "save_tensors", "load_tensors",
    "sha256_file", "fsync_dir", "adopt_saved_tensors",
]


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Have ``write(temporary_path)`` fill a file beside ``path``, then put it in place in one rename.

    Readers see the old file or the new one, never half; the data is on disk
    (fsync) before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


#: Byte alignment every loaded tensor gets (a cache line, what vectorised kernels assume).
ALIGNMENT = 64


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Save tensors as safetensors, atomically (readers see the old file or the new one).

    Tensors sharing storage (tied weights) are written once; the returned map
    ``{alias: kept_name}`` says which names to fill from which on load.
    """
    from safetensors.torch import save_file

    kept: dict[str, Any] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        key = (tensor.device.type, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor.detach().to("cpu").contiguous()
    # save_file writes straight from the tensors' memory; save() would first build
    # the whole file as one bytes object (for a checkpoint: model + optimizer
    # state again, over 1.5 GB for a 135M model).
    atomic_write(path, lambda tmp: save_file(kept, tmp, metadata=dict(metadata or {})))
    return aliases


def load_tensors(path: str | os.PathLike, aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load a safetensors file (never a pickle) and fill in aliased names."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    # Every tensor is copied into torch's own allocation, for two reasons:
    # safetensors packs tensors back to back, so most start at addresses that
    # are not 64-byte aligned, and torch 2.13's int8 weight-only GEMV
    # (``_weight_int8pack_mm``) crashes the process on such a weight; and a
    # single tensor left on the file's memory map keeps the whole map (every
    # page the copies read) resident beside the copies: 135 MB more for the
    # SmolLM2 int8 artifact.
    tensors = {name: t.clone() for name, t in tensors.items()}
    for alias, original in (aliases or {}).items():
        tensors[alias] = tensors[original]
    return tensors


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_failure_kind(exc: OSError) -> str:
    """Why a write failed, to pick the fix a message suggests: ``"no-space"``, ``"not-writable"`` or ``"other"``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no-space"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "not-writable"
    return "other"


def adopt_saved_tensors(module: Any, tensors: Mapping[str, Any], names: tuple[str, ...], *, what: str) -> Any:
    """Put the saved tensors ``names`` onto ``module`` as they are, after checking each against the module's own.

    A codec's ``restore`` builds an empty module, then adopts the loaded
    tensors without copying (tensors tied in the artifact stay tied).  Each
    must have the shape and dtype of the buffer it replaces; a name whose
    buffer is ``None`` (an absent bias) is skipped.  Anything else is an
    :class:`~ftq_core.errors.ArtifactError` naming the tensor (``what``: e.g.
    ``"int8 layer"``).
    """
    from .errors import ArtifactError

    for name in names:
        expected = getattr(module, name)
        if expected is None:
            continue
        tensor = tensors.get(name)
        if tensor is None or tensor.shape != expected.shape or tensor.dtype != expected.dtype:
            found = "missing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
            raise ArtifactError(
                f"saved {what} tensor {name!r} is {found}, expected {tuple(expected.shape)} {expected.dtype}; "
                f"the artifact is damaged, write it again"
            )
        setattr(module, name, tensor)
    return module
