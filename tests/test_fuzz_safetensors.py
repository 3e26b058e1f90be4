"""Fuzzing the safetensors reader: any header a hostile file can carry ends in tensors or a ValueError, in bounded memory and time.

Every artifact, checkpoint and model directory ftq opens goes through
``ftq_core.tensor_io.read_header`` before anything is allocated; these
property-based tests mutate a valid file's header (fields dropped, values of
other types, huge or negative sizes, offsets outside the file, deep nesting)
and raw bytes, and hold each read to a memory and time budget.
"""

from __future__ import annotations

import json
import struct

import pytest
from ftq_testing import bounded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftq_core.tensor_io import read_header, read_tensors

pytestmark = pytest.mark.filterwarnings("ignore")

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _valid_header() -> tuple[dict, bytes]:
    data = bytes(range(48))
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "I8", "shape": [4, 4], "data_offsets": [24, 40]},
        "c": {"dtype": "BF16", "shape": [4], "data_offsets": [40, 48]},
    }
    return header, data


def _file(tmp_path, header_bytes: bytes, data: bytes, *, length: int | None = None):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + data)
    return path


def _read(path) -> None:
    """Read the file as ftq does; the only refusal allowed is ValueError."""
    with bounded(seconds=10, extra_bytes=512 << 20):
        try:
            read_header(path)
            read_tensors(path)
        except ValueError:
            pass


_ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8), st.floats(allow_nan=True),
    st.integers(min_value=-(2**70), max_value=2**70), st.lists(st.integers(min_value=-(2**66), max_value=2**66), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@FUZZ
@given(tensor=st.sampled_from(["a", "b", "c"]), field=st.sampled_from(["dtype", "shape", "data_offsets", None]), value=_ODD_VALUES)
def test_a_header_field_of_any_type_or_size_is_read_or_refused(tmp_path, tensor, field, value):
    header, data = _valid_header()
    if field is None:
        header[tensor] = value  # the whole entry replaced
    else:
        header[tensor][field] = value
    _read(_file(tmp_path, json.dumps(header).encode(), data))


@FUZZ
@given(shape=st.lists(st.integers(min_value=-(2**65), max_value=2**65), max_size=5), start=st.integers(-(2**65), 2**65),
       end=st.integers(-(2**65), 2**65), dtype=st.sampled_from(["F32", "I8", "BF16", "BOOL", "F64", "U64", "Q4"]))
def test_any_shape_and_offsets_are_read_or_refused(tmp_path, shape, start, end, dtype):
    header, data = _valid_header()
    header["a"] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
    _read(_file(tmp_path, json.dumps(header).encode(), data))


@FUZZ
@given(length=st.integers(min_value=0, max_value=2**64 - 1))
def test_any_declared_header_length_is_refused_or_read(tmp_path, length):
    header, data = _valid_header()
    _read(_file(tmp_path, json.dumps(header).encode(), data, length=length))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(min_value=0, max_value=400), st.integers(min_value=1, max_value=255)), min_size=1, max_size=6))
def test_random_byte_flips_are_read_or_refused(tmp_path, flips):
    header, data = _valid_header()
    raw = bytearray(_file(tmp_path, json.dumps(header).encode(), data).read_bytes())
    for offset, mask in flips:
        raw[offset % len(raw)] ^= mask
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    _read(path)


@pytest.mark.parametrize("header_bytes", [
    b"[" * 200_000 + b"]" * 200_000,  # nesting deep enough to exhaust a recursive parser
    b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    b"\xff\xfe not utf-8",
    b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}}',
    b"null",
    b'"a string"',
    b"{" + b'"k": 1,' * 50_000 + b'"z": 2}',
], ids=["deep-list", "deep-object", "not-utf8", "duplicate-key", "null", "string", "many-keys"])
def test_hostile_headers_are_refused_with_a_value_error(tmp_path, header_bytes):
    path = _file(tmp_path, header_bytes, bytes(8))
    with bounded(seconds=10, extra_bytes=512 << 20), pytest.raises(ValueError):
        read_header(path)
