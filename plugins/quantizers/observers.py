"""How a calibrated quantizer turns the activations it saw into one range per tensor.

``static`` calibrates its int8 layers with these observers, and ``qat`` starts
each fake-quant range from them, so both say ``observer = histogram`` the same
way and torch.ao's engine rule (7-bit activations on x86/fbgemm) has one home.
"""

from __future__ import annotations

import enum
from dataclasses import field

from .base import Engine

__all__ = [
    "Observer", "observer_option", "ftq_activation_observer", "torch_ao_activation_observer", "torch_ao_output_observer",
    "reduces_range",
]


class Observer(enum.Enum):
    """How calibration turns the activations it saw into one range per layer."""

    MINMAX = "minmax"
    MOVING_AVERAGE = "moving-average"
    HISTOGRAM = "histogram"


def observer_option():
    return field(
        default=Observer.HISTOGRAM,
        metadata={"help": "activation range estimate from calibration (histogram: the range of least rounding "
                          "error, clipping rare peaks; minmax: the largest value seen)"},
    )


def _observer_class(observer: Observer):
    from torch.ao.quantization import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

    return {
        Observer.MINMAX: MinMaxObserver,
        Observer.MOVING_AVERAGE: MovingAverageMinMaxObserver,
        Observer.HISTOGRAM: HistogramObserver,
    }[observer]


def reduces_range(engine: Engine) -> bool:
    """Whether ``engine``'s int8 kernels need 7-bit activations (x86 and fbgemm: their u8 x s8 pair sums
    are 16-bit on CPUs without VNNI)."""
    return engine in (Engine.X86, Engine.FBGEMM)


def ftq_activation_observer(observer: Observer):
    """An observer factory for ftq's symmetric int8 activations (``static`` backend ``ftq``)."""
    import torch

    from ftq_plugins.int8.numerics import INT8_MAX

    return _observer_class(observer).with_args(
        dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-INT8_MAX, quant_max=INT8_MAX
    )


def _torch_ao_uint8_observer(observer: Observer, *, reduce_range: bool):
    import torch

    return _observer_class(observer).with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range)


def torch_ao_activation_observer(observer: Observer, engine: Engine):
    """An observer factory for a torch.ao int8 layer's uint8 affine input on ``engine`` (7-bit where the engine needs it)."""
    return _torch_ao_uint8_observer(observer, reduce_range=reduces_range(engine))


def torch_ao_output_observer(engine: Engine):
    """The observer factory for a torch.ao int8 layer's requantized output: minmax over the whole uint8 range.

    Whatever ``observer`` says for inputs: clipping an output's peaks (the
    residual stream, attention scores) costs more held-out perplexity than
    rounding it on a coarser grid (``benchmarks/RESULTS.md``: with histogram
    output ranges, 7-bit, ``qat`` fbgemm lost +5.1% on drama; with these +1.9%).
    """
    del engine  # requantized from int32: every engine takes the whole range
    return _torch_ao_uint8_observer(Observer.MINMAX, reduce_range=False)
