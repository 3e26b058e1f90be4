"""ftq: fine-tune and quantize large language models in PyTorch, through plugins.

The Python API comes first; the ``ftq`` command line is a thin layer over it::

    import ftq_core
    result = ftq_core.run({"trainer": {"max_steps": 10}})
    print(result.table())
    artifact = ftq_core.load("ftq-out/model")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "run",
    "quantize",
    "load",
    "calibrate",
    "evaluate_artifact",
    "export",
    "RunConfig",
    "ComponentChoice",
    "EvalSettings",
    "RunResult",
    "FtqError",
    "ConfigError",
    "hookimpl",
    "get_plugins",
]

from .errors import ConfigError, FtqError
from .hookspecs import hookimpl

_LAZY = {
    "run": "pipeline",
    "quantize": "pipeline",
    "load": "pipeline",
    "calibrate": "pipeline",
    "evaluate_artifact": "pipeline",
    "export": "pipeline",
    "RunResult": "stages",
    "RunConfig": "run_config",
    "ComponentChoice": "run_config",
    "EvalSettings": "evaluation",
    "get_plugins": "plugins",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import ftq_core` (and `ftq --help`) does not import torch.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ftq_core' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)


if TYPE_CHECKING:  # pragma: no cover
    from .evaluation import EvalSettings
    from .pipeline import calibrate, evaluate_artifact, export, load, quantize, run
    from .plugins import get_plugins
    from .run_config import ComponentChoice, RunConfig
    from .stages import RunResult
