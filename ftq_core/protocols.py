"""What registered components return: small protocols, no base classes.

The pipeline calls only what is declared here, so a third-party component
needs nothing from ftq but these shapes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

if TYPE_CHECKING:  # torch is imported lazily so that `ftq --help` stays fast
    import torch

__all__ = [
    "optional_member",
    "OPTIONAL_MEMBERS",
    "DataSplits",
    "DatasetBuilder",
    "TrainResult",
    "Trainer",
    "QuantPhase",
    "Quantizer",
    "QuantizerBase",
    "LayerReport",
    "ModuleCodec",
    "Exporter",
    "Adapter",
]


@dataclass(frozen=True)
class DataSplits:
    """Token blocks for causal-LM work.

    ``train`` and ``eval`` are map-style ``torch.utils.data.Dataset`` objects
    whose items are 1-D ``LongTensor`` blocks of ``block_size`` tokens (every
    next token is a target), or dicts of such tensors: ``input_ids``,
    ``labels`` (-100 where no loss is taken: prompts, padding) and optionally
    ``attention_mask`` (0 on padding); :func:`ftq_core.data.collate` batches
    either.
    ``fingerprint`` identifies the source data and tokenization (recorded in the
    artifact manifest).
    """

    train: "torch.utils.data.Dataset"
    eval: "torch.utils.data.Dataset"
    block_size: int
    fingerprint: str
    description: str = ""


def optional_member(component: Any, protocol: type, name: str) -> Any:
    """``component.<name>``, or the default :data:`OPTIONAL_MEMBERS` declares for it under ``protocol``.

    The core reads optional members only through this function, so every one
    it reads is declared (and documented, in the protocol's docstring) here.
    A name the protocol does not declare is a bug in the core: ``KeyError``.
    """
    return getattr(component, name, OPTIONAL_MEMBERS[protocol.__name__][name])


@runtime_checkable
class DatasetBuilder(Protocol):
    """Turns a source of text into :class:`DataSplits` for a tokenizer.

    Required: ``build(tokenizer)``.  Optional (see :func:`optional_member`):

    * ``check()``: cheap checks that can refuse the data (a file that does not
      exist, a directory, binary content), raising
      :class:`~ftq_core.errors.DatasetError`.  The pipeline calls it before the
      model loads, so bad data is reported in a second, not after a minute of
      loading; ``build`` may rely on it having passed.  Default: none.
    * ``block_size`` (an option of the dataset's config): tokens per block
      when the pipeline packs texts handed to it directly
      (``ftq_core.run(data=[...])``) instead of building.  Default: 256.
    """

    def build(self, tokenizer: Any) -> DataSplits: ...


@dataclass(frozen=True)
class TrainResult:
    """What a trainer reports: steps done, the held-out loss curve, timing."""

    steps: int
    final_train_loss: float | None
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_second: float | None = None
    resumed_from: int | None = None
    #: ``(step, loss)`` for every optimizer step, restored from the checkpoint on resume
    train_losses: list[tuple[int, float]] = field(default_factory=list)


@runtime_checkable
class Trainer(Protocol):
    """Fine-tunes a causal LM in place.

    ``checkpoint_dir`` is where the trainer keeps what it needs to resume;
    ``resume`` asks it to continue from the newest checkpoint there.
    ``on_step(step, model)`` is called after every optimizer step (QAT uses it
    to freeze observers at a chosen step), and once with the checkpoint's step
    right after a resume: write it as a function of the step (``step >= k``),
    not of being called at exactly ``k``.

    Optional (see :func:`optional_member`):

    * ``distills``: ``True`` if ``train`` takes ``teacher=``, the float model
      before quantization, which the pipeline then keeps (a copy) and passes
      for quantization-aware training.  Default: ``False``.
    * ``checkpoints_kept``: how many checkpoints (model + optimizer state) the
      trainer keeps on disk at once, for the free-disk check before the run.
      Default: 0.
    """

    def train(
        self,
        model: "torch.nn.Module",
        data: DataSplits,
        *,
        checkpoint_dir: str | None,
        resume: bool,
        on_step: Callable[[int, "torch.nn.Module"], None] | None = None,
    ) -> TrainResult: ...


class QuantPhase(enum.Enum):
    """When a quantizer's ``prepare`` runs relative to fine-tuning."""

    #: fine-tune in float first, then prepare → (calibrate) → convert
    POST_TRAINING = "post-training"
    #: prepare first, fine-tune the prepared model, then convert (QAT)
    TRAINING_AWARE = "training-aware"


@dataclass(frozen=True)
class LayerReport:
    """How one layer ended up: ``scheme`` names its numerics, ``reason`` why."""

    name: str
    module_type: str
    scheme: str
    quantized: bool
    reason: str = ""
    parameters: int = 0


@runtime_checkable
class Quantizer(Protocol):
    """Turns a float model into a quantized one.

    * ``phase``: see :class:`QuantPhase`.
    * ``needs_calibration``: whether the pipeline must run calibration batches
      through the prepared model before ``convert``.
    * ``prepare(model)``: insert observers / fake-quant (may return the model
      unchanged); the returned model is what gets trained or calibrated.
    * ``convert(model)``: return the quantized model, ready for CPU inference.
    * ``layer_report(model)``: after ``convert``, one :class:`LayerReport` per
      candidate layer (quantized or kept in float, with the reason).
    * ``engine``: the quantized engine the result needs, or ``None``.

    Optional (see :func:`optional_member`; default ``None``: not offered):

    * ``on_calibrated(model)`` → model: a training-aware quantizer that needs
      calibration gets it right after ``prepare``; this is called next, before
      training (to insert fake-quant once statistics are known).
    * ``on_train_step(step, model)``: passed to the trainer as ``on_step``.
    * ``begin_layerwise(model)`` → state: convert one decoder layer at a
      time, for models whose float weights do not fit in memory
      (:mod:`ftq_core.layerwise`).  ``model``'s parameters are on the meta
      device; the core then reads decoder layer ``i``'s weights (float32) and
      calls ``state.convert_layer(model, i)``, which swaps that layer's
      modules in place (the float weights it leaves are released); a layer
      written by an interrupted run is handed back as its saved modules
      through ``state.skip_layer(model, i, {name: module})``.  Last, with the
      embeddings, final norm and head read, ``state.finish(model)`` returns
      the converted model and fills ``layer_report``.  The artifact must hold
      what ``convert`` would have written.
    * ``layerwise_refusal()`` → ``str | None``: why this configuration
      cannot convert layer by layer (``None``: it can); asked before
      ``begin_layerwise``, so the user hears it before any weight is read.

    :class:`QuantizerBase` gives the defaults of all of these.
    """

    phase: QuantPhase
    needs_calibration: bool
    engine: str | None

    def prepare(self, model: "torch.nn.Module") -> "torch.nn.Module": ...

    def convert(self, model: "torch.nn.Module") -> "torch.nn.Module": ...

    def layer_report(self, model: "torch.nn.Module") -> list[LayerReport]: ...


#: The optional members of each protocol and the default a component that
#: lacks one gets (kept off the Protocol classes, so ``isinstance`` checks
#: still ask only for the required members).
OPTIONAL_MEMBERS: dict[str, dict[str, Any]] = {
    "DatasetBuilder": {"check": None, "block_size": 256},
    "Trainer": {"distills": False, "checkpoints_kept": 0},
    "Quantizer": {"on_calibrated": None, "on_train_step": None, "begin_layerwise": None, "layerwise_refusal": None},
    "Adapter": {"merge": False},
}


class QuantizerBase:
    """:class:`Quantizer` with its defaults: post-training, no calibration, no torch.ao engine.

    Subclass it and write what differs: ``convert`` (required), and
    ``prepare`` when the quantizer observes or trains.  ``convert`` fills
    ``self.reports`` (one :class:`LayerReport` per candidate layer), which
    ``layer_report`` returns.  Not a requirement: any object with the
    protocol's members works.
    """

    phase = QuantPhase.POST_TRAINING
    needs_calibration = False
    engine: str | None = None
    on_calibrated = None
    on_train_step = None

    def __init__(self, config: Any):
        self.config = config
        self.reports: list[LayerReport] = []

    def prepare(self, model: "torch.nn.Module") -> "torch.nn.Module":
        return model

    def convert(self, model: "torch.nn.Module") -> "torch.nn.Module":  # pragma: no cover - every quantizer defines it
        raise NotImplementedError(f"{type(self).__name__} must define convert(model)")

    def layer_report(self, model: "torch.nn.Module") -> list[LayerReport]:
        return list(self.reports)


@runtime_checkable
class ModuleCodec(Protocol):
    """Saves and rebuilds one quantized module type with tensors and JSON only.

    * ``kind``: unique name recorded in the manifest.
    * ``module_type``: the class this codec handles (exact type match).
    * ``export(module)`` → ``(tensors, meta)``: plain tensors and a JSON-able dict.
    * ``restore(tensors, meta)`` → module: the rebuilt module.
    """

    kind: str
    module_type: type

    def export(self, module: "torch.nn.Module") -> tuple[Mapping[str, "torch.Tensor"], dict]: ...

    def restore(self, tensors: Mapping[str, "torch.Tensor"], meta: dict) -> "torch.nn.Module": ...


@runtime_checkable
class Exporter(Protocol):
    """Writes a loaded artifact in a format another runtime reads (a Hugging Face directory, GGUF...).

    ``export(artifact, output_dir)`` gets a :class:`ftq_core.artifacts.LoadedArtifact`
    (``model``, ``tokenizer``, ``manifest``) and an empty directory (the core
    moves it into place once ``export`` returns); it writes there and returns
    a short description of what it wrote (shown to the user).  It may change ``artifact.model`` (the caller
    loaded it for this export alone).  Read the result back before returning
    where the format allows, so a broken export fails here, not in the
    runtime it is meant for.
    """

    def export(self, artifact: Any, output_dir: Any) -> str: ...


@runtime_checkable
class Adapter(Protocol):
    """Small trainable layers over a frozen, converted (quantized) model: LoRA and kin.

    The pipeline quantizes first, then ``attach``es the adapter, trains, and
    saves the base and the adapter side by side; loading the artifact attaches
    the adapter again through the same component.

    * ``attach(model)`` → model: add the adapter's trainable layers in place
      and freeze everything else (afterwards only adapter parameters require
      grad).  Refuse a model it cannot train over with a
      :class:`~ftq_core.errors.UsageError` naming the fix.
    * ``merge(model)`` → model: fold the trained layers into the base weights
      (requantizing quantized layers) and take them out.
    * ``detached(model)``: a context manager giving the model with the
      adapter's layers taken out (what is saved as the base), put back on exit.
    * ``files(model)`` → ``{file name: bytes}``: the adapter as the artifact
      keeps it, beside the base's files and checksummed with them.
    * ``load(model, directory)`` → model: attach the adapter ``files`` wrote
      into ``directory`` to its base.

    Optional (see :func:`optional_member`):

    * ``merge`` (an option of the adapter's config): merge after training and
      save the merged model; the report shows perplexity before and after.
      Default: ``False``.
    """

    def attach(self, model: "torch.nn.Module") -> "torch.nn.Module": ...

    def merge(self, model: "torch.nn.Module") -> "torch.nn.Module": ...

    def detached(self, model: "torch.nn.Module") -> Any: ...

    def files(self, model: "torch.nn.Module") -> Mapping[str, bytes]: ...

    def load(self, model: "torch.nn.Module", directory: Any) -> "torch.nn.Module": ...
