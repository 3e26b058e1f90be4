"""Finding, loading and isolating plugins.

Built-in plugins are registered by module path; third-party ones come from the
``ftq`` entry-point group.  A plugin that fails to import, implements a hook
with a wrong signature, registers a duplicate name or raises inside a hook is
recorded with its error and skipped: every other plugin keeps working.

Environment switches (read when a :class:`Plugins` is built):

* ``FTQ_LOAD_PLUGINS`` -- unset: load every installed third-party plugin;
  empty: load none; ``a,b``: load only those (entry-point or distribution names).
* ``FTQ_DISABLE_PLUGINS`` -- ``a,b``: never load these, built-ins included.

A plugin's code runs only if it is installed (an entry point of an installed
distribution, or a built-in) and not disabled.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .errors import PluginError
from .registry import COMPONENT_KINDS, Component, ComponentTable

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "Plugins",
    "get_plugins",
    "reset_plugins",
]

ENTRY_POINT_GROUP = "ftq"

#: Built-in plugin modules, registered under their last dotted name.
BUILTIN_PLUGINS = (
    "ftq_plugins.text_dataset",
    "ftq_plugins.causal_lm_trainer",
    "ftq_plugins.dynamic_quantizer",
    "ftq_plugins.qat_int8",
    "ftq_plugins.module_codecs",
    "ftq_plugins.static_quantizer",
    "ftq_plugins.qat_quantizer",
    "ftq_plugins.static_codecs",
    "ftq_plugins.embedding_codecs",
)


@dataclass
class PluginInfo:
    """What ``ftq plugins`` shows about one plugin."""

    name: str
    source: str  # "built-in" or "entry point"
    module: str = ""
    location: str = ""
    distribution: str = ""
    version: str = ""
    hooks: list[str] = field(default_factory=list)
    components: dict[str, list[str]] = field(default_factory=dict)
    descriptions: dict[str, dict[str, str]] = field(default_factory=dict)
    codecs: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    api_version: Any = None
    errors: list[str] = field(default_factory=list)
    loaded: bool = False
    disabled: bool = False

    @property
    def kind(self) -> str:
        kinds = [k for k in COMPONENT_KINDS if self.components.get(k)]
        return "+".join(kinds) if kinds else "other"

    @property
    def status(self) -> str:
        """``disabled``, ``failed`` (not loaded), ``loaded with errors`` or ``loaded``."""
        if self.disabled:
            return "disabled"
        if not self.loaded:
            return "failed"
        return "loaded with errors" if self.errors else "loaded"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (what ``ftq plugins --json`` prints), ``kind`` included."""
        from dataclasses import asdict

        return asdict(self) | {"kind": self.kind, "status": self.status}


def _split_env(name: str) -> list[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return [part.strip() for part in raw.split(",") if part.strip()]


def _short_error(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {frame[0].filename}:{frame[0].lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Plugins:
    """A plugin manager with its component tables.

    Build a fresh one in tests (``Plugins(builtins=(), load_entrypoints=False)``)
    and :meth:`register` fake plugins on it; the process-wide one comes from
    :func:`get_plugins`.
    """

    def __init__(
        self,
        *,
        builtins: Iterable[str] = BUILTIN_PLUGINS,
        load_entrypoints: bool = True,
        allow: Iterable[str] | None = None,
        disabled: Iterable[str] = (),
    ):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self._tables: dict[str, ComponentTable] | None = None
        self._codecs: dict[str, Any] | None = None
        env_allow = _split_env("FTQ_LOAD_PLUGINS")
        self.allow = list(allow) if allow is not None else env_allow
        self.disabled = set(disabled) | set(_split_env("FTQ_DISABLE_PLUGINS") or [])
        for module_name in builtins:
            self._load_builtin(module_name)
        if load_entrypoints:
            self._load_entrypoints()

    # -- loading -----------------------------------------------------------
    def _load_builtin(self, module_name: str) -> None:
        name = module_name.rsplit(".", 1)[-1]
        info = PluginInfo(name=name, source="built-in", module=module_name, distribution="ftq")
        info.version = _distribution_version("ftq")
        if name in self.disabled:
            info.disabled = True
            self.infos[name] = info
            return
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # a broken built-in is a bug, but the CLI must still start
            info.errors.append(_short_error(exc))
            self.infos[name] = info
            return
        self.register(module, name=name, info=info)

    def _load_entrypoints(self) -> None:
        if self.allow is not None and not self.allow:
            return  # FTQ_LOAD_PLUGINS="" turns third-party autoload off
        matched: set[str] = set()
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist_name = ep.dist.name if ep.dist is not None else ""
            if self.allow is not None and ep.name not in self.allow and dist_name not in self.allow:
                continue
            matched.update((ep.name, dist_name))
            self._load_entrypoint(ep, dist_name)
        for name in sorted(set(self.allow or ()) - matched):
            self.infos[name] = PluginInfo(
                name=name,
                source="FTQ_LOAD_PLUGINS",
                errors=[
                    f"FTQ_LOAD_PLUGINS names {name!r}, but no installed package has an {ENTRY_POINT_GROUP!r} entry "
                    f"point or distribution of that name; check the spelling (`ftq plugins --all` lists names) or "
                    f"install it with `ftq install`"
                ],
            )

    def _load_entrypoint(self, ep: importlib.metadata.EntryPoint, dist_name: str) -> None:
        """Load one entry point; every failure is recorded on its PluginInfo, never raised."""
        info = PluginInfo(
            name=ep.name,
            source="entry point",
            module=ep.value,
            distribution=dist_name,
            version=ep.dist.version if ep.dist is not None else "",
        )
        if ep.name in self.disabled or dist_name in self.disabled:
            info.disabled = True
            self.infos[ep.name] = info
            return
        if ep.name in self.infos:
            other = self.infos[ep.name].distribution or self.infos[ep.name].source
            info.errors.append(
                f"a plugin named {ep.name!r} (from {other}) is already loaded; this one was skipped. "
                f"Uninstall one of the two packages"
            )
            self.infos[f"{ep.name} ({dist_name})"] = info
            return
        try:
            plugin = ep.load()
        except Exception as exc:
            info.errors.append(
                f"failed to import {ep.value}: {_short_error(exc)}. Reinstall or upgrade "
                f"{dist_name or ep.name}, or turn it off with --disable-plugin {ep.name}"
            )
            self.infos[ep.name] = info
            return
        self.register(plugin, name=ep.name, info=info)

    def register(self, plugin: Any, *, name: str, info: PluginInfo | None = None) -> PluginInfo:
        """Register a plugin object (module or instance); errors are recorded, not raised."""
        info = info or PluginInfo(name=name, source="registered", module=getattr(plugin, "__name__", repr(plugin)))
        info.location = getattr(plugin, "__file__", "") or info.location
        self.infos[name] = info
        info.api_version = getattr(plugin, "FTQ_API_VERSION", None)
        problem = _api_version_problem(plugin, info.distribution or name)
        if problem:
            info.errors.append(problem)
            return info
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            info.errors.append(_hook_problem(exc))
            return info
        except ValueError as exc:  # pluggy: name or object already registered
            info.errors.append(str(exc))
            return info
        info.loaded = True
        info.hooks = sorted(
            hook_name
            for hook_name in dir(self.pm.hook)
            if not hook_name.startswith("_")
            and any(impl.plugin_name == name for impl in getattr(self.pm.hook, hook_name).get_hookimpls())
        )
        self._tables = None
        self._codecs = None
        return info

    def unregister(self, name: str) -> None:
        """Remove a plugin registered with :meth:`register` (tests clean up with it)."""
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self.infos.pop(name, None)
        self._tables = None
        self._codecs = None

    # -- calling hooks one plugin at a time, so one failure stays local ------
    def _call_each(self, hook_name: str, value: Any, on_item) -> None:
        hook = getattr(self.pm.hook, hook_name)
        # get_hookimpls() lists implementations in registration order (pluggy calls
        # them in reverse); registration order makes the first plugin win a name.
        for impl in hook.get_hookimpls():
            info = self.infos.get(impl.plugin_name)
            staged: list[Any] = []
            try:
                impl.function(**{arg: value(staged) for arg in impl.argnames})
                for item in staged:
                    on_item(item, impl.plugin_name)
            except Exception as exc:
                if info is not None:
                    info.errors.append(f"{hook_name} failed: {_short_error(exc)}")
                    info.loaded = bool(info.components)

    def _build_tables(self) -> dict[str, ComponentTable]:
        tables = {kind: ComponentTable(kind) for kind in COMPONENT_KINDS}
        for info in self.infos.values():
            info.components = {}
            info.descriptions = {}
        for kind, hook_name in COMPONENT_KINDS.items():

            def make_register(staged: list, kind=kind):
                def register(name, factory, config_class, description=""):
                    staged.append((kind, name, factory, config_class, description))

                return register

            def add(item, plugin_name, kind=kind):
                _, name, factory, config_class, description = item
                component = Component(kind, name, factory, config_class, plugin_name, description)
                try:
                    tables[kind].add(component)
                except PluginError as exc:
                    self.infos[plugin_name].errors.append(str(exc))
                    return
                self.infos[plugin_name].components.setdefault(kind, []).append(name)
                self.infos[plugin_name].descriptions.setdefault(kind, {})[name] = str(description)

            self._call_each(hook_name, make_register, add)
        return tables

    def table(self, kind: str) -> ComponentTable:
        if self._tables is None:
            self._tables = self._build_tables()
        return self._tables[kind]

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``; unknown names list the known ones."""
        return self.table(kind).get(name)

    def codecs(self) -> dict[str, Any]:
        """Module codecs by kind."""
        if self._codecs is None:
            codecs: dict[str, Any] = {}
            owners: dict[str, str] = {}
            for info in self.infos.values():
                info.codecs = []

            def add(codec, plugin_name):
                kind = getattr(codec, "kind", None)
                if not isinstance(kind, str) or not kind or not hasattr(codec, "restore"):
                    self.infos[plugin_name].errors.append(
                        f"register_module_codecs: {codec!r} is not a module codec (needs kind, module_type, "
                        f"export and restore); skipped"
                    )
                    return
                if kind in codecs:
                    self.infos[plugin_name].errors.append(
                        f"module codec {kind!r} is already registered by plugin {owners[kind]!r}; "
                        f"the second registration was skipped"
                    )
                    return
                codecs[kind] = codec
                owners[kind] = plugin_name
                self.infos[plugin_name].codecs.append(kind)

            self._call_each("register_module_codecs", lambda staged: staged.append, add)
            self._codecs = codecs
        return self._codecs

    def codec_for(self, module: Any) -> Any | None:
        for codec in self.codecs().values():
            if type(module) is codec.module_type:
                return codec
        return None

    def add_commands(self, cli: Any) -> None:
        """Let plugins add CLI subcommands; a failing plugin is recorded and skipped.

        A plugin may add commands but not replace one that exists (a built-in
        or another plugin's): the original is put back and the clash recorded.
        """
        for impl in self.pm.hook.register_commands.get_hookimpls():  # registration order
            info = self.infos.get(impl.plugin_name)
            before = dict(cli.commands)
            try:
                impl.function(**{arg: cli for arg in impl.argnames})
            except Exception as exc:
                cli.commands.clear()
                cli.commands.update(before)  # no half-added commands
                if info is not None:
                    info.errors.append(f"register_commands failed: {_short_error(exc)}")
                continue
            added = []
            for command_name in list(cli.commands):
                if command_name in before and cli.commands[command_name] is not before[command_name]:
                    cli.commands[command_name] = before[command_name]
                    if info is not None:
                        info.errors.append(f"command {command_name!r} already exists; the plugin's version was skipped")
                elif command_name not in before:
                    added.append(command_name)
            if info is not None:
                info.commands = sorted(added)

    def unmatched_disabled(self) -> list[str]:
        """Names given to ``--disable-plugin`` / ``FTQ_DISABLE_PLUGINS`` that matched no plugin."""
        matched = set()
        for info in self.infos.values():
            if info.disabled:
                matched.update((info.name, info.distribution))
        return sorted(self.disabled - matched)

    def errors(self) -> dict[str, list[str]]:
        return {name: info.errors for name, info in self.infos.items() if info.errors}

    def describe(self) -> list[PluginInfo]:
        """Plugin infos with their components, codecs and commands filled in."""
        self.table("dataset")
        self.codecs()
        if self.pm.hook.register_commands.get_hookimpls():
            import click

            self.add_commands(click.Group("ftq"))  # a scratch group: only to learn the names
        return list(self.infos.values())


def _api_version_problem(plugin: Any, who: str) -> str:
    """Why a plugin's ``FTQ_API_VERSION`` rules it out, or ``""``."""
    wanted = getattr(plugin, "FTQ_API_VERSION", None)
    if wanted is None:
        return ""
    if isinstance(wanted, bool) or not isinstance(wanted, int):
        return f"declares FTQ_API_VERSION = {wanted!r}; it must be an integer (this ftq provides {hookspecs.API_VERSION})"
    if wanted > hookspecs.API_VERSION:
        return (
            f"was written for ftq plugin API {wanted}, and this ftq provides API {hookspecs.API_VERSION}; "
            f"upgrade ftq (`ftq install -U ftq`) or install a release of {who} made for API {hookspecs.API_VERSION}"
        )
    return ""


def _hook_problem(exc: pluggy.PluginValidationError) -> str:
    """A pluggy validation error as one sentence with the fix."""
    text = " ".join(str(exc).split())
    specs = [name for name in dir(hookspecs) if name.startswith("register_")]
    if text.startswith("unknown hook"):
        hook = text.split("'")[1] if "'" in text else ""
        near = difflib.get_close_matches(hook, specs, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        return f"implements unknown hook {hook!r}{hint}; ftq's hooks are {', '.join(specs)}"
    return f"wrong hook signature: {text}. The hook specs are in ftq_core/hookspecs.py"


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


_PLUGINS: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin manager, built on first use (never at import)."""
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = Plugins()
    return _PLUGINS


def reset_plugins(plugins: Plugins | None = None) -> None:
    """Replace (or drop, to rebuild on next use) the process-wide plugin manager."""
    global _PLUGINS
    _PLUGINS = plugins
