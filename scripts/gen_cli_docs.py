"""Write docs/cli.md: ``ftq --help`` and every built-in subcommand's help, as the CLI prints them.

    python scripts/gen_cli_docs.py          # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check  # exit 1 if docs/cli.md is out of date

The help is rendered at a fixed width (80 columns) with third-party plugins
off, so the page is the same on every machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
WIDTH = 80


def render() -> str:
    """The Markdown page, from the commands' own help texts."""
    os.environ["FTQ_LOAD_PLUGINS"] = ""  # built-in commands only: plugin commands differ per machine
    import click

    from ftq_core.cli import cli

    # The root's context settings (e.g. -h as well as --help) pass down to subcommands.
    root = click.Context(cli, info_name="ftq", terminal_width=WIDTH, max_content_width=WIDTH, **cli.context_settings)
    parts = [
        "# The ftq command line",
        "",
        "Generated from the commands' own `--help` by `python scripts/gen_cli_docs.py`; do not edit by hand",
        "(a test fails when this page and the CLI disagree). Plugins may add commands of their own:",
        "`ftq plugins` lists them.",
        "",
        "## ftq",
        "",
        "```text",
        cli.get_help(root),
        "```",
    ]
    for name in sorted(cli.commands):
        command = cli.commands[name]
        context = click.Context(command, info_name=name, parent=root, terminal_width=WIDTH, max_content_width=WIDTH)
        parts += ["", f"## ftq {name}", "", "```text", command.get_help(context), "```"]
    return "\n".join(parts) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date; run: python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
