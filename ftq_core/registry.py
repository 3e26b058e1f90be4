"""Tables of named components that plugins register."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .configs import build_config
from .errors import ConfigError, PluginError, UnknownComponentError

__all__ = ["COMPONENT_KINDS", "Component", "ComponentTable"]

#: The kinds of component, in pipeline order, with the hook that registers each.
COMPONENT_KINDS = {
    "dataset": "register_datasets",
    "trainer": "register_trainers",
    "quantizer": "register_quantizers",
    "adapter": "register_adapters",
    "exporter": "register_exporters",
}


@dataclass(frozen=True)
class Component:
    """One registered component: ``factory(config)`` builds it."""

    kind: str
    name: str
    factory: Callable[[Any], Any]
    config_class: type
    plugin: str
    description: str = ""

    def make_config(self, options: Mapping[str, Any] | None = None) -> Any:
        """Validate ``options`` against this component's config class."""
        return build_config(self.config_class, options or {}, where=f"{self.kind} {self.name!r} options")

    def create(self, config: Any = None) -> Any:
        """Build the component from a config instance (defaults if ``None``)."""
        if config is None:
            config = self.make_config()
        elif isinstance(config, Mapping):
            config = self.make_config(config)
        elif not isinstance(config, self.config_class):
            raise ConfigError(
                f"{self.kind} {self.name!r} takes a {self.config_class.__name__}, "
                f"got {type(config).__name__}"
            )
        return self.factory(config)


class ComponentTable:
    """Components of one kind, by name; duplicates are refused."""

    def __init__(self, kind: str):
        self.kind = kind
        self._by_name: dict[str, Component] = {}

    def add(self, component: Component) -> None:
        if not isinstance(component.name, str) or not component.name:
            raise PluginError(f"plugin {component.plugin!r} registered a {self.kind} without a name")
        if not (isinstance(component.config_class, type) and dataclasses.is_dataclass(component.config_class)):
            raise PluginError(
                f"plugin {component.plugin!r}: {self.kind} {component.name!r} needs a dataclass "
                f"config class, got {component.config_class!r}"
            )
        if not callable(component.factory):
            raise PluginError(f"plugin {component.plugin!r}: {self.kind} {component.name!r} factory is not callable")
        existing = self._by_name.get(component.name)
        if existing is not None:
            raise PluginError(
                f"plugin {component.plugin!r} registered {self.kind} {component.name!r}, which plugin "
                f"{existing.plugin!r} already registered; the second registration was skipped"
            )
        self._by_name[component.name] = component

    def get(self, name: str) -> Component:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownComponentError(self.kind, name, list(self._by_name)) from None

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self):
        return iter(sorted(self._by_name.values(), key=lambda c: c.name))

    def __contains__(self, name: object) -> bool:
        return name in self._by_name
