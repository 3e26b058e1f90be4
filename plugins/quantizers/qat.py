"""The ``qat`` quantizer: quantization-aware fine-tuning on torch.ao's eager path.

The pipeline runs it as :attr:`QuantPhase.TRAINING_AWARE`:

1. ``prepare``: each Linear/Conv1D (except ``keep_float``) is copied into an
   ``nn.Linear``, wrapped in ftq's own quant/dequant boundary
   (:class:`QuantBoundary`) and turned into a fake-quant module with the
   engine's QAT qconfig (``torch.ao.quantization.prepare_qat``).  With
   ``smoothquant_alpha`` set, ``prepare`` first only records activation ranges;
   the pipeline calibrates, and ``on_calibrated`` smooths and inserts the
   fake-quant modules.
2. The trainer fine-tunes the fake-quant model (on CUDA if it has one: the
   boundaries run in float32 with autocast off, so bf16 autocast is fine);
   ``on_train_step`` freezes the observers after ``freeze_observers_after``
   steps so the last steps train against fixed scales.
3. ``convert`` moves the model to the CPU and converts it to real int8
   (``torch.ao.nn.quantized.Linear`` on the chosen engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftq_core.configs import check
from ftq_core.hookspecs import hookimpl
from ftq_core.protocols import LayerReport, QuantPhase

from .base import Engine, QuantizerBase, set_engine
from .options import keep_float_checks, keep_float_option, smoothquant_checks, smoothquant_option

__all__ = ["QATQuantConfig", "QATQuantizer"]


@dataclass(frozen=True, kw_only=True)
class QATQuantConfig:
    """Options of the ``qat`` quantizer."""

    engine: Engine = field(default=Engine.FBGEMM, metadata={"help": "qconfig and int8 kernels: fbgemm, qnnpack, x86 or onednn"})
    freeze_observers_after: int | None = field(
        default=50, metadata={"help": "stop updating activation/weight ranges after this many training steps; none: never"}
    )
    smoothquant_alpha: float | None = smoothquant_option(0.5)
    keep_float: tuple[str, ...] = keep_float_option()

    def __post_init__(self) -> None:
        check(
            [
                *keep_float_checks(self.keep_float),
                *smoothquant_checks(self.smoothquant_alpha),
                (
                    self.freeze_observers_after is None or self.freeze_observers_after >= 1,
                    f"freeze_observers_after must be >= 1 or none, got {self.freeze_observers_after}",
                ),
            ]
        )

    @property
    def scheme(self) -> str:
        smooth = f", SmoothQuant α={self.smoothquant_alpha:g}" if self.smoothquant_alpha is not None else ""
        return f"int8 QAT ({self.engine.value}): weight per-channel, uint8 static per-tensor activation{smooth}"


class QATQuantizer(QuantizerBase):
    """Fake-quant fine-tuning, then real int8 (torch.ao eager) on the CPU."""

    phase = QuantPhase.TRAINING_AWARE

    def __init__(self, config: QATQuantConfig):
        from ftq_plugins.transforms.calibration import CalibrationRecorder

        super().__init__(config)
        self.engine = config.engine.value
        self.recorder = CalibrationRecorder(keep_batches=0)
        self.frozen = False
        self._names: list[str] = []

    @property
    def needs_calibration(self) -> bool:
        return self.config.smoothquant_alpha is not None

    def prepare(self, model):
        from ftq_plugins.transforms.layer_selection import select_layers

        if self.needs_calibration:
            self.recorder.attach(model, select_layers(model, self.config.keep_float)[0])
            return model
        return self._insert_fake_quant(model, {})

    def on_calibrated(self, model):
        """After calibration: smooth with the recorded ranges, then insert fake-quant."""
        from ftq_core.errors import UsageError
        from ftq_plugins.transforms.layer_selection import select_layers
        from ftq_plugins.transforms.smoothquant import smooth_model

        self.recorder.detach()
        if not self.recorder.absmax:
            raise UsageError("qat with smoothquant_alpha needs calibration batches before training; none were run")
        names = [name for name, _ in select_layers(model, self.config.keep_float)[0]]
        explicit = smooth_model(model, self.recorder.absmax, self.config.smoothquant_alpha, names)
        return self._insert_fake_quant(model, explicit)

    def _insert_fake_quant(self, model, explicit):
        from torch.ao.quantization import get_default_qat_qconfig, prepare_qat

        from ftq_core.layers import set_submodule
        from ftq_plugins.int8.quant_boundary import QuantBoundary, float_linear
        from ftq_plugins.transforms.layer_selection import float_only_reports, params_of, select_layers

        chosen, excluded = select_layers(model, self.config.keep_float)
        self.reports = excluded + float_only_reports(model)
        qconfig = get_default_qat_qconfig(self.engine)
        self._names = []
        for name, module in chosen:
            wrapper = QuantBoundary(float_linear(module, explicit.get(name)), explicit.get(name)).train()
            wrapper.qconfig = qconfig
            prepare_qat(wrapper, inplace=True)
            set_submodule(model, name, wrapper)
            self._names.append(name)
            self.reports.append(LayerReport(name, type(module).__name__, self.config.scheme, True, "", params_of(module)))
        return model

    def on_train_step(self, step: int, model) -> None:
        """Called by the trainer after each optimizer step: freeze observers once."""
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
        for name in self._names:
            convert(model.get_submodule(name), inplace=True)
        return model


@hookimpl
def register_quantizers(register):
    register(
        "qat",
        QATQuantizer,
        QATQuantConfig,
        description="quantization-aware training (fbgemm/qnnpack/x86/onednn qconfigs), converted to int8 on the CPU",
    )
