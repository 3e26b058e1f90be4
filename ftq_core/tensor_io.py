"""Atomic, pickle-free file writing: safetensors for tensors, JSON for the rest."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from .untrusted_json import parse_untrusted_json

__all__ = [
    "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "save_tensors", "load_tensors",
    "sha256_file", "fsync_dir", "adopt_saved_tensors", "read_tensors", "read_header", "ChecksumMismatch",
]


class ChecksumMismatch(ValueError):
    """A file's bytes do not match the SHA-256 recorded for them (changed after saving)."""


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
    atomic_write(path, lambda tmp: _save_file(save_file, kept, tmp, dict(metadata or {})))
    return aliases


def _save_file(save_file, tensors: dict, path: str, metadata: dict) -> None:
    """``save_file``, with safetensors' own error for a failed write (a full disk, say) raised as ``OSError``.

    Callers turn an ``OSError`` into one line that says what was kept and how
    to fix it; safetensors raises ``SafetensorError`` instead, which would
    reach the user as a traceback after all the work.
    """
    from safetensors import SafetensorError

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as exc:
        raise _os_error(str(exc), path) from exc


def _os_error(message: str, path: str) -> OSError:
    """The ``OSError`` a safetensors I/O failure stands for (its message embeds the OS error code, when known)."""
    found = re.search(r"code: (\d+)", message)
    if found:
        code = int(found.group(1))
    elif "No space left" in message:
        code = errno.ENOSPC
    else:
        return OSError(errno.EIO, f"write failed ({message})", path)
    return OSError(code, os.strerror(code), path)


def load_tensors(path: str | os.PathLike, aliases: Mapping[str, str] | None = None, *,
                 sha256: str | None = None) -> dict[str, Any]:
    """Load a safetensors file (never a pickle) and fill in aliased names.

    Each tensor is read with ordinary file reads into memory torch allocated
    for it: never a memory map, whose pages (the whole file) would count as
    resident beside the copies until it closes, and 64-byte aligned (torch
    2.13's int8 weight-only GEMV, ``_weight_int8pack_mm``, crashes the
    process on the unaligned addresses at which safetensors packs tensors).
    ``sha256``: the file's recorded checksum, checked on the bytes loaded (see :func:`read_tensors`).
    """
    tensors = read_tensors(path, sha256=sha256)
    for alias, original in (aliases or {}).items():
        tensors[alias] = tensors[original]
    return tensors


def read_tensors(path: str | os.PathLike, names=None, *, sha256: str | None = None) -> dict[str, Any]:
    """The tensors ``names`` (all by default) of a safetensors file, read as :func:`load_tensors` says.

    With ``sha256``, the file is opened without following a link and every
    byte of it is hashed as it is read into the tensors, so the tensors
    returned are the very bytes checked (a file swapped after a separate
    check could not be), and one pass reads it; a mismatch raises
    :class:`ChecksumMismatch`.
    """
    import torch

    digest = hashlib.sha256() if sha256 is not None else None
    with _open(path, no_follow=digest is not None) as handle:
        entries, data_start, head = _parse_header(handle)
        wanted = set(entries if names is None else names)
        # Verifying reads every tensor, in file order, so the hash covers the file from start to end.
        order = sorted(entries, key=lambda n: entries[n][2]) if digest is not None else list(wanted)
        if digest is not None:
            digest.update(head)
        tensors = {}
        for name in order:
            tensor = _read_tensor(handle, path, name, entries[name], data_start, torch)
            if digest is not None and tensor.numel():
                digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
            if name in wanted:
                tensors[name] = tensor
        if digest is not None:
            for chunk in iter(lambda: handle.read(1 << 20), b""):  # bytes appended since the header was read
                digest.update(chunk)
            if digest.hexdigest() != sha256:
                raise ChecksumMismatch(f"{path} does not match its checksum")
    return tensors


def _read_tensor(handle, path, name: str, entry, data_start: int, torch):
    """One tensor, read from ``handle`` into 64-byte aligned memory torch allocated for it."""
    dtype, shape, start, end = entry
    tensor = torch.empty(shape, dtype=_TORCH_DTYPES[dtype])
    if end > start:
        handle.seek(data_start + start)
        view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        if handle.readinto(view) != end - start:
            raise ValueError(f"{path}: tensor {name!r} ends past the end of the file")
    return tensor


def _open(path: str | os.PathLike, *, no_follow: bool):
    """A binary handle on ``path``; with ``no_follow``, only a regular file reached without following a link."""
    if not no_follow:
        return open(path, "rb")
    from .file_safety import open_regular_file

    return os.fdopen(open_regular_file(Path(path)), "rb")


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
    with open(path, "rb") as handle:
        entries, data_start, _ = _parse_header(handle)
    return entries, data_start


def _parse_header(handle) -> tuple[dict[str, tuple[str, tuple[int, ...], int, int]], int, bytes]:
    """:func:`read_header`'s result from an open file, plus the header's raw bytes (length prefix included).

    As safetensors itself requires, the tensors' byte ranges follow one
    another without gaps or overlaps and end where the file ends: every byte
    of the file then belongs to the header or to exactly one tensor.
    """
    size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(8)
    length = int.from_bytes(prefix, "little")
    if len(prefix) < 8 or length <= 0 or length > min(size - 8, 100 << 20):
        raise ValueError(f"header length {length} does not fit a {size}-byte file")
    raw = handle.read(length)
    header = parse_untrusted_json(raw)  # a tensor named twice is refused: which one counts would be a guess
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    entries = {name: _header_entry(name, entry, size - 8 - length)
               for name, entry in header.items() if name != "__metadata__"}
    position = 0
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if start != position:
            raise ValueError(f"tensor {name!r} starts at byte {start} of the data, not {position}: tensors overlap "
                             f"or leave a gap")
        position = end
    if position != size - 8 - length:
        raise ValueError(f"the tensors end at byte {position} of the data, which has {size - 8 - length}")
    return entries, 8 + length, prefix + raw


def _header_entry(name: str, entry: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype, shape, start, end)`` of one header entry, checked against the data's size."""
    try:
        dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
        start, end = (int(v) for v in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"tensor {name!r} has a malformed header entry ({exc})") from None
    if dtype not in ELEMENT_BYTES:
        raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
    if any(d < 0 for d in shape) or not 0 <= start <= end <= data_size or end - start != tensor_bytes(dtype, shape):
        raise ValueError(f"tensor {name!r} lies outside the file or has the wrong byte count")
    return dtype, shape, start, end


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of the regular file ``path``, opened without following a link."""
    digest = hashlib.sha256()
    with _open(path, no_follow=True) as handle:
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
