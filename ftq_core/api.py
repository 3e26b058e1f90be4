"""Everything a plugin author needs from ftq, in one import: ``from ftq_core import api``.

Hooks and protocols (what to register and what to return), config checks and
the errors to raise, layer helpers, data helpers, the quantizer base class and
ftq's int8 numerics.  Nothing here imports torch until it is used, so a
plugin importing this at module level keeps ``ftq --help`` fast.  Names not
listed in ``__all__`` (and every ``ftq_core`` or ``ftq_plugins`` module not
re-exported here) are internal and may change.

Which error to raise: :class:`ConfigError` (through :func:`check`) for bad
options; :class:`DatasetError` for data that cannot be read or is too small;
:class:`ArtifactError` for a saved file that cannot be restored (codecs);
:class:`TrainingError` for a run that cannot continue (divergence);
:class:`UsageError` for anything else the user can fix.  Every other
exception is treated as a bug in the plugin and reported with its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .configs import check, describe_fields
from .data import splits_from_texts
from .errors import ArtifactError, ConfigError, DatasetError, FtqError, TrainingError, UsageError
from .hookspecs import hookimpl
from .layers import (
    as_linear,
    is_linear_like,
    iter_linear_layers,
    linear_like_types,
    linear_weight,
    matches_any,
    set_submodule,
    tied_parameter_names,
)
from .protocols import (
    Adapter,
    DatasetBuilder,
    DataSplits,
    Exporter,
    LayerReport,
    ModuleCodec,
    Quantizer,
    QuantizerBase,
    QuantPhase,
    Trainer,
    TrainResult,
)
from .tensor_io import adopt_saved_tensors

__all__ = [
    # hooks and what registered components return
    "hookimpl",
    "DatasetBuilder",
    "DataSplits",
    "Trainer",
    "TrainResult",
    "Quantizer",
    "QuantizerBase",
    "QuantPhase",
    "LayerReport",
    "ModuleCodec",
    "Exporter",
    "Adapter",
    # options
    "check",
    "describe_fields",
    # errors
    "FtqError",
    "UsageError",
    "ConfigError",
    "DatasetError",
    "ArtifactError",
    "TrainingError",
    # layers
    "iter_linear_layers",
    "linear_like_types",
    "is_linear_like",
    "linear_weight",
    "as_linear",
    "matches_any",
    "set_submodule",
    "tied_parameter_names",
    # data and artifacts
    "splits_from_texts",
    "adopt_saved_tensors",
    # ftq's symmetric int8 numerics (import torch when first used)
    "INT8_MAX",
    "quantize_per_channel_symmetric",
    "quantize_per_token_symmetric",
]

if TYPE_CHECKING:  # pragma: no cover - loaded by __getattr__ below
    from ftq_plugins.int8.numerics import INT8_MAX, quantize_per_channel_symmetric, quantize_per_token_symmetric

_INT8_NUMERICS = {"INT8_MAX", "quantize_per_channel_symmetric", "quantize_per_token_symmetric"}


def __getattr__(name: str) -> Any:
    # The int8 rules live with the int8 kernels (ftq_plugins.int8.numerics), which import torch.
    if name in _INT8_NUMERICS:
        from ftq_plugins.int8 import numerics

        return getattr(numerics, name)
    raise AttributeError(f"module 'ftq_core.api' has no attribute {name!r}")
