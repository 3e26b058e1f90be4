"""The hook specifications every ftq plugin implements.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`
whose names match the specs below.  Discovery hooks take a ``register``
callback: the core keeps the table, rejects duplicate names and lists the known
names when a user asks for an unknown one.  An implementation may accept fewer
arguments than the spec names (pluggy passes only those it asks for), which is
how the specs grow without breaking plugins.

The component protocols the registered factories must return live in
:mod:`ftq_core.protocols`.
"""

from __future__ import annotations

import pluggy

__all__ = ["PROJECT_NAME", "API_VERSION", "hookspec", "hookimpl"]

PROJECT_NAME = "ftq"

#: Version of the plugin API described in this module.  A plugin may declare the
#: version it was written for as a module attribute ``FTQ_API_VERSION``; a
#: plugin asking for a newer major version than this is refused with a message.
API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_datasets(register):
    """Register dataset components.

    Called once, when the plugin manager builds its component tables (the first
    time a component is looked up, or when ``ftq plugins`` lists them).

    :param register: ``register(name, factory, config_class, description="")``.
        ``name`` is what users type (``--dataset NAME``); ``config_class`` is a
        frozen dataclass whose fields are the component's options, validated in
        its ``__post_init__``; ``factory(config)`` returns an object following
        :class:`ftq_core.protocols.DatasetBuilder`.  Registering a name twice is
        an error reported against the second plugin.
    :return: nothing; results are ignored.
    """


@hookspec
def register_trainers(register):
    """Register trainer components.

    Called like :func:`register_datasets`.

    :param register: ``register(name, factory, config_class, description="")``
        where ``factory(config)`` returns a :class:`ftq_core.protocols.Trainer`.
    :return: nothing; results are ignored.
    """


@hookspec
def register_quantizers(register):
    """Register quantizer components.

    Called like :func:`register_datasets`.  The pipeline, not the quantizer,
    decides the order of phases from what the quantizer declares
    (:class:`ftq_core.protocols.Quantizer`).

    :param register: ``register(name, factory, config_class, description="")``
        where ``factory(config)`` returns a :class:`ftq_core.protocols.Quantizer`.
    :return: nothing; results are ignored.
    """


@hookspec
def register_exporters(register):
    """Register exporter components: writers of an artifact in a format other runtimes read.

    Called like :func:`register_datasets`.  ``ftq export ART --format NAME``
    and :func:`ftq_core.export` look the exporter up by name.

    :param register: ``register(name, factory, config_class, description="")``
        where ``factory(config)`` returns a :class:`ftq_core.protocols.Exporter`.
    :return: nothing; results are ignored.
    """


@hookspec
def register_adapters(register):
    """Register adapter components: small trainable layers over a frozen (quantized) model.

    Called like :func:`register_datasets`.  ``ftq run --adapter NAME``
    quantizes first, then trains only the adapter over the int8 model; the
    artifact keeps the adapter's files beside the base, and loading an
    artifact attaches it again through the same component.

    :param register: ``register(name, factory, config_class, description="")``
        where ``factory(config)`` returns a :class:`ftq_core.protocols.Adapter`.
    :return: nothing; results are ignored.
    """


@hookspec
def register_module_codecs(register):
    """Register how quantized module types are saved and rebuilt.

    Called when an artifact is saved or loaded.  Artifacts hold only tensors
    (safetensors) and JSON; a module whose state is not plain tensors (packed
    int8 weights, say) is written through its codec and rebuilt by it, so
    nothing is ever unpickled.  Only codecs of loaded plugins can rebuild a
    layer: an artifact cannot name code to run.

    :param register: ``register(codec)`` with a
        :class:`ftq_core.protocols.ModuleCodec`.  Kinds must be unique.
    :return: nothing; results are ignored.
    """


@hookspec
def register_commands(cli):
    """Add subcommands to the ``ftq`` command line.

    Called when the command a user asks for is not a built-in one (so
    ``ftq --help`` and ``ftq run`` never import plugin code), and by
    ``ftq plugins`` to list each plugin's commands.

    :param cli: the root :class:`click.Group`; add commands with
        ``@cli.command()``.  A command may not replace an existing one (a
        built-in or another plugin's): the original is kept and the clash
        reported.  A plugin whose hook raises is reported by ``ftq plugins``
        and the CLI carries on without its commands.
    :return: nothing; results are ignored.
    """
