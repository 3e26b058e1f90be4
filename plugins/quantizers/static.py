"""The ``static`` quantizer: post-training W8A8 with calibrated activation scales.

``prepare`` only starts watching the model (:class:`CalibrationRecorder`); the
pipeline runs its calibration batches; ``convert`` then

1. treats activation outliers: by default (``rotate = auto``) it rotates the
   residual stream of a Llama-family model (:mod:`ftq_plugins.transforms.rotation`),
   with ``down_proj``'s input rotated online; a model that cannot be rotated,
   or ``smoothquant_alpha`` set, gets SmoothQuant instead;
2. on backend ``ftq``, picks the int8 weight codes by GPTQ against the
   calibration inputs (``weight_rounding = auto``; :mod:`ftq_plugins.transforms.gptq`),
3. runs the recorded calibration batches again with an activation observer on
   each layer's (smoothed or rotated) input, and builds the int8 layers,
4. optionally keeps the most sensitive layers float to meet ``ppl_budget``.

Two kernel paths (``backend``):

* ``ftq`` (default, the accurate one): :class:`Int8W8A8Linear` in static mode:
  one symmetric 8-bit activation scale per tensor, per-channel int8 weights,
  ``torch._int_mm``, float output;
* ``torch-ao``: PyTorch's eager static path on an engine (``x86``,
  ``fbgemm``, ``onednn``, ``qnnpack``): each layer wrapped by ftq in its own
  quant/dequant boundary, uint8 affine activations (7-bit inputs on x86/fbgemm), and
  the output requantized to uint8 (minmax range, 8 bits) before it is dequantized.
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
from .observers import (
    Observer,
    ftq_activation_observer,
    observer_option,
    torch_ao_activation_observer,
    torch_ao_output_observer,
)

__all__ = ["StaticBackend", "StaticWeightRounding", "Observer", "StaticQuantConfig", "StaticQuantizer"]


class StaticBackend(enum.Enum):
    FTQ = "ftq"
    TORCH_AO = "torch-ao"


class StaticWeightRounding(enum.Enum):
    """``weight_rounding`` of ``static``: :class:`~.options.WeightRounding`'s choices, and ``auto``."""

    AUTO = "auto"  # gptq on backend ftq (static calibrates anyway), nearest on torch-ao
    NEAREST = "nearest"
    GPTQ = "gptq"


@dataclass(frozen=True, kw_only=True)
class StaticQuantConfig:
    """Options of the ``static`` quantizer."""

    backend: StaticBackend = field(
        default=StaticBackend.FTQ,
        metadata={"help": "ftq: int8 symmetric activations on torch._int_mm (accurate); torch-ao: eager static engines"},
    )
    observer: Observer = observer_option()
    engine: Engine = field(default=Engine.X86, metadata={"help": "torch.ao engine (backend torch-ao only)"})
    weight: WeightGranularity = field(
        default=WeightGranularity.PER_CHANNEL, metadata={"help": "weight scale granularity (per-tensor: torch-ao only)"}
    )
    smoothquant_alpha: float | None = field(
        default=None,
        metadata={"help": "SmoothQuant migration strength in [0, 1] (calibrates first); none: off, except that "
                          f"rotate = auto uses {quant_options.AUTO_SMOOTHQUANT_ALPHA} on a model it cannot rotate"},
    )
    ppl_budget: float | None = quant_options.ppl_budget_option(2.0)
    sensitivity_tokens: int = quant_options.sensitivity_tokens_option()
    sensitivity: SensitivityMethod = quant_options.sensitivity_option()
    keep_float: tuple[str, ...] = quant_options.keep_float_option()
    rotate: quant_options.Rotation = quant_options.rotate_option()
    untie_head: bool = quant_options.untie_head_option()
    smoothquant_per_layer: bool = quant_options.smoothquant_per_layer_option()
    quantize_embeddings: bool = quant_options.quantize_embeddings_option()
    weight_rounding: StaticWeightRounding = field(
        default=StaticWeightRounding.AUTO,
        metadata={"help": quant_options.WEIGHT_ROUNDING_HELP + "; auto: gptq on backend ftq (it calibrates anyway), "
                          "nearest on torch-ao"},
    )

    def __post_init__(self) -> None:
        check(
            [
                *quant_options.keep_float_checks(self.keep_float),
                (
                    self.weight_rounding is not StaticWeightRounding.GPTQ or self.backend is StaticBackend.FTQ,
                    "weight_rounding = 'gptq' rounds ftq's int8 layers (torch.ao computes its own weight codes); "
                    "set backend = 'ftq' or weight_rounding = 'nearest'",
                ),
                *quant_options.smoothquant_checks(self.smoothquant_alpha),
                *quant_options.sensitivity_checks(self.ppl_budget, self.sensitivity_tokens),
                (
                    self.backend is StaticBackend.TORCH_AO or self.weight is WeightGranularity.PER_CHANNEL,
                    "backend 'ftq' always uses per-channel weights; set weight = 'per-channel' or backend = 'torch-ao'",
                ),
                *quant_options.rotation_checks(self.rotate, self.smoothquant_alpha),
                (
                    not (self.smoothquant_per_layer and self.rotate is quant_options.Rotation.ON),
                    "smoothquant_per_layer chooses SmoothQuant's alpha, and rotate = true leaves nothing to smooth; "
                    "set rotate = false (or auto on a model that cannot be rotated) or unset smoothquant_per_layer",
                ),
            ]
        )

    @property
    def gptq(self) -> bool:
        """Whether the weight codes come from GPTQ (``weight_rounding``, ``auto`` resolved by backend)."""
        rounding = self.weight_rounding
        return rounding is StaticWeightRounding.GPTQ or (
            rounding is StaticWeightRounding.AUTO and self.backend is StaticBackend.FTQ)

    @property
    def scheme(self) -> str:
        if self.backend is StaticBackend.FTQ:
            act = "int8 symmetric"
        else:
            act = f"uint8 affine ({self.engine.value})"
        return f"int8 {self.weight.value} weight, {act} static per-tensor activation ({self.observer.value})"


class StaticQuantizer(QuantizerBase):
    """Post-training static W8A8 on every Linear/Conv1D not kept float."""

    needs_calibration = True

    def __init__(self, config: StaticQuantConfig):
        from ftq_plugins.transforms.calibration import CalibrationRecorder

        super().__init__(config)
        self.engine = config.engine.value if config.backend is StaticBackend.TORCH_AO else None
        self.recorder = CalibrationRecorder()
        self.blocks: dict[str, int] = {}  # layer name -> Hadamard block of its online input rotation (rotate)
        self.outliers = None  # quant_options.OutlierPlan, resolved for the model at prepare

    def prepare(self, model):
        from ftq_plugins.transforms.layer_selection import select_layers

        self.outliers = self._plan_outliers(model)  # rotate = true is refused here, before any calibration

        chosen, _ = select_layers(model, self.config.keep_float)
        self.recorder.attach(model, chosen)
        return model

    def _plan_outliers(self, model):
        return quant_options.plan_outliers(
            self.config.rotate, self.config.smoothquant_alpha, model, fallback_alpha=quant_options.AUTO_SMOOTHQUANT_ALPHA
        )

    def convert(self, model):
        from ftq_core.errors import UsageError
        from ftq_plugins.transforms.calibration import run_batches
        from ftq_plugins.transforms.layer_selection import install_with_fallback, plan_reports, select_layers
        from ftq_plugins.transforms.smoothquant import per_layer_alphas, smooth_model

        self.recorder.detach()
        if not self.recorder.batches:
            raise UsageError("the static quantizer saw no calibration batches; run calibration between prepare and convert")
        model = model.to("cpu").float().eval()
        self.blocks = {}
        outliers = self.outliers or self._plan_outliers(model)
        if outliers.rotate:  # calibration below runs the batches on the rotated model
            from ftq_plugins.transforms.rotation import rotate_for_int8

            self.blocks = rotate_for_int8(model, untie_head=self.config.untie_head)
        chosen, excluded = select_layers(model, self.config.keep_float)
        names = [name for name, _ in chosen]
        # a head tied to embeddings that become int8 is neither smoothed nor GPTQ-rounded: its nearest codes
        # are the embeddings', and the two share one tensor
        from ftq_plugins.int8.embedding import without_tied_heads

        reshaped = without_tied_heads(model, names, self.config.keep_float) if self.config.quantize_embeddings else names
        explicit = {}
        if outliers.alpha is not None:
            alphas = (per_layer_alphas(model, self.recorder, reshaped, per_token=False)
                      if self.config.smoothquant_per_layer else None)
            explicit = smooth_model(model, self.recorder.absmax, outliers.alpha, reshaped, alphas)
        floats = {name: model.get_submodule(name) for name in names}
        codes = {}
        if self.config.gptq:
            codes = self._gptq_codes(model, {name: floats[name] for name in reshaped}, explicit)
        calibrate = lambda: run_batches(model, self.recorder.batches)  # noqa: E731 - the observers' pass
        if self.config.backend is StaticBackend.FTQ:
            quantized = self._observe_ftq(model, floats, explicit, calibrate, codes)
        else:
            quantized = self._observe_torch_ao(model, floats, explicit, calibrate)
        kept = install_with_fallback(model, floats, quantized, self.config, self.recorder.batches)
        scheme = self.config.scheme
        if outliers.alpha is not None:
            scheme += ", SmoothQuant α per layer group" if self.config.smoothquant_per_layer else f", SmoothQuant α={outliers.alpha:g}"
        from ftq_plugins.transforms.rotation import ROTATED_SCHEME

        scheme += ROTATED_SCHEME if outliers.rotate else ""
        self.reports = plan_reports(model, excluded, floats, kept, scheme)
        if codes:
            from ftq_plugins.transforms.gptq import mark_gptq_layers

            self.reports = mark_gptq_layers(self.reports, codes)
        if self.config.quantize_embeddings:
            from ftq_plugins.int8.embedding import quantize_embeddings_reported

            self.reports = quantize_embeddings_reported(model, self.config.keep_float, self.reports)
        return model

    def _gptq_codes(self, model, floats: dict, explicit: dict, run=None) -> dict:
        """``{layer name: (int8 codes, scales)}`` by GPTQ, in the basis each int8 layer multiplies (rotated, smoothed)."""
        from ftq_plugins.int8.hadamard import block_hadamard, to_rotated_basis
        from ftq_plugins.transforms.gptq import gptq_layer_codes

        inputs, weights = {}, {}
        for name in floats:
            smooth, block = explicit.get(name), self.blocks.get(name, 0)
            if smooth is None and not block:
                continue  # its input as it comes: siblings share one Hessian
            divisor = smooth if smooth is not None else 1.0
            factor = smooth[None, :] if smooth is not None else 1.0
            inputs[name] = lambda x, b=block, d=divisor: (block_hadamard(x, b) if b else x) / d
            weights[name] = lambda w, b=block, f=factor: to_rotated_basis(w, b) * f
        return gptq_layer_codes(model, floats, self.recorder.batches, input_transforms=inputs, weight_transforms=weights,
                                run=run)

    def layerwise_refusal(self) -> str | None:
        """Why these options cannot convert one decoder layer at a time (``None``: they can)."""
        if self.config.backend is not StaticBackend.FTQ:
            return "backend 'torch-ao' converts the whole model; use backend = 'ftq'"
        whole = whole_model_options(self.config)
        if whole:
            return whole
        return None

    def begin_layerwise(self, model):
        """Start converting ``model`` (parameters on the meta device) one decoder layer at a time
        (:class:`~.layerwise.LayerwiseConversion`); refuses a model that would need SmoothQuant (not rotatable)."""
        from ftq_core.errors import UsageError

        outliers = self._plan_outliers(model)
        if outliers.alpha is not None:
            raise UsageError(
                "cannot quantize layer by layer: this model cannot be rotated, and SmoothQuant, static's fallback, "
                "weighs layers across the whole float model; set rotate = false (no outlier treatment), or load the "
                "whole model (--layerwise off) where memory allows"
            )
        return _StaticLayerwise(self, model, rotate=outliers.rotate)

    # -- the two kernel paths ------------------------------------------------
    def _observe_ftq(self, model, floats, explicit, calibrate, codes):
        from ftq_plugins.int8.numerics import INT8_MAX
        from ftq_plugins.int8.w8a8_linear import ActivationMode, Int8W8A8Linear

        observers, handles = {}, []
        for name, module in floats.items():
            observer = observers[name] = ftq_activation_observer(self.config.observer)()
            smooth, block = explicit.get(name), self.blocks.get(name, 0)

            def hook(mod, args, observer=observer, smooth=smooth, block=block):
                x = args[0].detach().float()
                if block:  # the range the int8 layer will see: after its online rotation
                    from ftq_plugins.int8.hadamard import block_hadamard

                    x = block_hadamard(x, block)
                observer(x / smooth if smooth is not None else x)

            handles.append(module.register_forward_pre_hook(hook))
        try:
            calibrate()
        finally:
            for handle in handles:
                handle.remove()
        quantized = {}
        for name, module in floats.items():
            scale, _ = observers[name].calculate_qparams()
            quantized[name] = Int8W8A8Linear.from_float(
                module, mode=ActivationMode.STATIC, input_absmax=float(scale) * INT8_MAX, smooth=explicit.get(name),
                input_rotation_block=self.blocks.get(name, 0), codes=codes.get(name),
            )
        return quantized

    def _observe_torch_ao(self, model, floats, explicit, calibrate):
        from torch.ao.quantization import QConfig, convert, default_per_channel_weight_observer, default_weight_observer, prepare

        from ftq_core.layers import set_submodule
        from ftq_plugins.int8.quant_boundary import QuantBoundary, float_linear

        set_engine(self.engine)
        weight = default_per_channel_weight_observer if self.config.weight is WeightGranularity.PER_CHANNEL else default_weight_observer
        qconfig = QConfig(activation=torch_ao_activation_observer(self.config.observer, self.config.engine), weight=weight)
        # the Linear's own qconfig observes its requantized output (prepare keeps a child's own qconfig)
        output_qconfig = QConfig(activation=torch_ao_output_observer(self.config.engine), weight=weight)
        wrappers = {}
        for name, module in floats.items():
            smooth, block = explicit.get(name), self.blocks.get(name, 0)
            wrapper = wrappers[name] = QuantBoundary(float_linear(module, smooth, block), smooth, block)
            wrapper.qconfig = qconfig
            wrapper.module.qconfig = output_qconfig
            prepare(wrapper, inplace=True)
            set_submodule(model, name, wrapper)
        calibrate()
        for name, wrapper in wrappers.items():
            convert(wrapper, inplace=True)
            set_submodule(model, name, floats[name])
        return wrappers


class _StaticLayerwise(LayerwiseConversion):
    """``static``'s :meth:`StaticQuantizer.convert` on backend ``ftq``, one decoder layer at a time."""

    def config_uses_gptq(self) -> bool:
        return self.config.gptq

    def quantize_modules(self, model, floats: dict, blocks: dict, run) -> dict:
        from ftq_plugins.int8.embedding import without_tied_heads

        if not floats:
            return {}
        self.quantizer.blocks = blocks
        names = list(floats)
        reshaped = without_tied_heads(model, names, self.config.keep_float) if self.config.quantize_embeddings else names
        codes = {}
        if self.config.gptq:
            codes = self.quantizer._gptq_codes(model, {name: floats[name] for name in reshaped}, {}, run=run)
            self.codes.update(codes)
        return self.quantizer._observe_ftq(model, floats, {}, run, codes)

    def complete(self, model, scheme: str) -> None:
        self.quantizer.reports = self.reports(model, scheme)
        if self.config.quantize_embeddings:
            from ftq_plugins.int8.embedding import quantize_embeddings_reported

            self.quantizer.reports = quantize_embeddings_reported(model, self.config.keep_float, self.quantizer.reports)


@hookimpl
def register_quantizers(register):
    register(
        "static",
        StaticQuantizer,
        StaticQuantConfig,
        description="post-training W8A8: calibrated static activation scales, SmoothQuant, sensitivity fallback",
    )
