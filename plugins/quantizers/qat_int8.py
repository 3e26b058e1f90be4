"""The ``qat-int8`` quantizer: quantization-aware training for ftq's per-token int8 kernel.

``prepare`` swaps every Linear/Conv1D (except ``keep_float``) for an
:class:`~ftq_plugins.qat.fake_quant.Int8QATLinear`, which trains through the exact
numerics of :class:`~ftq_plugins.int8.dynamic_linear.Int8DynamicLinear` (symmetric
int8, one scale per token for activations and per output channel for
weights, round half to even, clamp to ±127) with straight-through gradients.
It runs under bf16 autocast on CUDA and CPU.  ``convert`` turns each of them
into that ``Int8DynamicLinear`` on the CPU, so the saved artifact and its
evaluation use the real int8 GEMM.

By default (``rotate = auto``) it rotates a Llama-family model's residual
stream first, as ``dynamic`` does (:mod:`ftq_plugins.transforms.rotation`):
the rotated float model computes the same function, trains from a far better
int8 starting point, and ``down_proj`` trains on its online-rotated input.

There are no observers: activation scales are computed per token on the fly,
weight scales from the weights, so data-parallel ranks (whose weights DDP
keeps identical) convert to the same int8 model with nothing to synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftq_core.configs import check
from ftq_core.hookspecs import hookimpl
from ftq_core.protocols import LayerReport, QuantPhase

from . import options as quant_options
from .base import PER_TOKEN_QAT_SCHEME as SCHEME
from .base import QuantizerBase
from .options import keep_float_checks, keep_float_option

__all__ = ["QATInt8Config", "QATInt8Quantizer"]


@dataclass(frozen=True, kw_only=True)
class QATInt8Config:
    """Options of the ``qat-int8`` quantizer."""

    keep_float: tuple[str, ...] = keep_float_option()
    fused: bool = field(
        default=True,
        metadata={"help": "on CUDA, run each fake-quant as one Triton kernel (plain torch ops on CPU or without Triton)"},
    )
    group_siblings: bool = field(
        default=True,
        metadata={"help": "train layers that read one input (q/k/v, gate/up) as one GEMM in eager mixed precision: less host work per step"},
    )
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the whole prepared model for training (fastest on GPU; compiles for a minute first)"},
    )
    rotate: quant_options.Rotation = quant_options.rotate_option()
    untie_head: bool = quant_options.untie_head_option()
    quantize_embeddings: bool = quant_options.quantize_embeddings_option()

    def __post_init__(self) -> None:
        check(keep_float_checks(self.keep_float))


class QATInt8Quantizer(QuantizerBase):
    """Fake-quant Linear layers for training, then real int8 layers; see the module docstring."""

    phase = QuantPhase.TRAINING_AWARE
    engine = None  # ftq's own int8 GEMM (torch._int_mm); no torch.ao engine needed

    def prepare(self, model):
        """Swap the candidate layers in place; with ``compile``, return the compiled model."""
        import torch

        from ftq_core.layers import set_submodule
        from ftq_plugins.qat.fake_quant import Int8QATLinear
        from ftq_plugins.transforms.layer_selection import float_only_reports, params_of, select_layers

        blocks, scheme = {}, SCHEME  # blocks: layer name -> Hadamard block of its online input rotation
        if quant_options.plan_outliers(self.config.rotate, None, model).rotate:  # rotate = true refused here
            from ftq_plugins.transforms.rotation import ROTATED_SCHEME, rotate_for_int8

            # exact in float: it trains the same model
            blocks, scheme = rotate_for_int8(model, untie_head=self.config.untie_head), SCHEME + ROTATED_SCHEME
        chosen, excluded = select_layers(model, self.config.keep_float)
        self.reports = excluded + float_only_reports(model)
        for name, module in chosen:
            layer = Int8QATLinear.from_float(module, fused=self.config.fused, input_rotation_block=blocks.get(name, 0))
            set_submodule(model, name, layer)
            self.reports.append(LayerReport(name, type(module).__name__, scheme, True, "", params_of(module)))
        if self.config.quantize_embeddings:  # trained as the per-row int8 embeddings convert makes
            from ftq_plugins.qat.fake_quant_embedding import fake_quant_embeddings

            fake_quant_embeddings(model, self.config.keep_float)
        if self.config.group_siblings:
            from ftq_plugins.qat.sibling_groups import attach_sibling_groups

            attach_sibling_groups(model)
        if self.config.compile:
            return torch.compile(model)
        return model

    def convert(self, model):
        """Replace each fake-quant layer by its :class:`Int8DynamicLinear`; the model ends on the CPU in float32."""
        from ftq_core.layers import set_submodule
        from ftq_plugins.qat.fake_quant import Int8QATLinear

        model = getattr(model, "_orig_mod", model)  # undo torch.compile's wrapper
        model = model.to("cpu").float().eval()
        for name, module in list(model.named_modules()):
            if isinstance(module, Int8QATLinear):
                set_submodule(model, name, module.to_int8())
        from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear
        from ftq_plugins.int8.shared_input import mark_shared_inputs

        if self.config.quantize_embeddings:  # the per-row codes the embeddings trained as
            from ftq_plugins.int8.embedding import quantize_embeddings_reported

            self.reports = quantize_embeddings_reported(model, self.config.keep_float, self.reports)
        mark_shared_inputs(model, Int8DynamicLinear)  # q/k/v and gate/up quantize their input once (same codes)
        return model


@hookimpl
def register_quantizers(register):
    register(
        "qat-int8",
        QATInt8Quantizer,
        QATInt8Config,
        description="quantization-aware training matching the per-token int8 kernel (bf16-safe, fused fake-quant, DDP-ready)",
    )
