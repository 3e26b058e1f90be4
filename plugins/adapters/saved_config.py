"""A saved LoRA adapter's ``adapter_config.json`` checked before peft builds anything from it.

peft trusts the file: ``r: 100000`` allocates every adapter matrix before
the weights are compared with it (hundreds of MB for a tiny model), a
string ``target_modules`` is a regular expression matched against every
module name (``"(.+)+z"`` backtracks for ever), ``r: "16"`` ends in a
``TypeError`` and a NaN ``lora_alpha`` in silent garbage.  Here the values
are checked for type and range, and the rank against the shapes in the
weights file's header (read without loading a tensor).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

__all__ = ["check_adapter_config", "MAX_TARGETS"]

#: A ``target_modules`` string peft may see (it full-matches it as a regular expression against each module
#: name): module names joined by ``|``, optionally in parentheses after ``.*`` or ``.*\.`` -- the shapes peft's
#: users write (``.*\.(q_proj|v_proj)``), none of which can backtrack for long.
_PLAIN_ALTERNATION = re.compile(r"(?:\.\*(?:\\\.)?)?(?:[A-Za-z0-9_]+(?:\|[A-Za-z0-9_]+)*"
                                r"|\([A-Za-z0-9_]+(?:\|[A-Za-z0-9_]+)*\))")
#: A ``target_modules`` list entry: a module name or a dotted path.
_MODULE_NAME = re.compile(r"[A-Za-z0-9_.]+")
#: Most ``target_modules`` entries: peft compares each with every module name.
MAX_TARGETS = 4096


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value_problems(values: dict) -> list[str]:
    """Type and range of the values peft builds from."""
    problems = []
    rank = values.get("r")
    if not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        problems.append(f"r is {rank!r}, not a positive integer")
    alpha = values.get("lora_alpha", 8)
    if not (_is_number(alpha) and math.isfinite(alpha) and alpha > 0):
        problems.append(f"lora_alpha is {alpha!r}, not a positive finite number")
    dropout = values.get("lora_dropout", 0.0)
    if not (_is_number(dropout) and 0 <= dropout < 1):
        problems.append(f"lora_dropout is {dropout!r}, not a number in [0, 1)")
    return problems


def _target_problems(targets) -> list[str]:
    """``target_modules`` peft can match without regular-expression backtracking: names, or names joined by ``|``."""
    if isinstance(targets, str):
        if not _PLAIN_ALTERNATION.fullmatch(targets):
            return [f"target_modules is the pattern {targets[:60]!r}; only a list of module names, or names joined "
                    f"by '|' (optionally as .*\\.(a|b)), is accepted"]
        return []
    if not isinstance(targets, list) or not targets:
        return [f"target_modules is {str(targets)[:60]}, not a non-empty list of module names"]
    if len(targets) > MAX_TARGETS:
        return [f"target_modules lists {len(targets)} names, more than the {MAX_TARGETS} any model has"]
    bad = [t for t in targets if not (isinstance(t, str) and _MODULE_NAME.fullmatch(t))]
    return [f"target_modules has {str(bad[0])[:60]!r}, not a module name"] if bad else []


def _shape_problems(rank: int, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The rank against each ``lora_A`` (``[r, in]``) and ``lora_B`` (``[out, r]``) shape in the weights file."""
    pairs = [(name, shape, 0) for name, shape in shapes.items() if ".lora_A." in name]
    pairs += [(name, shape, 1) for name, shape in shapes.items() if ".lora_B." in name]
    if not pairs:
        return ["the weights file holds no lora_A / lora_B tensors"]
    for name, shape, axis in pairs:
        if len(shape) != 2 or shape[axis] != rank:
            return [f"r is {rank} but {name} has shape {list(shape)}"]
    return []


def check_adapter_config(values: dict, weights: Path) -> list[str]:
    """Every problem of ``values`` (a parsed ``adapter_config.json``) before peft sees it.

    ``weights``: the adapter's safetensors file, whose header gives the shapes the rank must fit.  An empty
    list when peft may build the adapter.
    """
    from ftq_core.tensor_io import read_header

    problems = _value_problems(values) + _target_problems(values.get("target_modules"))
    if problems:
        return problems
    try:
        entries, _ = read_header(weights)
    except (OSError, ValueError) as exc:
        return [f"{weights.name} cannot be read ({exc})"]
    return _shape_problems(values["r"], {name: entry[1] for name, entry in entries.items()})
