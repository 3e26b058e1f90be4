"""Installing and removing plugin packages in the environment ftq runs in.

A thin layer over pip, run as ``sys.executable -m pip`` so a package lands
where this ftq can import it (the classic mistake is a ``pip`` from another
environment).  Two rules on top of pip:

* torch is never installed, upgraded or downgraded as a side effect: pip gets a
  constraints file pinning the installed torch.  A plain ``pip install`` of a
  package that depends on torch can otherwise replace a CPU build with a
  multi-GB CUDA one.  A package that needs another torch fails to resolve, with
  a message, instead.
* ftq and torch themselves are not uninstalled by ``ftq uninstall``.

After an install, the new plugins are listed as a fresh ``ftq`` process sees
them (an editable install only becomes importable in a new process).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import FtqError, UsageError
from .plugins import ENTRY_POINT_GROUP

__all__ = ["InstallError", "InstallResult", "PipOptions", "pip_install_args", "install", "uninstall", "installed_plugin_entry_points"]

#: Packages ``ftq install`` / ``ftq uninstall`` refuse to touch, and why.
PROTECTED = {
    "torch": "ftq never changes torch (a plain pip install of torch can pull a multi-GB CUDA build). "
    "Install the build you want yourself, pinned, e.g. "
    "`python -m pip install torch==VERSION --index-url https://download.pytorch.org/whl/cpu`",
}
NOT_UNINSTALLABLE = {
    "ftq": "that would remove ftq itself; use `python -m pip uninstall ftq`",
    **PROTECTED,
}


class InstallError(FtqError):
    """pip did not finish (exit code 1)."""


@dataclass(frozen=True, kw_only=True)
class PipOptions:
    """The pip options ``ftq install`` passes through."""

    editable: tuple[str, ...] = ()
    upgrade: bool = False
    force_reinstall: bool = False
    no_deps: bool = False
    no_build_isolation: bool = False
    pre: bool = False
    quiet: bool = False


@dataclass
class InstallResult:
    """What an install changed: the plugins (as ``ftq plugins --json`` dicts) that are new or changed."""

    command: list[str]
    plugins: list[dict[str, Any]] = field(default_factory=list)


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requirement_name(spec: str) -> str | None:
    """The project name of a requirement like ``ftq-foo>=1``; ``None`` for paths and URLs."""
    if os.sep in spec or "/" in spec or spec.startswith(".") or "://" in spec or Path(spec).exists():
        return None
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:  # pragma: no cover - packaging comes with pip and transformers
        return spec.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip()
    try:
        return Requirement(spec).name
    except InvalidRequirement:
        return None


def _refuse(specs: Sequence[str], rules: dict[str, str], action: str) -> None:
    for spec in specs:
        name = _requirement_name(spec)
        if name is not None and _canonical(name) in rules:
            raise UsageError(f"ftq {action} does not {action} {name!r}: {rules[_canonical(name)]}")


def _check_pip() -> None:
    import importlib.util

    if importlib.util.find_spec("pip") is None:
        raise UsageError(
            f"pip is not installed in ftq's environment ({sys.prefix}), so ftq install/uninstall cannot run it. "
            f"Add it with `{sys.executable} -m ensurepip`, or use your environment's installer directly "
            f"(e.g. `uv pip install --python {sys.executable} PACKAGE`) and pin torch yourself."
        )


def _torch_pin() -> str:
    try:
        return f"torch=={importlib.metadata.version('torch')}"
    except importlib.metadata.PackageNotFoundError:
        raise UsageError(
            "torch is not installed in this environment, so ftq install cannot pin it. Install torch first, "
            "pinned (e.g. `python -m pip install torch==2.13.0`), then retry."
        ) from None


def pip_install_args(packages: Sequence[str], options: PipOptions, constraints_file: str) -> list[str]:
    """The ``python -m pip install`` command line for ``packages``."""
    args = [sys.executable, "-m", "pip", "install", "--constraint", constraints_file]
    flags = {
        "--upgrade": options.upgrade,
        "--force-reinstall": options.force_reinstall,
        "--no-deps": options.no_deps,
        "--no-build-isolation": options.no_build_isolation,
        "--pre": options.pre,
        "--quiet": options.quiet,
    }
    args += [flag for flag, on in flags.items() if on]
    for path in options.editable:
        args += ["--editable", path]
    return args + list(packages)


def installed_plugin_entry_points() -> set[tuple[str, str, str]]:
    """``(entry point, distribution, version)`` of every installed ftq plugin (nothing is imported)."""
    importlib.invalidate_caches()
    found = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist
        found.add((ep.name, dist.name if dist else "", dist.version if dist else ""))
    return found


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run a command (the one place that starts processes, so tests can watch it)."""
    return subprocess.run(args, **kwargs)  # noqa: S603 - args are built here, never a shell string


def _plugins_in_fresh_process() -> list[dict[str, Any]]:
    """``ftq plugins --json --all`` as a new process sees it, with every plugin allowed."""
    env = {k: v for k, v in os.environ.items() if k not in ("FTQ_LOAD_PLUGINS", "FTQ_DISABLE_PLUGINS")}
    done = _run(
        [sys.executable, "-m", "ftq_core.cli", "plugins", "--json", "--all"],
        env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise InstallError(f"the install finished, but listing plugins afterwards failed:\n{done.stderr.strip()}")
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise InstallError(
            f"the install finished, but `ftq plugins --json` printed something that is not JSON "
            f"({done.stdout.strip()[:120]!r}); run `ftq plugins` to see what is loaded"
        ) from None


def install(packages: Sequence[str], options: PipOptions = PipOptions()) -> InstallResult:
    """``pip install`` ``packages`` (names, paths, URLs) into this environment, torch pinned.

    pip's own output goes to the terminal.  Returns the plugins that are new or
    changed afterwards.
    """
    if not packages and not options.editable:
        raise UsageError("name at least one package or path to install, e.g. `ftq install ftq-weight-only`")
    _refuse([*packages, *options.editable], PROTECTED, "install")
    _check_pip()
    before = installed_plugin_entry_points()
    with tempfile.TemporaryDirectory(prefix="ftq-install-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(_torch_pin() + "\n")
        args = pip_install_args(packages, options, str(constraints))
        done = _run(args)
    if done.returncode != 0:
        raise InstallError(
            f"pip install failed (exit code {done.returncode}); its messages are above. If pip reported a conflict "
            f"on torch: the package needs a different torch than the installed one ({_torch_pin()}), and ftq "
            f"install never changes torch."
        )
    new = installed_plugin_entry_points() - before
    changed_names = {name for name, _, _ in new}
    plugins = [p for p in _plugins_in_fresh_process() if p["source"] == "entry point" and p["name"] in changed_names]
    return InstallResult(args, plugins)


def uninstall(packages: Sequence[str], *, yes: bool = False) -> list[tuple[str, str, str]]:
    """``pip uninstall`` ``packages``; returns the ``(entry point, distribution, version)`` plugins removed."""
    if not packages:
        raise UsageError("name at least one package to uninstall, e.g. `ftq uninstall ftq-weight-only`")
    _refuse(packages, NOT_UNINSTALLABLE, "uninstall")
    _check_pip()
    before = installed_plugin_entry_points()
    args = [sys.executable, "-m", "pip", "uninstall", *(["--yes"] if yes else []), *packages]
    done = _run(args)
    if done.returncode != 0:
        raise InstallError(f"pip uninstall failed (exit code {done.returncode}); its messages are above.")
    return sorted(before - _entry_points_in_fresh_process())


#: Prints the ``ftq`` entry points as JSON: ``[[name, distribution, version], ...]``.
_LIST_ENTRY_POINTS = (
    "import json, importlib.metadata as m; print(json.dumps([[e.name, e.dist.name if e.dist else '', "
    f"e.dist.version if e.dist else ''] for e in m.entry_points(group={ENTRY_POINT_GROUP!r})]))"
)


def _entry_points_in_fresh_process() -> set[tuple[str, str, str]]:
    """:func:`installed_plugin_entry_points` as a new process sees them.

    This process keeps the ``sys.path`` entries an editable install's ``.pth``
    file gave it at start-up, so it still finds an uninstalled editable
    plugin's metadata in the project's source tree.
    """
    done = _run([sys.executable, "-c", _LIST_ENTRY_POINTS], capture_output=True, text=True)
    try:
        return {tuple(item) for item in json.loads(done.stdout)}
    except (TypeError, ValueError):
        return installed_plugin_entry_points()
