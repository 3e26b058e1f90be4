"""What every built-in quantizer shares: torch.ao's engines, weight granularity, and a base with the common parts.

transformers keeps a ``quantizers/base.py`` the same way: a base class with
no-op defaults, one module per method beside it.  A quantizer here subclasses
:class:`QuantizerBase` and writes only what differs (``prepare``,
``convert``); third-party quantizers get the same base from
:mod:`ftq_core.api`.
"""

from __future__ import annotations

import enum
from typing import Any

from ftq_core.protocols import LayerReport, QuantPhase

__all__ = ["Engine", "WeightGranularity", "QuantizerBase", "set_engine"]


class Engine(enum.Enum):
    """PyTorch's quantized CPU engines (``torch.backends.quantized.engine``)."""

    X86 = "x86"
    FBGEMM = "fbgemm"
    ONEDNN = "onednn"
    QNNPACK = "qnnpack"


class WeightGranularity(enum.Enum):
    PER_CHANNEL = "per-channel"
    PER_TENSOR = "per-tensor"


def set_engine(engine: str) -> None:
    """Make ``engine`` torch's global quantized engine (torch.ao packs and runs by it), or say which exist."""
    import torch

    from ftq_core.errors import UsageError

    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise UsageError(
            f"quantized engine {engine!r} is not available in this torch build; available: "
            f"{', '.join(e for e in supported if e != 'none')}. Set engine to one of those."
        )
    torch.backends.quantized.engine = engine


class QuantizerBase:
    """The :class:`~ftq_core.protocols.Quantizer` protocol with defaults: post-training, no calibration, no engine.

    ``prepare`` returns the model unchanged; ``convert`` fills ``self.reports``
    (one :class:`LayerReport` per candidate layer), which ``layer_report``
    returns.
    """

    phase = QuantPhase.POST_TRAINING
    needs_calibration = False
    engine: str | None = None

    def __init__(self, config: Any):
        self.config = config
        self.reports: list[LayerReport] = []

    def prepare(self, model):
        return model

    def convert(self, model):  # pragma: no cover - every quantizer defines it
        raise NotImplementedError

    def layer_report(self, model) -> list[LayerReport]:
        return list(self.reports)
