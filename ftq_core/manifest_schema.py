"""The declared shape of an artifact's ``manifest.json``, checked in one place before any field is used.

An artifact may come from someone else, so its manifest is data to check, not
to trust: every field ftq reads has a declared type here, and the names in
``files`` (and an adapter's ``files``) must be plain file names inside the
artifact, so that no entry can make ftq open a file elsewhere.  Fields ftq
does not read are left alone (a newer ftq may add some).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from .errors import ArtifactError
from .file_safety import is_plain_name

__all__ = ["MANIFEST_FIELDS", "check_manifest", "malformed"]

#: A check of one value; raises :class:`ArtifactError` naming ``field`` when the value is not what it must be.
Check = Callable[[Any, str], None]

_FIX = "write the artifact again from the source model"


def _shown(value: Any) -> str:
    """``value`` as the message shows it: its JSON kind and a short rendering."""
    kinds = {str: "the string", bool: "the boolean", int: "the number", float: "the number", list: "a list",
             dict: "an object"}
    if value is None:
        return "null"
    text = repr(value)
    return f"{kinds.get(type(value), type(value).__name__)} {text if len(text) <= 60 else text[:57] + '...'}"


def malformed(field: str, what: str, value: Any) -> ArtifactError:
    """The error for a manifest ``field`` that is not ``what``."""
    return ArtifactError(f"manifest.json is malformed: {field} must be {what}, got {_shown(value)}; {_FIX}")


def _simple(what: str, test: Callable[[Any], bool]) -> Check:
    def check(value: Any, field: str) -> None:
        if not test(value):
            raise malformed(field, what, value)

    return check


STRING = _simple("a string", lambda v: isinstance(v, str))
INTEGER = _simple("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool))
BOOLEAN = _simple("true or false", lambda v: isinstance(v, bool))
OBJECT = _simple("an object", lambda v: isinstance(v, dict))
DIGEST = _simple("a SHA-256 digest (64 hex digits)", lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v))
FILE_NAME = _simple("a plain file name inside the artifact (no '/', '..' or absolute path)", is_plain_name)


def optional(check: Check) -> Check:
    """``check``, or null."""
    def check_optional(value: Any, field: str) -> None:
        if value is not None:
            check(value, field)

    return check_optional


def list_of(item: Check) -> Check:
    def check(value: Any, field: str) -> None:
        _simple("a list", lambda v: isinstance(v, list))(value, field)
        for index, entry in enumerate(value):
            item(entry, f"{field}[{index}]")

    return check


def object_of(item: Check, *, key: Check = STRING) -> Check:
    """An object whose keys pass ``key`` and whose values pass ``item``."""
    def check(value: Any, field: str) -> None:
        OBJECT(value, field)
        for name, entry in value.items():
            key(name, f"a key of {field}")
            item(entry, f"{field}[{name!r}]")

    return check


def record(fields: dict[str, tuple[bool, Check]]) -> Check:
    """An object with the given ``{name: (required, check)}`` fields (others are ignored)."""
    def check(value: Any, field: str) -> None:
        OBJECT(value, field or "the manifest")
        for name, (required, inner) in fields.items():
            where = f"{field}.{name}" if field else name
            if name in value:
                inner(value[name], where)
            elif required:
                raise ArtifactError(f"manifest.json is malformed: {where} is missing; {_FIX}")

    return check


_LAYER = record({"name": (True, STRING), "module_type": (True, STRING), "scheme": (True, STRING),
                 "quantized": (True, BOOLEAN), "reason": (False, STRING), "parameters": (False, INTEGER)})

_MODULE = record({"codec": (True, STRING), "meta": (True, OBJECT)})

_ADAPTER = record({"name": (True, STRING), "options": (False, OBJECT), "merged": (False, BOOLEAN),
                   "files": (False, list_of(FILE_NAME))})

#: Every manifest field ftq reads: ``{name: (required, check)}``.
MANIFEST_FIELDS: dict[str, tuple[bool, Check]] = {
    "format": (True, STRING),
    "format_version": (True, INTEGER),
    "files": (True, object_of(DIGEST, key=FILE_NAME)),
    "modules": (True, object_of(_MODULE)),
    "aliases": (False, object_of(STRING)),
    "codecs": (False, object_of(OBJECT)),
    "versions": (False, object_of(STRING)),
    "engine": (False, optional(STRING)),
    "method": (False, STRING),
    "quantizer_options": (False, OBJECT),
    "layers": (False, list_of(_LAYER)),
    "source_model": (False, STRING),
    "components": (False, object_of(OBJECT)),
    "adapter": (False, optional(_ADAPTER)),
    "base_artifact": (False, STRING),
    "dataset_fingerprint": (False, STRING),
    "dataset": (False, STRING),
}

_MANIFEST = record(MANIFEST_FIELDS)


def check_manifest(manifest: Any) -> None:
    """Raise :class:`ArtifactError` naming the first field of ``manifest`` that does not have its declared type."""
    _MANIFEST(manifest, "")
