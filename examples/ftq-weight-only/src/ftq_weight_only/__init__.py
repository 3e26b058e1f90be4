"""ftq-weight-only: an ftq plugin for int8 weight-only quantization.

Registers the ``int8-weight-only`` quantizer and the codec that saves and
rebuilds its layers.  This module is the entry point (group ``ftq``); it
imports no torch, so ``ftq --help`` and ``ftq plugins`` stay fast.
"""

from __future__ import annotations

from ftq_core.api import hookimpl

from .codec import Int8WeightOnlyLinearCodec
from .config import ComputeDType, Int8WeightOnlyConfig

__all__ = ["FTQ_API_VERSION", "ComputeDType", "Int8WeightOnlyConfig", "register_quantizers", "register_module_codecs"]

#: The ftq plugin API this plugin was written for (ftq_core.hookspecs.API_VERSION).
FTQ_API_VERSION = 1


@hookimpl
def register_quantizers(register):
    from .quantizer import Int8WeightOnlyQuantizer

    register(
        "int8-weight-only",
        Int8WeightOnlyQuantizer,
        Int8WeightOnlyConfig,
        description="int8 per-channel weights, float activations (fused int8 kernel for decoding)",
    )


@hookimpl
def register_module_codecs(register):
    register(Int8WeightOnlyLinearCodec())
