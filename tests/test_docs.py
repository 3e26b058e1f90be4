"""The documentation cannot rot: docs/plugins.md's Python runs, docs/cli.md matches the CLI."""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_plugins_md_python_blocks_run_in_order(monkeypatch, tmp_path):
    blocks = python_blocks((REPO / "docs" / "plugins.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    # One module for the whole page, as if its blocks were one script.
    module = types.ModuleType("ftq_docs_plugins")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.chdir(tmp_path)
    for number, block in enumerate(blocks, 1):
        exec(compile(block, f"docs/plugins.md (python block {number})", "exec"), module.__dict__)
    assert module.info.status == "loaded"


def test_plugin_walkthrough_is_about_thirty_lines():
    # The block after the "30 lines" heading: code lines, without blanks and imports.
    text = (REPO / "docs" / "plugins.md").read_text(encoding="utf-8")
    section = text.split("## Write a quantizer plugin in 30 lines", 1)[1]
    block = python_blocks(section)[0]
    lines = [l for l in block.splitlines() if l.strip() and not l.lstrip().startswith(("import ", "from "))]
    assert len(lines) <= 30, len(lines)


def _gen_cli_docs():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_md_is_current():
    generator = _gen_cli_docs()
    assert generator.DOC.read_text(encoding="utf-8") == generator.render(), (
        "docs/cli.md is out of date; run: python scripts/gen_cli_docs.py"
    )


def test_options_md_is_current():
    generator = _gen_cli_docs()
    assert generator.OPTIONS_DOC.read_text(encoding="utf-8") == generator.render_options(), (
        "docs/options.md is out of date; run: python scripts/gen_cli_docs.py"
    )


def test_every_builtin_component_option_has_help():
    from ftq_core.component_options import component_options
    from ftq_core.plugins import Plugins

    entries = component_options(Plugins(load_entrypoints=False))
    assert {entry["name"] for entry in entries} >= {"text", "causal-lm", "dynamic", "static", "qat", "qat-int8"}
    missing = [f"{e['kind']} {e['name']}.{o['name']}" for e in entries for o in e["options"] if not o["help"].strip()]
    assert not missing, f"options without help metadata: {missing}"


def test_every_command_and_option_has_help():
    from ftq_core.cli import cli

    missing = []
    for name, command in cli.commands.items():
        if not (command.help or "").strip():
            missing.append(f"ftq {name}")
        for param in command.params:
            if isinstance(param, click.Option) and not param.help:
                missing.append(f"ftq {name} {param.opts[-1]}")
    assert missing == []
