"""Finding, loading and isolating plugins.

Built-in plugins are registered by module path; third-party ones come from the
``ftq`` entry-point group.  A plugin that fails to import, implements a hook
with a wrong signature, registers a duplicate name or raises inside a hook is
recorded with its error and skipped: every other plugin keeps working.

Environment switches (read when a :class:`Plugins` is built):

* ``FTQ_LOAD_PLUGINS`` -- unset: load every installed third-party plugin;
  empty: load none; ``a,b``: load only those (entry-point or distribution names).
* ``FTQ_DISABLE_PLUGINS`` -- ``a,b``: never load these, built-ins included.
* ``FTQ_PLUGIN_TIMEOUT`` -- seconds a start-up hook call may take (default 10;
  a plugin's import gets three times that).  A plugin past it is reported as
  slow and skipped.

Plugin code that runs while ftq starts (imports and ``register_*`` hooks) runs
in a worker thread: whatever it raises -- ``SystemExit`` from ``sys.exit``, a
``KeyboardInterrupt`` of its own, any ``BaseException`` -- and however long it
hangs, the command goes on without it.  A real Ctrl-C reaches the main thread
and stops ftq as usual.

A plugin's code runs only if it is installed (an entry point of an installed
distribution, or a built-in) and not disabled.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata
import os
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pluggy

from . import hookspecs
from .errors import FtqError, PluginError, UsageError
from .registry import COMPONENT_KINDS, Component, ComponentTable

__all__ = [
    "BUILTIN_NAMES",
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "Plugins",
    "get_plugins",
    "reset_plugins",
]

ENTRY_POINT_GROUP = "ftq"

#: Built-in plugins: the name users type (``--disable-plugin``,
#: ``FTQ_DISABLE_PLUGINS``) and the module that implements it.  The names are
#: part of ftq's interface and stay when modules move.
BUILTIN_PLUGINS = {
    "text_dataset": "ftq_plugins.datasets.text",
    "chat_dataset": "ftq_plugins.datasets.chat",
    "causal_lm_trainer": "ftq_plugins.trainers.causal_lm",
    "dynamic_quantizer": "ftq_plugins.quantizers.dynamic",
    "qat_int8": "ftq_plugins.quantizers.qat_int8",
    "module_codecs": "ftq_plugins.codecs.dynamic_linear",
    "static_quantizer": "ftq_plugins.quantizers.static",
    "qat_quantizer": "ftq_plugins.quantizers.qat",
    "static_codecs": "ftq_plugins.codecs.static_linear",
    "embedding_codecs": "ftq_plugins.codecs.embedding",
    "rotated_norm_codecs": "ftq_plugins.codecs.rotated_norm",
    "hf_exporter": "ftq_plugins.exporters.hf",
    "gguf_exporter": "ftq_plugins.exporters.gguf_file",
    "lora_adapter": "ftq_plugins.adapters.lora",
}

#: Component names and codec kinds the built-in plugins register.  They stay
#: reserved while a built-in is disabled, so a third-party plugin can never
#: take one over (its artifacts would be saved under the built-in's name).
BUILTIN_NAMES = {
    "dataset": frozenset({"text", "chat"}),
    "trainer": frozenset({"causal-lm"}),
    "quantizer": frozenset({"dynamic", "static", "qat", "qat-int8"}),
    "exporter": frozenset({"hf", "gguf"}),
    "adapter": frozenset({"lora"}),
    "codec": frozenset({
        "ftq.int8_dynamic_linear", "torch.ao.dynamic_linear", "ftq.int8_linear", "ftq.quant_boundary",
        "ftq.int8_embedding", "ftq.rotated_rmsnorm",
    }),
}

#: Default seconds for one start-up hook call (``FTQ_PLUGIN_TIMEOUT``).
DEFAULT_HOOK_TIMEOUT = 10.0


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
    warnings: list[str] = field(default_factory=list)
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
        if self.errors:
            return "loaded with errors"
        return "loaded with warnings" if self.warnings else "loaded"

    @property
    def built_in(self) -> bool:
        return self.source == "built-in"

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
    if isinstance(exc, SystemExit):
        return f"SystemExit: it called sys.exit({exc.code!r}){where}"
    return f"{type(exc).__name__}: {exc}{where}"


def hook_timeout() -> float:
    """Seconds one start-up hook call may take: ``FTQ_PLUGIN_TIMEOUT``, else 10."""
    raw = os.environ.get("FTQ_PLUGIN_TIMEOUT", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_HOOK_TIMEOUT
    except ValueError:
        raise UsageError(f"FTQ_PLUGIN_TIMEOUT={raw!r} is not a number of seconds; set it to e.g. 10") from None
    return value if value > 0 else DEFAULT_HOOK_TIMEOUT


class _Outcome:
    """What a guarded call gave: ``value``, or ``error`` (text for the plugin's info)."""

    def __init__(self) -> None:
        self.value: Any = None
        self.error: str | None = None


def _guarded_call(func: Callable[[], Any], *, timeout: float) -> _Outcome:
    """Run plugin code in a daemon thread, so nothing it raises or how long it hangs can stop ftq.

    Any ``BaseException`` is caught there (``sys.exit`` and a plugin's own
    ``KeyboardInterrupt`` included); a real Ctrl-C is delivered to the main
    thread, which is waiting in ``join``, and propagates.  A call still running
    after ``timeout`` seconds is abandoned (the daemon thread dies with the process).
    """
    outcome = _Outcome()

    def target() -> None:
        try:
            outcome.value = func()
        except BaseException as exc:  # noqa: B036 - plugin code must never end the command
            outcome.error = _short_error(exc)

    worker = threading.Thread(target=target, name="ftq-plugin-call", daemon=True)
    # What plugin code prints at start-up goes to stderr: ftq's stdout carries
    # results other programs read (``ftq plugins --json``, generated text).
    with contextlib.redirect_stdout(sys.stderr):
        worker.start()
        worker.join(timeout)
    if worker.is_alive():
        outcome.error = (
            f"did not finish within {timeout:g} s, so it was skipped (slow or hanging plugin; raise "
            f"FTQ_PLUGIN_TIMEOUT if it is only slow)"
        )
    return outcome


class Plugins:
    """A plugin manager with its component tables.

    Build a fresh one in tests (``Plugins(builtins=(), load_entrypoints=False)``)
    and :meth:`register` fake plugins on it; the process-wide one comes from
    :func:`get_plugins`.
    """

    def __init__(
        self,
        *,
        builtins: Iterable[str] = tuple(BUILTIN_PLUGINS),
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
        self.timeout = hook_timeout()
        self._codec_owners: dict[str, str] = {}
        for builtin in builtins:
            self._load_builtin(builtin)
        if load_entrypoints:
            self._load_entrypoints()

    # -- loading -----------------------------------------------------------
    def _load_builtin(self, builtin: str) -> None:
        """Load a built-in by its name in :data:`BUILTIN_PLUGINS` (or a module path, named by its last part)."""
        if builtin in BUILTIN_PLUGINS:
            name, module_name = builtin, BUILTIN_PLUGINS[builtin]
        else:
            name, module_name = builtin.rsplit(".", 1)[-1], builtin
        info = PluginInfo(name=name, source="built-in", module=module_name, distribution="ftq")
        info.version = _distribution_version("ftq")
        if name in self.disabled:
            info.disabled = True
            self.infos[name] = info
            return
        # a broken built-in is a bug, but the CLI must still start
        outcome = _guarded_call(lambda: importlib.import_module(module_name), timeout=3 * self.timeout)
        if outcome.error:
            info.errors.append(outcome.error)
            self.infos[name] = info
            return
        self.register(outcome.value, name=name, info=info)

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
        outcome = _guarded_call(ep.load, timeout=3 * self.timeout)
        if outcome.error:
            info.errors.append(
                f"failed to import {ep.value}: {outcome.error}. Reinstall or upgrade "
                f"{dist_name or ep.name}, or turn it off with --disable-plugin {ep.name}"
            )
            self.infos[ep.name] = info
            return
        self.register(outcome.value, name=ep.name, info=info)

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
        info.warnings.extend(_undecorated_hooks(plugin, info.hooks))
        if not info.hooks:
            info.warnings.append(
                "implements no ftq hook, so it adds nothing; decorate its register_* functions with @hookimpl "
                "(from ftq_core.api import hookimpl)"
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
            outcome = _guarded_call(
                lambda impl=impl, staged=staged: impl.function(**{arg: value(staged) for arg in impl.argnames}),
                timeout=self.timeout,
            )
            if outcome.error:
                if info is not None:
                    info.errors.append(f"{hook_name} failed: {outcome.error}")
                    info.loaded = bool(info.components)
                continue
            for item in list(staged):
                on_item(item, impl.plugin_name)

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
                problem = self._reserved_problem(plugin_name, kind, name)
                if problem:
                    self.infos[plugin_name].errors.append(problem)
                    return
                try:
                    tables[kind].add(component)
                except PluginError as exc:
                    self.infos[plugin_name].errors.append(str(exc))
                    return
                self.infos[plugin_name].components.setdefault(kind, []).append(name)
                self.infos[plugin_name].descriptions.setdefault(kind, {})[name] = str(description)

            self._call_each(hook_name, make_register, add)
        return tables

    def _reserved_problem(self, plugin_name: str, kind: str, name: Any) -> str:
        """Why a third-party plugin may not register ``name``: it is a built-in's (``""`` if it may)."""
        info = self.infos.get(plugin_name)
        if info is None or info.built_in or name not in BUILTIN_NAMES.get(kind, ()):
            return ""
        what = "module codec" if kind == "codec" else kind
        return (
            f"{what} name {name!r} is reserved for ftq's built-in plugins (even while one is disabled); this "
            f"registration was skipped. Rename the plugin's {what}"
        )

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
                reserved = self._reserved_problem(plugin_name, "codec", kind)
                if reserved:
                    self.infos[plugin_name].errors.append(reserved)
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
            self._codec_owners = owners
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
            outcome = _guarded_call(lambda impl=impl: impl.function(**{arg: cli for arg in impl.argnames}), timeout=self.timeout)
            if outcome.error:
                cli.commands.clear()
                cli.commands.update(before)  # no half-added commands
                if info is not None:
                    info.errors.append(f"register_commands failed: {outcome.error}")
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

    def describe(self, cli: Any = None) -> list[PluginInfo]:
        """Plugin infos with their components, codecs and commands filled in.

        ``cli`` is the real command group, so that a plugin command named like
        a built-in one is reported as the clash it is.
        """
        self.table("dataset")
        self.codecs()
        if self.pm.hook.register_commands.get_hookimpls():
            import click

            scratch = click.Group("ftq")  # only to learn the names; the real group is left as it is
            scratch.commands.update(getattr(cli, "commands", {}))
            self.add_commands(scratch)
        return list(self.infos.values())

    # -- who made what: for reports, manifests and error messages ---------------
    def provenance(self, plugin_name: str) -> dict[str, str]:
        """``{"plugin", "distribution", "version", "source"}`` of a loaded plugin."""
        info = self.infos.get(plugin_name) or PluginInfo(name=plugin_name, source="registered")
        return {"plugin": info.name, "distribution": info.distribution, "version": info.version, "source": info.source}

    def codec_provenance(self, kind: str) -> dict[str, str]:
        """:meth:`provenance` of the plugin that registered module codec ``kind``."""
        self.codecs()
        return self.provenance(self._codec_owners.get(kind, ""))

    @contextlib.contextmanager
    def guard(self, plugin_name: str, step: str) -> Iterator[None]:
        """Turn a crash inside a third-party plugin's ``step`` into one line naming the plugin.

        ftq's own errors pass through, and so does anything a built-in raises
        (a bug in ftq keeps its traceback); ``--debug`` shows the plugin's.
        """
        try:
            yield
        except FtqError:
            raise
        except Exception as exc:
            info = self.infos.get(plugin_name)
            if info is None or info.built_in:
                raise
            made_by = f"{info.distribution} {info.version}".strip() if info.distribution else "an unknown package"
            raise PluginError(
                f"plugin {info.name!r} ({made_by}) failed in {step}: {type(exc).__name__}: {exc}. This is a bug "
                f"in the plugin: report it to its authors, upgrade it, or run without it (--disable-plugin "
                f"{info.name}); ftq --debug shows its traceback."
            ) from exc


def _undecorated_hooks(plugin: Any, implemented: list[str]) -> list[str]:
    """Warnings for functions named like a hook that pluggy does not see (no ``@hookimpl``)."""
    specs = [name for name in dir(hookspecs) if name.startswith("register_")]
    marker = f"{hookspecs.PROJECT_NAME}_impl"
    return [
        f"defines {name}() without @hookimpl, so ftq never calls it; decorate it with @hookimpl "
        f"(from ftq_core.api import hookimpl)"
        for name in specs
        if name not in implemented and callable(getattr(plugin, name, None))
        and not hasattr(getattr(plugin, name), marker)
    ]


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
