"""A GGUF file's header walked with every count bounded by the file's size, before any GGUF library parses it.

The ``gguf`` package's reader trusts the counts it reads: an array that
claims 2^40 items makes it read past the end of the file and grow without
end.  This module walks the same header (magic, version, tensor count,
key/value count, the typed values, the tensor descriptions) and refuses any
count whose items could not fit in the bytes left, so the reader that runs
afterwards only ever sees sizes the file can hold.  It also refuses a
``block_count`` that the file's tensors do not have: transformers builds
every block the header asks for before it reads a weight.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelNotFoundError

__all__ = ["GGUFHeader", "check_gguf_header", "read_gguf_header"]

MAGIC = b"GGUF"
#: Fixed-size value types: GGUF type id -> struct format (no byte order).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
#: Most dimensions a GGML tensor has.
_MAX_DIMS = 4
#: Arrays nest only in theory; deeper than this is an attack on the walk itself.
_MAX_NESTING = 4
#: Most strings in one array.  The gguf reader keeps a few Python objects per string (~200 bytes), so a file of
#: millions of empty strings costs far more memory than its size; real vocabularies and merge lists have < 1M.
MAX_STRING_ITEMS = 1 << 21
#: Tensor names of transformer blocks: ``blk.<index>.``.
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass
class GGUFHeader:
    """What ftq needs from a GGUF header: its scalar and string values, and each tensor's name and shape."""

    values: dict[str, object] = field(default_factory=dict)  # scalars and strings
    arrays: dict[str, int] = field(default_factory=dict)  # each array's length (its items are not kept)
    tensors: dict[str, tuple[int, ...]] = field(default_factory=dict)


class _Damaged(Exception):
    """The header is not what the GGUF format allows; the message says which part."""


class _Walk:
    """A cursor over the file's bytes that refuses to step past the end."""

    def __init__(self, data, order: str):
        self.data, self.order, self.pos = data, order, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def scalar(self, code: str):
        size = struct.calcsize(code)
        if size > self.left():
            raise _Damaged(f"the header ends early (at byte {self.pos})")
        value = struct.unpack_from(self.order + code, self.data, self.pos)[0]
        self.pos += size
        return value

    def count(self, what: str, item_bytes: int) -> int:
        """A uint64 count of items of at least ``item_bytes`` each, refused where they cannot fit in the rest."""
        count = self.scalar("Q")
        if count * item_bytes > self.left():
            raise _Damaged(f"{what} claims {count} items, more than the {self.left()} bytes left in the file hold")
        return count

    def string(self) -> str:
        length = self.count("a string", 1)
        raw = bytes(self.data[self.pos:self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def skip(self, count: int, item_bytes: int) -> None:
        self.pos += count * item_bytes


def _value(walk: _Walk, kind: int, depth: int = 0):
    """One typed value; arrays are walked (each string's length checked) and returned as their length."""
    if kind in _SCALARS:
        return walk.scalar(_SCALARS[kind])
    if kind == _STRING:
        return walk.string()
    if kind != _ARRAY or depth >= _MAX_NESTING:
        raise _Damaged(f"a value has type {kind}, which GGUF does not define" if kind != _ARRAY
                       else "arrays are nested deeper than any GGUF file has them")
    item_kind = walk.scalar("I")
    if item_kind in _SCALARS:
        size = struct.calcsize(_SCALARS[item_kind])
        count = walk.count("an array", size)
        walk.skip(count, size)
        return count
    count = walk.count("an array", 8 if item_kind == _STRING else 12)  # a string's length; an array's type + count
    if item_kind == _STRING and count > MAX_STRING_ITEMS:
        raise _Damaged(f"an array of {count} strings is longer than any GGUF vocabulary (at most {MAX_STRING_ITEMS})")
    for _ in range(count):
        _value(walk, item_kind, depth + 1)
    return count


def _tensor(walk: _Walk, file_size: int) -> tuple[str, tuple[int, ...]]:
    """One tensor description: name, shape, type and offset, its byte size checked against the file's."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name = walk.string()
    n_dims = walk.scalar("I")
    if n_dims > _MAX_DIMS:
        raise _Damaged(f"tensor {name!r} has {n_dims} dimensions (GGUF tensors have at most {_MAX_DIMS})")
    shape = tuple(walk.scalar("Q") for _ in range(n_dims))
    kind = walk.scalar("I")
    walk.scalar("Q")  # offset in the data section: the reader checks it against the data it maps
    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
    except (ValueError, KeyError):
        raise _Damaged(f"tensor {name!r} has type {kind}, which this gguf library does not know") from None
    if _elements(shape) // block * block_bytes > file_size:
        raise _Damaged(f"tensor {name!r} of shape {list(shape)} needs more bytes than the whole file has")
    return name, shape


def _walk(data) -> GGUFHeader:
    if bytes(data[:4]) != MAGIC:
        raise _Damaged("it does not start with GGUF's magic bytes")
    walk = _Walk(data, "<")
    walk.pos = 4
    version = walk.scalar("I")
    if version & 0xFFFF == 0:  # a big-endian file, as the gguf reader tells them apart
        walk.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in (2, 3):
        raise _Damaged(f"it is GGUF version {version}; ftq reads versions 2 and 3")
    # the least a tensor description (empty name, no dims) and a key/value pair (empty key, one byte) take
    tensor_count = walk.count("the tensor count", 8 + 4 + 4 + 8)
    kv_count = walk.count("the key/value count", 8 + 4 + 1)
    header = GGUFHeader()
    for _ in range(kv_count):
        key, kind = walk.string(), walk.scalar("I")
        (header.arrays if kind == _ARRAY else header.values)[key] = _value(walk, kind)
    for _ in range(tensor_count):
        name, shape = _tensor(walk, len(data))
        header.tensors[name] = shape
    return header


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The header of the GGUF file ``path``, every count checked against the file's size.

    Raises :class:`~ftq_core.errors.ModelNotFoundError` naming the first part that does not fit.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            if path.stat().st_size == 0:
                raise _Damaged("it is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _walk(data)
    except _Damaged as exc:
        raise ModelNotFoundError(
            f"{path} is not a readable GGUF file ({exc}); it may be truncated or another format. Download or "
            f"convert it again."
        ) from None
    except OSError as exc:
        raise ModelNotFoundError(f"{path} cannot be read ({exc}); check the path and its permissions") from None


def _block_problem(path: Path, header: GGUFHeader) -> str | None:
    """Where ``<arch>.block_count`` says more or fewer blocks than the tensors have, the sentence that says so."""
    arch = header.values.get("general.architecture")
    count = header.values.get(f"{arch}.block_count") if isinstance(arch, str) else None
    if not isinstance(count, int) or isinstance(count, bool):
        return None
    blocks = {int(m.group(1)) for name in header.tensors if (m := _BLOCK.match(name))}
    if blocks and count != len(blocks):
        return (f"{path} says {arch}.block_count = {count} but its tensors hold {len(blocks)} blocks; the header was "
                f"edited or the file is damaged. Download or convert the model again.")
    return None


def _size_problem(path: Path, header: GGUFHeader) -> str | None:
    """Where the sizes the header asks transformers to build dwarf the tensors the file holds, the sentence.

    The estimate (embeddings plus per block four attention and three MLP
    matrices) over-counts grouped-query attention by less than 2x, so 8x is
    far from any real file.
    """
    arch = header.values.get("general.architecture")
    def number(key: str) -> int:
        value = header.values.get(f"{arch}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) else 0
    hidden, ff, blocks = number("embedding_length"), number("feed_forward_length"), number("block_count")
    vocab = number("vocab_size") or header.arrays.get("tokenizer.ggml.tokens", 0)
    wanted = vocab * hidden + blocks * (4 * hidden * hidden + 3 * hidden * ff)
    held = sum(_elements(shape) for shape in header.tensors.values())
    if wanted > 8 * held + (1 << 20):
        return (f"{path} asks for a model of about {wanted / 1e9:.3g}B parameters ({arch}.embedding_length {hidden}, "
                f"feed_forward_length {ff}, block_count {blocks}) but holds {held / 1e9:.3g}B weights; the header was "
                f"edited or the file is damaged. Download or convert the model again.")
    return None


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def check_gguf_header(path: str | Path) -> GGUFHeader:
    """Refuse a GGUF file whose header counts do not fit its size, or whose sizes its tensors contradict.

    Called before any GGUF reader opens the file; the header on success.
    """
    header = read_gguf_header(path)
    problem = _block_problem(Path(path), header) or _size_problem(Path(path), header)
    if problem:
        raise ModelNotFoundError(problem)
    return header
