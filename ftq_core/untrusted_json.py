"""Parsing JSON that came with a file someone else made: every failure is a ``ValueError``.

``json.loads`` raises ``RecursionError`` on deeply nested input (a few
hundred kilobytes of ``[`` are enough); callers that refuse a damaged file
catch ``ValueError`` only, so this is the one place that turns it into one.
A key given twice in one object is refused too: ``json`` keeps the last, and
another reader (safetensors' own, a checker that stopped at the first) may
see the other, so the file would mean two things.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["parse_untrusted_json"]


def parse_untrusted_json(data: str | bytes) -> Any:
    """``json.loads(data)``, raising ``ValueError`` for anything that is not a JSON document ftq can hold."""
    try:
        return json.loads(data, object_pairs_hook=_without_duplicates)
    except RecursionError:
        raise ValueError("the JSON nests too deeply to be a real header or config") from None


def _without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"the key {twice!r} appears twice in one JSON object")
    return value
