"""The plugin commands of the ``ftq`` CLI: ``plugins``, ``install``, ``uninstall``.

Also the two pieces of plugin plumbing the root command needs: honouring
``--disable-plugin`` and attaching the subcommands plugins add.  Every
function here prints; the work is done by :mod:`ftq_core.plugins` and
:mod:`ftq_core.installer`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import click

from .cli_errors import user_errors

__all__ = ["add_plugin_commands", "apply_disabled", "attach_plugin_commands", "render_plugin"]

_STATUS_COLOURS = {
    "loaded": "green", "loaded with warnings": "yellow", "loaded with errors": "yellow", "failed": "red",
    "disabled": "yellow",
}


def render_plugin(info: dict[str, Any]) -> None:
    """Print one plugin (a ``PluginInfo.to_dict()``) as a short block."""
    version = f" {info['version']}" if info.get("version") else ""
    origin = info["source"]
    if info["source"] == "entry point":
        origin = f"entry point {info['module']} of {info['distribution']}{version}"
    elif info["source"] == "built-in":
        origin = f"built-in {info['module']} of ftq{version}"
    head = click.style(info["name"], bold=True)
    status = click.style(info["status"], fg=_STATUS_COLOURS.get(info["status"]))
    click.echo(f"{head} — {info['kind']}, {status}")
    click.echo(f"    from: {origin}")
    for kind, names in sorted(info["components"].items()):
        for name in names:
            about = info.get("descriptions", {}).get(kind, {}).get(name, "")
            click.echo(f"    {kind}: {name}" + (f" — {about}" if about else ""))
    if info.get("codecs"):
        click.echo(f"    module codecs: {', '.join(info['codecs'])}")
    if info.get("commands"):
        click.echo(f"    commands: {', '.join('ftq ' + c for c in info['commands'])}")
    if info.get("hooks"):
        click.echo(f"    hooks: {', '.join(info['hooks'])}")
    if info.get("api_version") is not None:
        click.echo(f"    plugin API: {info['api_version']}")
    if info.get("location"):
        click.echo(f"    code: {info['location']}")
    if info["disabled"]:
        click.echo("    disabled by --disable-plugin or FTQ_DISABLE_PLUGINS")
    for warning in info.get("warnings", []):
        click.secho(f"    warning: {warning}", fg="yellow")
    for error in info["errors"]:
        click.secho(f"    error: {error}", fg="red")


@click.command(name="plugins")
@click.argument("component", required=False, metavar="[NAME]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per plugin) instead of text.")
@click.option("--all", "show_all", is_flag=True, help="Include ftq's built-in plugins.")
@click.option("--options", "show_options", is_flag=True,
              help="List every component's options (or component NAME's): type, default and help.")
def plugins_command(component: str | None, as_json: bool, show_all: bool, show_options: bool) -> None:
    """List installed plugins: what each registers, its version, where its code is, and errors.

    Third-party plugins are packages with an entry point in the `ftq` group.
    A plugin that failed to load is listed with the reason; ftq runs without
    it. Built-in plugins are shown with --all (or when they have errors).
    With --options, the options each dataset, trainer and quantizer takes
    (`--set KIND.KEY=VALUE`), e.g. `ftq plugins --options dynamic`.
    """
    from .plugins import get_plugins

    manager = get_plugins()
    if component is not None and not show_options:
        raise click.UsageError(f"NAME ({component!r}) goes with --options: ftq plugins --options {component}")
    if show_options:
        _print_options(manager, component, as_json=as_json)
        return
    root = click.get_current_context().find_root().command  # plugin commands are checked against it
    infos = [info.to_dict() for info in manager.describe(cli=root)]
    shown = [i for i in infos if show_all or i["source"] != "built-in" or i["errors"] or i["disabled"]]
    if as_json:
        click.echo(json.dumps(shown, indent=2))
        return
    for info in shown:
        render_plugin(info)
    third_party = sum(1 for i in infos if i["source"] == "entry point")
    if os.environ.get("FTQ_LOAD_PLUGINS") == "":
        click.echo("Third-party plugins are not loaded: FTQ_LOAD_PLUGINS is set and empty.")
    elif not third_party:
        click.echo("No third-party plugins installed; `ftq install NAME` adds one.")
    if not show_all:
        built_in = sum(1 for i in infos if i["source"] == "built-in")
        click.echo(f"({built_in} built-in plugins not shown; `ftq plugins --all` lists them.)")


@user_errors
def _print_options(manager, name: str | None, *, as_json: bool) -> None:
    from .component_options import component_options, render_text
    from .errors import UsageError
    from .registry import COMPONENT_KINDS

    entries = component_options(manager, name)
    if name is not None and not entries:
        known = sorted({c.name for kind in COMPONENT_KINDS for c in manager.table(kind)})
        raise UsageError(f"no dataset, trainer or quantizer is called {name!r}; known: {', '.join(known)}")
    click.echo(json.dumps(entries, indent=2) if as_json else render_text(entries))


@click.command(name="install")
@click.argument("packages", nargs=-1, metavar="[PACKAGE]...")
@click.option("-e", "--editable", multiple=True, metavar="PATH", help="Install a local project in editable mode (repeatable).")
@click.option("-U", "--upgrade", is_flag=True, help="Upgrade the packages to the newest versions (torch stays as it is).")
@click.option("--force-reinstall", is_flag=True, help="Reinstall even if already up to date.")
@click.option("--no-deps", is_flag=True, help="Do not install the packages' dependencies.")
@click.option("--no-build-isolation", is_flag=True, help="Build local projects with the build tools already installed (works offline).")
@click.option("--pre", is_flag=True, help="Allow pre-release versions.")
@click.option("-q", "--quiet", is_flag=True, help="Less pip output.")
def install_command(packages: tuple[str, ...], editable, upgrade, force_reinstall, no_deps, no_build_isolation, pre, quiet) -> None:
    """Install plugin PACKAGEs (names, local paths, URLs) into ftq's own environment.

    Runs pip with the Python that runs ftq, so the plugins land where ftq finds
    them, with the installed torch pinned: a plugin can never replace torch (a
    plugin that needs another torch fails with a message instead). pip's
    usual settings (PIP_INDEX_URL, pip.conf) apply. Afterwards, lists what the
    new plugins registered.

    \b
    Examples:
      ftq install ftq-weight-only
      ftq install ./examples/ftq-weight-only
      ftq install -e ./my-plugin
    """
    from .installer import PipOptions, install

    options = PipOptions(
        editable=editable, upgrade=upgrade, force_reinstall=force_reinstall,
        no_deps=no_deps, no_build_isolation=no_build_isolation, pre=pre, quiet=quiet,
    )
    result = user_errors(install)(packages, options)
    if not result.plugins:
        click.echo("Installed. No new ftq plugin was registered (the package has no entry point in the "
                   "'ftq' group, or this version was already installed); `ftq plugins` lists what is there.")
        return
    click.echo("Installed plugins:")
    for info in result.plugins:
        render_plugin(info)
    _warn_if_hidden([info["name"] for info in result.plugins], [info["distribution"] for info in result.plugins])


@click.command(name="uninstall")
@click.argument("packages", nargs=-1, required=True, metavar="PACKAGE...")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def uninstall_command(packages: tuple[str, ...], yes: bool) -> None:
    """Uninstall plugin PACKAGEs from ftq's environment (pip uninstall).

    ftq itself and torch are refused: use pip directly for those.
    """
    from .installer import uninstall

    removed = user_errors(uninstall)(packages, yes=yes)
    for name, distribution, version in removed:
        click.echo(f"Removed plugin {name} ({distribution} {version}).")
    if not removed:
        click.echo("No ftq plugin was removed.")


def _warn_if_hidden(names: list[str], distributions: list[str]) -> None:
    """Tell the user when their FTQ_LOAD_PLUGINS / FTQ_DISABLE_PLUGINS would hide a plugin just installed."""
    allow = os.environ.get("FTQ_LOAD_PLUGINS")
    disabled = {p.strip() for p in os.environ.get("FTQ_DISABLE_PLUGINS", "").split(",") if p.strip()}
    for name, dist in zip(names, distributions):
        allowed = allow is None or name in allow.split(",") or dist in allow.split(",")
        if not allowed or name in disabled or dist in disabled:
            click.secho(f"Note: {name} is installed but will not load while FTQ_LOAD_PLUGINS={allow!r} / "
                        f"FTQ_DISABLE_PLUGINS={os.environ.get('FTQ_DISABLE_PLUGINS', '')!r}.", fg="yellow", err=True)


def apply_disabled(disabled: Sequence[str]) -> None:
    """Honour ``--disable-plugin``: rebuild the process-wide manager without those plugins."""
    from . import plugins as plugins_module

    if not disabled:
        return
    current = plugins_module._PLUGINS
    if current is None or not set(disabled) <= current.disabled:
        current = plugins_module.Plugins(disabled=disabled)
        plugins_module.reset_plugins(current)
    for name in current.unmatched_disabled():
        click.secho(f"Warning: --disable-plugin {name}: no plugin of that name; `ftq plugins --all` lists them.",
                    fg="yellow", err=True)


def _split_argv(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The subcommand name in ``argv`` and the ``--disable-plugin`` values before it."""
    disabled: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--disable-plugin":
            if args:
                disabled.append(args.pop(0))
        elif arg.startswith("--disable-plugin="):
            disabled.append(arg.partition("=")[2])
        elif not arg.startswith("-"):
            return arg, disabled
    return None, disabled


def attach_plugin_commands(cli: click.Group, argv: Sequence[str]) -> None:
    """Add plugin subcommands to ``cli`` when ``argv`` asks for a command that is not built in.

    Built-in commands and ``ftq --help`` never pay for importing plugins.
    """
    command, disabled = _split_argv(argv)
    if command is None or command in cli.commands:
        return
    from .plugins import get_plugins

    apply_disabled(disabled)
    get_plugins().add_commands(cli)


def add_plugin_commands(cli: click.Group) -> None:
    """Register ``plugins``, ``install`` and ``uninstall`` on the root group."""
    for command in (plugins_command, install_command, uninstall_command):
        cli.add_command(command)
