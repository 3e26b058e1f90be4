"""The ``dynamic`` quantizer: int8 weights, activations quantized on the fly.

Two kernel paths, chosen by ``activation``:

* ``per-token`` (default, most accurate): ftq's :class:`Int8DynamicLinear`,
  one activation scale per token and one weight scale per output channel, on a
  real int8 GEMM (``torch._int_mm``).
* ``per-tensor``: PyTorch's eager dynamic quantization
  (``torch.ao.nn.quantized.dynamic.Linear``) on the chosen engine (``x86``,
  ``fbgemm``, ``onednn``, ``qnnpack``); also the ``float16`` weight path.
  Faster to set up, far less accurate on LLMs: x86/fbgemm use 7-bit
  activations (``reduce_range``) and one scale for a whole activation tensor.

Layers matching ``keep_float`` stay in float and are reported as such.

On the per-token path, ``kernel`` picks the int8 kernel (``auto`` by default:
the fastest of oneDNN's prepacked int8 GEMM, ``torch._int_mm`` and weight-only
int8 x bf16 for decode and for prefill, measured per layer shape at convert
time; see
:mod:`ftq_plugins.int8_kernels`), recorded with each layer in the artifact.
``quantize_embeddings`` stores token embeddings as per-row int8 too, sharing
the tensors with a tied ``lm_head``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ftq_core.configs import check
from ftq_core.hookspecs import hookimpl
from ftq_core.protocols import LayerReport, QuantPhase

__all__ = [
    "ActivationScheme",
    "WeightGranularity",
    "DynamicDType",
    "Engine",
    "Int8Kernel",
    "DynamicQuantConfig",
    "DynamicQuantizer",
]


class ActivationScheme(enum.Enum):
    PER_TOKEN = "per-token"
    PER_TENSOR = "per-tensor"


class WeightGranularity(enum.Enum):
    PER_CHANNEL = "per-channel"
    PER_TENSOR = "per-tensor"


class DynamicDType(enum.Enum):
    INT8 = "int8"
    FLOAT16 = "float16"


class Engine(enum.Enum):
    """PyTorch's quantized CPU engines (``torch.backends.quantized.engine``)."""

    X86 = "x86"
    FBGEMM = "fbgemm"
    ONEDNN = "onednn"
    QNNPACK = "qnnpack"


class Int8Kernel(enum.Enum):
    """Kernel of the per-token path (:mod:`ftq_plugins.int8_kernels`)."""

    AUTO = "auto"
    ONEDNN = "onednn"
    INT_MM = "int-mm"
    FBGEMM = "fbgemm"
    WEIGHT_ONLY = "weight-only"


@dataclass(frozen=True, kw_only=True)
class DynamicQuantConfig:
    """Options of the ``dynamic`` quantizer."""

    activation: ActivationScheme = field(
        default=ActivationScheme.PER_TOKEN,
        metadata={"help": "per-token: ftq int8 GEMM, one scale per token (accurate); per-tensor: torch.ao eager kernels"},
    )
    weight: WeightGranularity = field(
        default=WeightGranularity.PER_CHANNEL, metadata={"help": "weight scale granularity"}
    )
    dtype: DynamicDType = field(default=DynamicDType.INT8, metadata={"help": "int8, or float16 weights (torch.ao path)"})
    engine: Engine = field(default=Engine.X86, metadata={"help": "torch.ao engine for the per-tensor/float16 path"})
    keep_float: tuple[str, ...] = field(
        default=(), metadata={"help": "glob patterns of layer names kept in float, e.g. lm_head,*.down_proj"}
    )
    kernel: Int8Kernel = field(
        default=Int8Kernel.AUTO,
        metadata={
            "help": "per-token path kernel: auto (fastest per layer shape and phase, measured), onednn "
            "(prepacked int8 GEMM), int-mm (torch._int_mm), fbgemm (one-token decode kernel; more tokens run onednn) "
            "or weight-only (int8 weights x bf16 activations)"
        },
    )
    quantize_embeddings: bool = field(
        default=True,
        metadata={"help": "store token embeddings as per-row int8 (shared with a tied lm_head)"},
    )

    def __post_init__(self) -> None:
        check(
            [
                (
                    not (self.activation is ActivationScheme.PER_TOKEN and self.dtype is DynamicDType.FLOAT16),
                    "dtype 'float16' has no per-token activation path; set activation = 'per-tensor'",
                ),
                (
                    not (self.activation is ActivationScheme.PER_TOKEN and self.weight is WeightGranularity.PER_TENSOR),
                    "activation 'per-token' pairs with weight 'per-channel'; per-tensor weights only on the per-tensor path",
                ),
                (all(isinstance(p, str) and p for p in self.keep_float), "keep_float entries must be non-empty strings"),
            ]
        )

    @property
    def scheme(self) -> str:
        if self.dtype is DynamicDType.FLOAT16:
            return "fp16 weight, dynamic"
        return f"int8 {self.weight.value} weight, int8 {self.activation.value} dynamic activation"


class DynamicQuantizer:
    """Swaps every Linear/Conv1D (except ``keep_float``) for a dynamic int8 layer."""

    phase = QuantPhase.POST_TRAINING
    needs_calibration = False

    def __init__(self, config: DynamicQuantConfig):
        self.config = config
        self.engine = None if config.activation is ActivationScheme.PER_TOKEN else config.engine.value
        self._reports: list[LayerReport] = []

    def prepare(self, model):
        return model

    def convert(self, model):
        from .layers import as_linear, iter_linear_layers, matches_any, set_submodule

        if self.engine is not None:
            _set_engine(self.engine)
        self._reports = []
        model = model.to("cpu").float().eval()
        for name, module in list(iter_linear_layers(model)):
            params = sum(p.numel() for p in module.parameters())
            pattern = matches_any(name, self.config.keep_float)
            if pattern is not None:
                self._reports.append(
                    LayerReport(name, type(module).__name__, "float32", False, f"keep_float {pattern!r}", params)
                )
                continue
            set_submodule(model, name, self._quantize_layer(as_linear(module)))
            self._reports.append(LayerReport(name, type(module).__name__, self.config.scheme, True, "", params))
        if self.config.quantize_embeddings:
            self._quantize_embeddings(model)
        if self.config.activation is ActivationScheme.PER_TOKEN and self.config.kernel is Int8Kernel.AUTO:
            from .int8_linear import tune_kernels

            tune_kernels(model)
        return model

    def _quantize_embeddings(self, model) -> None:
        from .int8_embedding import quantize_embeddings, share_tied_int8_weights

        for name, module in quantize_embeddings(model, self.config.keep_float):
            params = module.weight.numel()
            self._reports.append(LayerReport(name, "Embedding", "int8 per-row weight", True, "", params))
        share_tied_int8_weights(model)

    def _quantize_layer(self, linear):
        if self.config.activation is ActivationScheme.PER_TOKEN:
            from .int8_linear import Int8DynamicLinear

            return Int8DynamicLinear.from_float(linear, kernel=self.config.kernel.value)
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import default_dynamic_qconfig, float16_dynamic_qconfig, per_channel_dynamic_qconfig

        if self.config.dtype is DynamicDType.FLOAT16:
            linear.qconfig = float16_dynamic_qconfig
        elif self.config.weight is WeightGranularity.PER_CHANNEL:
            linear.qconfig = per_channel_dynamic_qconfig
        else:
            linear.qconfig = default_dynamic_qconfig
        return DynamicLinear.from_float(linear)

    def layer_report(self, model) -> list[LayerReport]:
        return list(self._reports)


def _set_engine(engine: str) -> None:
    import torch

    from ftq_core.errors import UsageError

    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise UsageError(
            f"quantized engine {engine!r} is not available in this torch build; available: "
            f"{', '.join(e for e in supported if e != 'none')}. Set engine to one of those."
        )
    torch.backends.quantized.engine = engine


@hookimpl
def register_quantizers(register):
    register(
        "dynamic",
        DynamicQuantizer,
        DynamicQuantConfig,
        description="int8 weights, activations quantized at run time (per-token ftq kernel or torch.ao engines)",
    )
