"""What the built-in quantizers share: the base class, torch.ao's engines and weight granularity.

transformers keeps a ``quantizers/base.py`` the same way: a base class with
no-op defaults, one module per method beside it.  A quantizer here subclasses
:class:`QuantizerBase` (the public one of :mod:`ftq_core.api`, which
third-party quantizers use too) and writes only what differs (``prepare``,
``convert``); the options several quantizers offer are in :mod:`.options`.
"""

from __future__ import annotations

import enum

from ftq_core.api import QuantizerBase

__all__ = ["Engine", "WeightGranularity", "QuantizerBase", "set_engine", "PER_TOKEN_QAT_SCHEME"]

#: What a layer trained as ftq's per-token int8 fake-quant becomes (``qat-int8``; ``qat``'s ``per_token`` layers).
PER_TOKEN_QAT_SCHEME = "int8 per-channel weight, int8 per-token dynamic activation (QAT)"


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
