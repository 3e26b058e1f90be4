"""The ``qat`` quantizer: quantization-aware fine-tuning on torch.ao's eager path.

The pipeline runs it as :attr:`QuantPhase.TRAINING_AWARE`, and training starts
from the best post-training state, not from fresh observers:

1. ``prepare`` treats activation outliers first, as ``static`` does: by
   default (``rotate = auto``) a Llama-family model's residual stream is
   rotated (exact in float, so training sees the same model) and
   ``down_proj``'s input is rotated online by Hadamard blocks; a model that
   cannot be rotated, or ``smoothquant_alpha`` set, gets SmoothQuant instead.
   It then only records the calibration batches.
2. ``on_calibrated``: each Linear/Conv1D (except ``keep_float``) is copied
   into an ``nn.Linear``, wrapped in ftq's quant/dequant boundary
   (:class:`QuantBoundary`) and turned into a fake-quant module with the
   engine's QAT qconfig (``torch.ao.quantization.prepare_qat``).  Every
   activation range (each layer's input and its requantized output) starts
   from the calibration batches run through the float model -- inputs with
   the ``observer`` of ``static`` (histogram by default: the range of least
   rounding error), outputs with minmax over the whole uint8 range -- and
   stays fixed while weights train; weight ranges follow the weights.  The
   ``per_token`` layers (``down_proj`` by default, whose input and output no
   per-tensor static range fits) train as ftq's per-token int8 instead
   (:class:`Int8QATLinear`, the ``qat-int8`` numerics).
3. The trainer fine-tunes the fake-quant model (on CUDA if it has one: the
   boundaries run in float32 with autocast off, so bf16 autocast is fine);
   ``on_train_step`` freezes the weight observers after
   ``freeze_observers_after`` steps so the last steps train against fixed scales.
4. ``convert`` moves the model to the CPU and converts it to real int8
   (``torch.ao.nn.quantized.Linear`` on the chosen engine; the ``per_token``
   layers to :class:`Int8DynamicLinear`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftq_core.configs import check
from ftq_core.hookspecs import hookimpl
from ftq_core.protocols import LayerReport, QuantPhase

from . import options as quant_options
from .base import PER_TOKEN_QAT_SCHEME, Engine, QuantizerBase, set_engine
from .observers import Observer, observer_option, torch_ao_activation_observer, torch_ao_output_observer

__all__ = ["QATQuantConfig", "QATQuantizer"]

@dataclass(frozen=True, kw_only=True)
class QATQuantConfig:
    """Options of the ``qat`` quantizer."""

    engine: Engine = field(default=Engine.FBGEMM, metadata={"help": "qconfig and int8 kernels: fbgemm, qnnpack, x86 or onednn"})
    freeze_observers_after: int | None = field(
        default=50, metadata={"help": "stop updating weight ranges after this many training steps; none: never"}
    )
    observer: Observer = observer_option()
    smoothquant_alpha: float | None = field(
        default=None,
        metadata={"help": "SmoothQuant migration strength in [0, 1]; none: off, except that rotate = auto uses "
                          f"{quant_options.AUTO_SMOOTHQUANT_ALPHA} on a model it cannot rotate"},
    )
    rotate: quant_options.Rotation = quant_options.rotate_option()
    untie_head: bool = quant_options.untie_head_option()
    keep_float: tuple[str, ...] = quant_options.keep_float_option()
    quantize_embeddings: bool = quant_options.quantize_embeddings_option()
    per_token: tuple[str, ...] = field(
        default=("*.mlp.down_proj",),
        metadata={"help": "glob patterns of layers that train and run as ftq's per-token dynamic int8 (the qat-int8 "
                          "numerics) instead of the engine's static layer: a static per-tensor down_proj costs about "
                          "2% held-out perplexity per layer; none: every layer on the engine"},
    )

    def __post_init__(self) -> None:
        check(
            [
                *quant_options.keep_float_checks(self.keep_float),
                *quant_options.layer_pattern_checks("per_token", self.per_token),
                *quant_options.smoothquant_checks(self.smoothquant_alpha),
                *quant_options.rotation_checks(self.rotate, self.smoothquant_alpha),
                (
                    self.freeze_observers_after is None or self.freeze_observers_after >= 1,
                    f"freeze_observers_after must be >= 1 or none, got {self.freeze_observers_after}",
                ),
            ]
        )

    @property
    def scheme(self) -> str:
        return (f"int8 QAT ({self.engine.value}): weight {'per-tensor' if self.engine is Engine.QNNPACK else 'per-channel'}, "
                f"uint8 static per-tensor activation ({self.observer.value})")


class QATQuantizer(QuantizerBase):
    """Fake-quant fine-tuning from calibrated ranges, then real int8 (torch.ao eager) on the CPU."""

    phase = QuantPhase.TRAINING_AWARE
    needs_calibration = True  # every activation range starts from the calibration batches

    def __init__(self, config: QATQuantConfig):
        from ftq_plugins.transforms.calibration import CalibrationRecorder

        super().__init__(config)
        self.engine = config.engine.value
        self.recorder = CalibrationRecorder()
        self.frozen = False
        self.outliers = None  # quant_options.OutlierPlan, resolved for the model at prepare
        self.blocks: dict[str, int] = {}  # layer name -> Hadamard block of its online input rotation
        self._names: list[str] = []

    def prepare(self, model):
        from ftq_plugins.transforms.layer_selection import select_layers

        self.outliers = quant_options.plan_outliers(  # rotate = true is refused here, before any work
            self.config.rotate, self.config.smoothquant_alpha, model, fallback_alpha=quant_options.AUTO_SMOOTHQUANT_ALPHA
        )
        if self.outliers.rotate:  # exact in float: calibration and training see the same model
            from ftq_plugins.transforms.rotation import rotate_for_int8

            self.blocks = rotate_for_int8(model, untie_head=self.config.untie_head)
        self.recorder.attach(model, select_layers(model, self.config.keep_float)[0])
        return model

    def on_calibrated(self, model):
        """After calibration: smooth (if SmoothQuant), insert fake-quant, set its ranges from the batches."""
        from ftq_core.errors import UsageError
        from ftq_plugins.qat.calibrated_ranges import calibrate_activation_ranges
        from ftq_plugins.transforms.smoothquant import smooth_model

        self.recorder.detach()
        if not self.recorder.batches:
            raise UsageError("qat needs calibration batches before training; none were run")
        engine_layers, per_token_layers, excluded, tied_heads = self._split_layers(model)
        explicit = {}
        if self.outliers.alpha is not None:  # a tied head keeps the embeddings' codes: never smoothed
            names = [name for name, _ in engine_layers + per_token_layers if name not in tied_heads]
            explicit = smooth_model(model, self.recorder.absmax, self.outliers.alpha, names)
        wrappers = self._insert_fake_quant(model, engine_layers, excluded, explicit)
        calibrate_activation_ranges(
            model, wrappers, self.recorder.batches,
            torch_ao_activation_observer(self.config.observer, self.config.engine),
            torch_ao_output_observer(self.config.engine),
        )
        self._insert_per_token(model, per_token_layers)  # after the ranges: calibration ran these layers in float
        if self.config.quantize_embeddings:  # trained as the per-row int8 embeddings convert makes
            from ftq_plugins.qat.fake_quant_embedding import fake_quant_embeddings

            fake_quant_embeddings(model, self.config.keep_float)
        model.train()
        return model

    def _split_layers(self, model):
        """``(engine layers, per-token layers, excluded reports, tied heads)`` of the candidate layers.

        Tied heads (names) are heads tied to embeddings that become int8; they are among the per-token layers.
        """
        from ftq_core.layers import matches_any
        from ftq_plugins.transforms.layer_selection import select_layers

        chosen, excluded = select_layers(model, self.config.keep_float)
        shared = set()
        if self.config.quantize_embeddings:
            # a head tied to embeddings that become int8 trains as ftq's per-token int8: its per-row codes are
            # then the embeddings' and the artifact holds the table once (an engine's packed head could not share)
            from ftq_plugins.int8.embedding import without_tied_heads

            names = [n for n, _ in chosen]
            shared = set(names) - set(without_tied_heads(model, names, self.config.keep_float))
        per_token = [(n, m) for n, m in chosen if matches_any(n, self.config.per_token) or n in shared]
        return [(n, m) for n, m in chosen if (n, m) not in per_token], per_token, excluded, shared

    def _scheme_suffix(self) -> str:
        from ftq_plugins.transforms.rotation import ROTATED_SCHEME

        suffix = f", SmoothQuant α={self.outliers.alpha:g}" if self.outliers.alpha is not None else ""
        return suffix + (ROTATED_SCHEME if self.outliers.rotate else "")

    def _insert_per_token(self, model, layers) -> None:
        from ftq_core.layers import set_submodule
        from ftq_plugins.qat.fake_quant import Int8QATLinear
        from ftq_plugins.transforms.layer_selection import params_of

        for name, module in layers:
            layer = Int8QATLinear.from_float(module, input_rotation_block=self.blocks.get(name, 0))
            set_submodule(model, name, layer)
            self._names.append(name)
            self.reports.append(LayerReport(name, type(module).__name__, PER_TOKEN_QAT_SCHEME + self._scheme_suffix(), True,
                                            "", params_of(module)))

    def _insert_fake_quant(self, model, chosen, excluded, explicit) -> list:
        from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

        from ftq_core.layers import set_submodule
        from ftq_plugins.int8.quant_boundary import QuantBoundary, float_linear
        from ftq_plugins.transforms.layer_selection import float_only_reports, params_of

        self.reports = excluded + float_only_reports(model)
        qconfig = get_default_qat_qconfig(self.engine)
        scheme = self.config.scheme + self._scheme_suffix()
        self._names, wrappers = [], []
        for name, module in chosen:
            smooth, block = explicit.get(name), self.blocks.get(name, 0)
            wrapper = QuantBoundary(float_linear(module, smooth, block), smooth, block).train()
            wrapper.qconfig = qconfig
            prepare_qat(wrapper, inplace=True)
            set_submodule(model, name, wrapper)
            self._names.append(name)
            wrappers.append(wrapper)
            self.reports.append(LayerReport(name, type(module).__name__, scheme, True, "", params_of(module)))
        return wrappers

    def on_train_step(self, step: int, model) -> None:
        """Called by the trainer after each optimizer step: freeze the weight observers once."""
        if self.frozen or self.config.freeze_observers_after is None or step < self.config.freeze_observers_after:
            return
        from torch.ao.quantization import disable_observer

        model.apply(disable_observer)
        self.frozen = True

    def convert(self, model):
        from torch.ao.quantization import convert, disable_observer

        from ftq_core.errors import UsageError

        if not self._names:
            raise UsageError("qat convert was called on a model it never prepared; call prepare (and on_calibrated) first")
        set_engine(self.engine)
        model = model.to("cpu").float().eval()  # int8 inference is on the CPU, whatever trained it
        model.apply(disable_observer)
        from ftq_core.layers import set_submodule
        from ftq_plugins.qat.fake_quant import Int8QATLinear

        for name in self._names:
            layer = model.get_submodule(name)
            if isinstance(layer, Int8QATLinear):
                set_submodule(model, name, layer.to_int8())
            else:
                convert(layer, inplace=True)
        if self.config.quantize_embeddings:  # the per-row codes the embeddings trained as
            from ftq_plugins.int8.embedding import quantize_embeddings_reported

            self.reports = quantize_embeddings_reported(model, self.config.keep_float, self.reports)
        return model


@hookimpl
def register_quantizers(register):
    register(
        "qat",
        QATQuantizer,
        QATQuantConfig,
        description="quantization-aware training (fbgemm/qnnpack/x86/onednn qconfigs), converted to int8 on the CPU",
    )
