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

Three options make it calibrate (the pipeline then runs calibration batches
between ``prepare`` and ``convert``; without them ``dynamic`` needs no data):

* ``smoothquant_alpha``: SmoothQuant outlier migration before quantizing
  (:mod:`ftq_plugins.transforms.smoothquant`);
* ``ppl_budget``: keep the most sensitive layers float until the perplexity on
  the calibration batches is within this many percent of float
  (:mod:`ftq_plugins.transforms.sensitivity`).  ``3`` is the recommended setting
  whenever calibration data is at hand;
* ``weight_rounding = gptq``: int8 weight codes chosen against the
  calibration inputs instead of rounded to nearest
  (:mod:`ftq_plugins.transforms.gptq`; the most accurate with ``untie_head``).

On the per-token path, ``kernel`` picks the int8 kernel (``auto`` by default:
the fastest of oneDNN's prepacked int8 GEMM, ``torch._int_mm`` and weight-only
int8 x bf16 for decode and for prefill, measured per layer shape at convert
time; see
:mod:`ftq_plugins.int8.kernels`), recorded with each layer in the artifact.
``quantize_embeddings`` stores token embeddings as per-row int8 too, sharing
the tensors with a tied ``lm_head``.  ``attention_dtype`` runs attention
(which stays float) in bf16 on CPUs that compute bf16 natively; the choice is
recorded on the model's config and saved with it (:mod:`ftq_core.attention`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ftq_core.configs import check
from ftq_core.hookspecs import hookimpl
from ftq_plugins.transforms.sensitivity import SensitivityMethod

from . import options as quant_options
from .base import Engine, QuantizerBase, WeightGranularity, set_engine
from .layerwise import LayerwiseConversion, whole_model_options

__all__ = [
    "ActivationScheme",
    "DynamicDType",
    "Int8Kernel",
    "AttentionDType",
    "DynamicQuantConfig",
    "DynamicQuantizer",
]


class ActivationScheme(enum.Enum):
    PER_TOKEN = "per-token"
    PER_TENSOR = "per-tensor"


class DynamicDType(enum.Enum):
    INT8 = "int8"
    FLOAT16 = "float16"


class Int8Kernel(enum.Enum):
    """Kernel of the per-token path (:mod:`ftq_plugins.int8.kernels`)."""

    AUTO = "auto"
    ONEDNN = "onednn"
    INT_MM = "int-mm"
    FBGEMM = "fbgemm"
    WEIGHT_ONLY = "weight-only"


class AttentionDType(enum.Enum):
    """Dtype attention runs in in the quantized model (:mod:`ftq_core.attention`)."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


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
    keep_float: tuple[str, ...] = quant_options.keep_float_option()
    smoothquant_alpha: float | None = quant_options.smoothquant_option(None)
    ppl_budget: float | None = quant_options.ppl_budget_option(None)
    sensitivity_tokens: int = quant_options.sensitivity_tokens_option()
    sensitivity: SensitivityMethod = quant_options.sensitivity_option()
    kernel: Int8Kernel = field(
        default=Int8Kernel.AUTO,
        metadata={
            "help": "per-token path kernel: auto (fastest per layer shape and phase, measured), onednn "
            "(prepacked int8 GEMM), int-mm (torch._int_mm), fbgemm (one-token decode kernel; more tokens run onednn) "
            "or weight-only (int8 weights x bf16 activations)"
        },
    )
    quantize_embeddings: bool = quant_options.quantize_embeddings_option()
    rotate: quant_options.Rotation = quant_options.rotate_option()
    untie_head: bool = quant_options.untie_head_option()
    smoothquant_per_layer: bool = quant_options.smoothquant_per_layer_option()
    weight_rounding: quant_options.WeightRounding = field(
        default=quant_options.WeightRounding.NEAREST,
        metadata={"help": quant_options.WEIGHT_ROUNDING_HELP + "; a head tied to int8 embeddings keeps the nearest "
                          "codes, which the embeddings share"},
    )
    attention_dtype: AttentionDType = field(
        default=AttentionDType.AUTO,
        metadata={
            "help": "dtype of attention (it stays float): bfloat16 (q/k/v rounded to bf16; about twice as fast "
            "where the CPU has AVX512-BF16/AMX), float32, or auto (bfloat16 on such CPUs, else float32); "
            "saved with the model"
        },
    )

    def __post_init__(self) -> None:
        check(
            [
                *quant_options.keep_float_checks(self.keep_float),
                *quant_options.smoothquant_checks(self.smoothquant_alpha),
                *quant_options.sensitivity_checks(self.ppl_budget, self.sensitivity_tokens),
                (
                    self.smoothquant_alpha is None or self.activation is ActivationScheme.PER_TOKEN,
                    "smoothquant_alpha works with activation 'per-token' (ftq kernels); unset it or set activation = 'per-token'",
                ),
                *quant_options.rotation_checks(self.rotate, self.smoothquant_alpha),
                (
                    not (self.rotate is quant_options.Rotation.ON and self.activation is not ActivationScheme.PER_TOKEN),
                    "rotate = true works with activation 'per-token' (ftq kernels); set activation = 'per-token'",
                ),
                (
                    not self.smoothquant_per_layer or self.smoothquant_alpha is not None,
                    "smoothquant_per_layer chooses SmoothQuant's alpha per layer group; set smoothquant_alpha too "
                    "(dynamic smooths only then), or unset smoothquant_per_layer",
                ),
                (
                    self.weight_rounding is quant_options.WeightRounding.NEAREST
                    or (self.activation is ActivationScheme.PER_TOKEN and self.smoothquant_alpha is None),
                    "weight_rounding = 'gptq' rounds ftq's per-token int8 layers; set activation = 'per-token' and "
                    "unset smoothquant_alpha, or weight_rounding = 'nearest'",
                ),
                (
                    not (self.activation is ActivationScheme.PER_TOKEN and self.dtype is DynamicDType.FLOAT16),
                    "dtype 'float16' has no per-token activation path; set activation = 'per-tensor'",
                ),
                (
                    not (self.activation is ActivationScheme.PER_TOKEN and self.weight is WeightGranularity.PER_TENSOR),
                    "activation 'per-token' pairs with weight 'per-channel'; per-tensor weights only on the per-tensor path",
                ),
            ]
        )

    @property
    def scheme(self) -> str:
        if self.dtype is DynamicDType.FLOAT16:
            return "fp16 weight, dynamic"
        smooth = ""
        if self.smoothquant_alpha is not None:
            smooth = ", SmoothQuant α per layer group" if self.smoothquant_per_layer else f", SmoothQuant α={self.smoothquant_alpha:g}"
        return f"int8 {self.weight.value} weight, int8 {self.activation.value} dynamic activation{smooth}"


class DynamicQuantizer(QuantizerBase):
    """Swaps every Linear/Conv1D (except ``keep_float``) for a dynamic int8 layer."""

    def __init__(self, config: DynamicQuantConfig):
        from ftq_plugins.transforms.calibration import CalibrationRecorder

        super().__init__(config)
        self.engine = None if config.activation is ActivationScheme.PER_TOKEN else config.engine.value
        self.recorder = CalibrationRecorder()
        self.outliers = None  # quant_options.OutlierPlan, resolved for the model at prepare

    @property
    def needs_calibration(self) -> bool:
        return (self.config.smoothquant_alpha is not None or self.config.ppl_budget is not None
                or self.config.weight_rounding is quant_options.WeightRounding.GPTQ)

    def _plan_outliers(self, model):
        from ftq_plugins.transforms.layer_selection import select_layers

        allowed = None
        if self.config.activation is not ActivationScheme.PER_TOKEN:
            allowed = "activation is per-tensor (torch.ao engines)"
        elif not select_layers(model, self.config.keep_float)[0] and not self.config.quantize_embeddings:
            allowed = "keep_float keeps every layer float"
        return quant_options.plan_outliers(self.config.rotate, self.config.smoothquant_alpha, model, allowed=allowed)

    def prepare(self, model):
        self.outliers = self._plan_outliers(model)  # rotate = true is refused here, before training or calibration
        if self.needs_calibration:
            from ftq_plugins.transforms.layer_selection import select_layers

            self.recorder.attach(model, select_layers(model, self.config.keep_float)[0])
        return model

    def convert(self, model):
        from ftq_core.layers import as_linear
        from ftq_plugins.transforms.layer_selection import install_with_fallback, plan_reports, select_layers

        if self.engine is not None:
            set_engine(self.engine)
        self.recorder.detach()
        if self.needs_calibration and not self.recorder.batches:
            from ftq_core.errors import UsageError

            raise UsageError(
                "the dynamic quantizer was asked for smoothquant_alpha/ppl_budget/weight_rounding = 'gptq' but saw no "
                "calibration batches; pass calibration data, or unset those options"
            )
        model = model.to("cpu").float().eval()
        blocks = {}  # layer name -> Hadamard block of its online input rotation
        outliers = self.outliers or self._plan_outliers(model)
        if outliers.rotate:
            from ftq_plugins.transforms.rotation import rotate_for_int8

            blocks = rotate_for_int8(model, untie_head=self.config.untie_head)
        chosen, excluded = select_layers(model, self.config.keep_float)
        explicit = {}
        if self.config.smoothquant_alpha is not None:
            from ftq_plugins.transforms.smoothquant import per_layer_alphas, smooth_model

            names = [n for n, _ in chosen]
            alphas = (per_layer_alphas(model, self.recorder, names, per_token=True)
                      if self.config.smoothquant_per_layer else None)
            explicit = smooth_model(model, self.recorder.absmax, self.config.smoothquant_alpha, names, alphas)
        floats = dict(chosen)
        codes = self._gptq_codes(model, floats, blocks) if self.config.weight_rounding is quant_options.WeightRounding.GPTQ else {}
        quantized = {name: self._quantize_layer(as_linear(module), explicit.get(name), blocks.get(name, 0), codes.get(name))
                     for name, module in chosen}
        kept = install_with_fallback(model, floats, quantized, self.config, self.recorder.batches)
        from ftq_plugins.transforms.rotation import ROTATED_SCHEME

        scheme = self.config.scheme + (ROTATED_SCHEME if outliers.rotate else "")
        self.reports = plan_reports(model, excluded, floats, kept, scheme)
        if codes:
            from ftq_plugins.transforms.gptq import mark_gptq_layers

            self.reports = mark_gptq_layers(self.reports, codes)
        return self.finish_convert(model)

    def finish_convert(self, model):
        """What ``convert`` does once every chosen layer is int8: embeddings, kernel choice, shared inputs,
        attention dtype (also the last step of the layer-by-layer conversion)."""
        if self.config.quantize_embeddings:
            self._quantize_embeddings(model)
        if self.config.activation is ActivationScheme.PER_TOKEN:
            from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear, tune_kernels
            from ftq_plugins.int8.shared_input import mark_shared_inputs

            if self.config.kernel is Int8Kernel.AUTO:
                tune_kernels(model)
            mark_shared_inputs(model, Int8DynamicLinear)  # q/k/v and gate/up quantize their input once
        self._set_attention_dtype(model)
        return model

    def layerwise_refusal(self) -> str | None:
        """Why these options cannot convert one decoder layer at a time (``None``: they can)."""
        whole = whole_model_options(self.config)
        if whole:
            return whole
        if self.config.activation is not ActivationScheme.PER_TOKEN:
            return "activation 'per-tensor' (torch.ao engines) converts the whole model; use activation = 'per-token'"
        return None

    def begin_layerwise(self, model):
        """Start converting ``model`` (parameters on the meta device) one decoder layer at a time
        (:class:`~.layerwise.LayerwiseConversion`)."""
        return _DynamicLayerwise(self, model, rotate=self._plan_outliers(model).rotate)

    def _set_attention_dtype(self, model) -> None:
        from ftq_core.attention import BF16_SDPA, set_attention_dtype
        from ftq_core.cpu_features import cpu_has_native_bf16

        choice = self.config.attention_dtype
        if choice is AttentionDType.AUTO:
            # auto never changes a model off HF's sdpa attention (eager, flash...): those stay as they are
            sdpa = getattr(getattr(model, "config", None), "_attn_implementation", None) in ("sdpa", BF16_SDPA)
            choice = AttentionDType.BFLOAT16 if sdpa and cpu_has_native_bf16() else AttentionDType.FLOAT32
        set_attention_dtype(model, "bfloat16" if choice is AttentionDType.BFLOAT16 else None)

    def _quantize_embeddings(self, model) -> None:
        from ftq_plugins.int8.embedding import quantize_embeddings_reported

        self.reports = quantize_embeddings_reported(model, self.config.keep_float, self.reports)

    def _gptq_codes(self, model, floats: dict, blocks: dict, run=None) -> dict:
        """``{layer name: (int8 codes, scales)}`` by GPTQ, from one calibration pass over the (rotated) float model."""
        # a head tied to embeddings that become int8 keeps the nearest codes, which the embeddings share with it
        from ftq_core.layers import linear_weight, matches_any
        from ftq_plugins.int8.hadamard import block_hadamard, to_rotated_basis
        from ftq_plugins.transforms.gptq import gptq_layer_codes

        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        shared = None
        if self.config.quantize_embeddings and embeddings is not None:
            name = next((n for n, m in model.named_modules() if m is embeddings), "")
            if matches_any(name, self.config.keep_float) is None:
                shared = embeddings.weight
        layers = {name: module for name, module in floats.items() if shared is None or linear_weight(module) is not shared}
        # a layer with an online rotation multiplies H x by W H: its Hessian and weight are in that basis
        rotated = {name: block for name, block in blocks.items() if block and name in layers}
        return gptq_layer_codes(
            model, layers, self.recorder.batches,
            input_transforms={name: (lambda x, b=b: block_hadamard(x, b)) for name, b in rotated.items()},
            weight_transforms={name: (lambda w, b=b: to_rotated_basis(w, b)) for name, b in rotated.items()},
            run=run,
        )

    def _quantize_layer(self, linear, smooth=None, rotation_block: int = 0, codes=None):
        if smooth is not None:
            from ftq_plugins.int8.w8a8_linear import ActivationMode, Int8W8A8Linear

            return Int8W8A8Linear.from_float(linear, mode=ActivationMode.PER_TOKEN, smooth=smooth)
        if self.config.activation is ActivationScheme.PER_TOKEN:
            from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

            return Int8DynamicLinear.from_float(linear, kernel=self.config.kernel.value, input_rotation_block=rotation_block,
                                                codes=codes)
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import default_dynamic_qconfig, float16_dynamic_qconfig, per_channel_dynamic_qconfig

        if self.config.dtype is DynamicDType.FLOAT16:
            linear.qconfig = float16_dynamic_qconfig
        elif self.config.weight is WeightGranularity.PER_CHANNEL:
            linear.qconfig = per_channel_dynamic_qconfig
        else:
            linear.qconfig = default_dynamic_qconfig
        return DynamicLinear.from_float(linear)


class _DynamicLayerwise(LayerwiseConversion):
    """``dynamic``'s :meth:`DynamicQuantizer.convert`, one decoder layer at a time."""

    def config_uses_gptq(self) -> bool:
        return self.config.weight_rounding is quant_options.WeightRounding.GPTQ

    def quantize_modules(self, model, floats: dict, blocks: dict, run) -> dict:
        from ftq_core.layers import as_linear

        codes = self.quantizer._gptq_codes(model, floats, blocks, run=run) if self.config_uses_gptq() and floats else {}
        self.codes.update(codes)
        return {name: self.quantizer._quantize_layer(as_linear(module), None, blocks.get(name, 0), codes.get(name))
                for name, module in floats.items()}

    def complete(self, model, scheme: str) -> None:
        self.quantizer.reports = self.reports(model, scheme)
        self.quantizer.finish_convert(model)


@hookimpl
def register_quantizers(register):
    register(
        "dynamic",
        DynamicQuantizer,
        DynamicQuantConfig,
        description="int8 weights, activations quantized at run time (per-token ftq kernel or torch.ao engines)",
    )
