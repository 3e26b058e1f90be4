"""Write docs/cli.md (``ftq --help`` and every built-in subcommand's help, as the CLI prints them) and
docs/options.md (every built-in component's options, as ``ftq plugins --options`` lists them).

    python scripts/gen_cli_docs.py          # rewrite both pages
    python scripts/gen_cli_docs.py --check  # exit 1 if either is out of date

The help is rendered at a fixed width (80 columns) with third-party plugins
off, so the pages are the same on every machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
OPTIONS_DOC = DOC.parent / "options.md"
WIDTH = 80


def render() -> str:
    """The Markdown page, from the commands' own help texts."""
    os.environ["FTQ_LOAD_PLUGINS"] = ""  # built-in commands only: plugin commands differ per machine
    os.environ.pop("FTQ_DISABLE_PLUGINS", None)
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


def render_options() -> str:
    """The Markdown page of the built-in components' options, from their config classes."""
    os.environ["FTQ_LOAD_PLUGINS"] = ""  # built-in components only, none of them disabled
    os.environ.pop("FTQ_DISABLE_PLUGINS", None)
    from ftq_core.component_options import component_options, render_markdown
    from ftq_core.plugins import Plugins

    head = [
        "# Options of ftq's built-in components",
        "",
        "Generated from the config classes by `python scripts/gen_cli_docs.py`; do not edit by hand (a test fails",
        "when this page and the code disagree). `ftq plugins --options [NAME]` prints the same for every installed",
        "component, third-party ones included. Set an option with `--set KIND.KEY=VALUE` on the command line or in",
        "the `[KIND]` table of a config file (`-c run.toml`).",
    ]
    return "\n".join(head) + "\n" + render_markdown(component_options(Plugins(load_entrypoints=False))) + "\n"


def main(argv: list[str]) -> int:
    pages = {DOC: render(), OPTIONS_DOC: render_options()}
    if "--check" in argv:
        stale = [path for path, text in pages.items() if not path.is_file() or path.read_text(encoding="utf-8") != text]
        for path in stale:
            print(f"{path} is out of date; run: python scripts/gen_cli_docs.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in pages.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
