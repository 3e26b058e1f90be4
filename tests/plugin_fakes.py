"""Fake plugins for tests: module objects built from source, and installed-looking distributions.

``write_distribution`` puts a ``*.dist-info`` with an ``entry_points.txt`` on a
directory; with that directory on ``sys.path``, ``importlib.metadata`` finds
it exactly as it finds a pip-installed package, so the entry-point path of
:class:`ftq_core.plugins.Plugins` runs for real.
"""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

__all__ = ["QUANTIZER_PLUGIN", "plugin_module", "write_distribution"]

#: Source of a plugin registering one quantizer, ``{name}``, with a real config class.
QUANTIZER_PLUGIN = '''
from dataclasses import dataclass, field
from ftq_core import hookimpl
from ftq_core.protocols import QuantPhase


@dataclass(frozen=True, kw_only=True)
class Config:
    keep_float: tuple[str, ...] = field(default=(), metadata={{"help": "layers kept in float"}})


class Identity:
    phase = QuantPhase.POST_TRAINING
    needs_calibration = False
    engine = None

    def __init__(self, config):
        self.config = config

    def prepare(self, model):
        return model

    def convert(self, model):
        return model

    def layer_report(self, model):
        return []


@hookimpl
def register_quantizers(register):
    register("{name}", Identity, Config, description="leaves the model as it is")
'''


def plugin_module(name: str, source: str) -> types.ModuleType:
    """A module object named ``name`` executed from ``source`` (dedented).

    It is put in ``sys.modules`` (dataclasses look their module up there),
    replacing any earlier fake of the same name.
    """
    module = types.ModuleType(name)
    module.__file__ = f"<{name}>"
    sys.modules[name] = module
    exec(compile(textwrap.dedent(source), module.__file__, "exec"), module.__dict__)
    return module


def write_distribution(
    root: Path, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> Path:
    """Write modules and a ``dist-info`` declaring ``entry_points`` (name → module) in group ``ftq``."""
    root.mkdir(parents=True, exist_ok=True)
    for module_name, source in modules.items():
        (root / f"{module_name}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = ["[ftq]", *(f"{name} = {module}" for name, module in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return root
