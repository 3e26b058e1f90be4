"""Config dataclasses from mappings: every problem reported at once.

Components declare their options as frozen, keyword-only dataclasses.  This
module maps a TOML table, a dict or ``KEY=VALUE`` strings onto them: unknown
keys are errors that suggest the nearest known key, values are checked and
coerced against the field types, and the class's own ``__post_init__`` checks
ranges.  All problems are gathered into one :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
from typing import Any, Iterable, Mapping

from .errors import ConfigError

__all__ = ["CommandLineText", "build_config", "check", "coerce_value", "describe_fields", "config_to_dict"]


class CommandLineText(str):
    """A value typed on the command line (``--set key=value``), which is always text.

    Only such text is parsed into numbers, booleans and comma lists.  A string
    in a config file or a Python mapping is taken as the string it is: TOML
    ``bits = "4"`` or ``keep_float = "lm_head"`` is an error naming the fix,
    not silently an int or a one-item list.
    """


def check(conditions: Iterable[tuple[bool, str]], *, where: str | None = None) -> None:
    """Raise one :class:`ConfigError` naming every ``(ok, message)`` that failed.

    Meant for ``__post_init__``: list all range checks, get all failures back.
    """
    problems = [message for ok, message in conditions if not ok]
    if problems:
        raise ConfigError(problems, where=where or "configuration")


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _strip_optional(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        name = "one of " + ", ".join(repr(m.value) for m in tp)
    elif typing.get_origin(tp) is tuple:
        name = f"a list of {_type_name(typing.get_args(tp)[0])}"
    else:
        name = getattr(tp, "__name__", str(tp))
    return f"{name} or none" if optional else name


def _parses(number_type: type, text: str) -> bool:
    try:
        number_type(text.replace("_", ""))
    except ValueError:
        return False
    return True


def coerce_value(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to type ``tp``; raise ``ValueError`` if it cannot be.

    Command-line text (:class:`CommandLineText`) is parsed: ``true``/``false``,
    numbers, comma lists for tuples.  Enum values are given by name or value
    from anywhere.
    """
    typed = isinstance(value, str) and not isinstance(value, CommandLineText)
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError("must not be empty")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        for member in tp:
            if str(value).lower() in (str(member.value).lower(), member.name.lower()):
                return member
        raise ValueError(f"must be {_type_name(tp)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if typed:
            raise ValueError(f"must be true or false, got the string {value!r}; write true or false without quotes")
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ValueError(f"must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if typed and _parses(int, value):
            raise ValueError(f"must be an integer, got the string {value!r}; write the number without quotes")
        if isinstance(value, str) and not typed:
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ValueError(f"must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        number = None
        if isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:
                raise ValueError(f"must be a finite number, got {value!r}") from None
        elif typed and _parses(float, value):
            raise ValueError(f"must be a number, got the string {value!r}; write the number without quotes")
        elif isinstance(value, str) and not typed:
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                pass
        if number is None:
            raise ValueError(f"must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"must be a string, got {value!r}")
    if typing.get_origin(tp) is tuple:
        item_type = typing.get_args(tp)[0]
        if typed:
            items = ", ".join(f'"{part.strip()}"' for part in value.split(",") if part.strip())
            raise ValueError(f'must be {_type_name(tp)}, got the string "{value}"; write a list: [{items}]')
        if isinstance(value, str):
            value = [CommandLineText(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be {_type_name(tp)}, got {value!r}")
        return tuple(coerce_value(v, item_type) for v in value)
    if typing.get_origin(tp) is dict or tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ValueError(f"must be a table, got {value!r}")
    return value


def build_config(cls: type, values: Mapping[str, Any], *, where: str) -> Any:
    """Build ``cls(**values)``, reporting unknown keys, bad types and range errors together."""
    hints = _type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    if not isinstance(values, Mapping):
        raise ConfigError([f"options must be a table of key = value, got {type(values).__name__}"], where=where)
    for key, value in values.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} is not a string; keys are option names")
            continue
        attr = key.replace("-", "_")
        if attr not in fields:
            near = difflib.get_close_matches(attr, list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            known = ", ".join(sorted(fields)) or "none"
            problems.append(f"unknown key {key!r}{hint}; known keys: {known}")
            continue
        try:
            kwargs[attr] = coerce_value(value, hints[attr])
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    if problems:
        # Range checks need well-typed values; still run them on the good ones
        # so the user sees every problem in one pass.
        try:
            cls(**kwargs)
        except ConfigError as exc:
            problems.extend(exc.problems)
        except TypeError:
            pass
        raise ConfigError(problems, where=where)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(exc.problems, where=where) from None
    except TypeError as exc:  # a required field is missing
        raise ConfigError([str(exc)], where=where) from None


def describe_fields(cls: type) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, help)`` for each field, help from ``metadata['help']``."""
    hints = _type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("help", "")))
    return rows


def config_to_dict(config: Any) -> dict[str, Any]:
    """A JSON-able dict of a config dataclass (enums by value, tuples as lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if dataclasses.is_dataclass(value):
            return {k: plain(v) for k, v in dataclasses.asdict(value).items()}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
