"""What ``ftq plugins --options`` prints and ``docs/options.md`` holds: every component's options.

Read from the components' config classes (``describe_fields``: name, type,
default and the ``help`` metadata), as llm's ``models --options`` does, so
the listing and the docs can never disagree with the code.
"""

from __future__ import annotations

import enum
from typing import Any

from .configs import describe_fields
from .registry import COMPONENT_KINDS

__all__ = ["component_options", "shown_default", "render_text", "render_markdown"]


def shown_default(value: Any) -> str:
    """A default as a user writes it in ``--set`` or TOML: enum values, comma lists, ``none``."""
    if value is None:
        return "none"
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(shown_default(v) for v in value) if value else "(empty)"
    return str(value)


def component_options(plugins, name: str | None = None) -> list[dict[str, Any]]:
    """One entry per component (every kind, or those called ``name``): kind, name, plugin, description, options."""
    entries = []
    for kind in COMPONENT_KINDS:
        for component in plugins.table(kind):
            if name is not None and component.name != name:
                continue
            options = [
                {"name": field_name, "type": type_name, "default": shown_default(default), "help": help_text}
                for field_name, type_name, default, help_text in describe_fields(component.config_class)
            ]
            entries.append({"kind": kind, "name": component.name, "plugin": component.plugin,
                            "description": component.description, "options": options})
    return entries


def render_text(entries: list[dict[str, Any]]) -> str:
    lines = []
    for entry in entries:
        about = f" — {entry['description']}" if entry["description"] else ""
        lines.append(f"{entry['kind']} {entry['name']} (plugin {entry['plugin']}){about}")
        if not entry["options"]:
            lines.append("    (no options)")
        for option in entry["options"]:
            lines.append(f"    {option['name']}: {option['type']} (default {option['default']})")
            if option["help"]:
                lines.append(f"        {option['help']}")
    return "\n".join(lines)


def render_markdown(entries: list[dict[str, Any]]) -> str:
    parts = []
    for entry in entries:
        parts += ["", f"## {entry['kind']} `{entry['name']}`", ""]
        if entry["description"]:
            parts += [f"{entry['description']} (plugin `{entry['plugin']}`; set with `--set {entry['kind']}.KEY=VALUE` "
                      f"or a `[{entry['kind']}]` table in the config file).", ""]
        if not entry["options"]:
            parts += ["No options."]
            continue
        parts += ["| option | type | default | meaning |", "|---|---|---|---|"]
        for option in entry["options"]:
            cells = [f"`{option['name']}`", option["type"], f"`{option['default']}`", option["help"]]
            parts.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(parts)
