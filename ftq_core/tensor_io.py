"""Atomic, pickle-free file writing: safetensors for tensors, JSON for the rest."""

from __future__ import annotations

import errno
import hashlib
import json
import math
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
    """Load a safetensors file (never a pickle) and fill in aliased names.

    Each tensor is read with ordinary file reads into memory torch allocated
    for it: never a memory map, whose pages (the whole file) would count as
    resident beside the copies until it closes, and 64-byte aligned (torch
    2.13's int8 weight-only GEMV, ``_weight_int8pack_mm``, crashes the
    process on the unaligned addresses at which safetensors packs tensors).
    """
    tensors = read_tensors(path)
    for alias, original in (aliases or {}).items():
        tensors[alias] = tensors[original]
    return tensors


def read_tensors(path: str | os.PathLike, names=None) -> dict[str, Any]:
    """The tensors ``names`` (all by default) of a safetensors file, read as :func:`load_tensors` says."""
    import torch

    entries, data_start = read_header(path)
    tensors = {}
    with open(path, "rb") as handle:
        for name in (entries if names is None else names):
            dtype, shape, start, end = entries[name]
            tensor = torch.empty(shape, dtype=_TORCH_DTYPES[dtype])
            if end > start:
                handle.seek(data_start + start)
                view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                if handle.readinto(view) != end - start:
                    raise ValueError(f"{path}: tensor {name!r} ends past the end of the file")
            tensors[name] = tensor
    return tensors


#: safetensors dtype names -> bytes per element
ELEMENT_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                 "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class _DTypes(dict):
    def __missing__(self, key):
        import torch

        table = {"F64": torch.float64, "I64": torch.int64, "U64": torch.uint64, "F32": torch.float32,
                 "I32": torch.int32, "U32": torch.uint32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I16": torch.int16, "U16": torch.uint16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
        if key not in table:
            raise ValueError(f"unknown safetensors dtype {key!r}")
        self.update(table)
        return table[key]


_TORCH_DTYPES = _DTypes()


def tensor_bytes(dtype: str, shape) -> int:
    return math.prod(shape) * ELEMENT_BYTES[dtype]


def read_header(path: str | os.PathLike) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int]:
    """``({name: (dtype, shape, start, end)}, where the data starts)`` from a safetensors file's header.

    Every size is checked against the file's before anything is allocated: the header fits the file,
    each tensor's byte range lies inside the data and matches its dtype and shape.  A file that fails
    raises ``ValueError``.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length <= 0 or length > min(size - 8, 100 << 20):
            raise ValueError(f"header length {length} does not fit a {size}-byte file")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            start, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"tensor {name!r} has a malformed header entry ({exc})") from None
        if dtype not in ELEMENT_BYTES:
            raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or not 0 <= start <= end <= size - 8 - length \
                or end - start != tensor_bytes(dtype, shape):
            raise ValueError(f"tensor {name!r} lies outside the file or has the wrong byte count")
        entries[name] = (dtype, shape, start, end)
    return entries, 8 + length


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
