"""The stages of ``ftq run``, one function each, in the order :func:`run_chain` calls them.

setup (model, components, free disk, data) → evaluate the pretrained model →
prepare and train (QAT) or train and prepare (post-training), calibrating
where the quantizer asks → convert → save the artifact → evaluate the
quantized model (timed in turns with its float baseline) → write the report.
The pipeline decides the order of phases from what the quantizer declares
(:class:`ftq_core.protocols.QuantPhase`); plugins never call each other.

With an adapter the order is: prepare, calibrate and convert first (or take
an int8 artifact as it is), evaluate the int8 model, attach the adapter,
train only it, merge it if asked, then save and evaluate as above.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import weights_size
from .configs import config_to_dict
from .data import as_data_splits
from .errors import DatasetError, UsageError
from .evaluation import EvalSettings, Evaluation, decode_loop_name, evaluate, latency_in_turns
from .manifest import build_manifest, component_provenance
from .models import LoadedModel, load_model
from .preflight import check_free_space
from .protocols import (
    Adapter,
    DatasetBuilder,
    DataSplits,
    LayerReport,
    Quantizer,
    QuantPhase,
    Trainer,
    TrainResult,
    optional_member,
)
from .report import layer_summary, markdown_table, write_report
from .run_config import ResolvedRun, RunConfig

log = logging.getLogger("ftq")

__all__ = ["RunResult", "component_step", "calibrate", "run_chain"]


def component_step(plugins, component, step: str):
    """A crash of a third-party component in ``step`` as one line naming its plugin (:meth:`Plugins.guard`)."""
    return plugins.guard(component.plugin, f"{component.kind} {component.name!r} {step}")


def calibration_batches(blocks, *, batches: int, batch_size: int = 1) -> list:
    """The first ``batches`` batches of ``blocks`` (collated), the data every calibration runs on."""
    from .data import collate

    count = min(len(blocks), batches * batch_size)
    if count == 0:
        raise DatasetError(
            "calibration needs at least one block of data, and the dataset gave none; add data or lower block_size"
        )
    return [collate([blocks[i] for i in range(start, min(start + batch_size, count))])
            for start in range(0, count, batch_size)]


def calibrate(model, blocks, *, batches: int, batch_size: int = 1, progress: bool = True) -> int:
    """Run ``batches`` batches of ``blocks`` through ``model`` so its observers see real activations."""
    import torch
    from tqdm.auto import tqdm

    collated = calibration_batches(blocks, batches=batches, batch_size=batch_size)
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in tqdm(collated, desc="calibrate", unit="batch", disable=not progress):
            model(**batch.to(device).model_inputs())
    return sum(len(batch.input_ids) for batch in collated)


@dataclass
class RunResult:
    """What :func:`ftq_core.run` produced: the report rows, where things were written.

    In a data-parallel run only rank 0 evaluates and writes; the other ranks'
    results have no rows, no report and ``baseline``/``quantized`` of None,
    but the same trained and converted ``model``.
    """

    rows: list[Evaluation]
    baseline: Evaluation | None
    quantized: Evaluation | None
    artifact_dir: Path
    report_paths: dict[str, Path]
    train: TrainResult | None
    layers: list[LayerReport] = field(default_factory=list)
    model: Any = None
    rank: int = 0
    world_size: int = 1

    def table(self) -> str:
        return markdown_table(self.rows, baseline=self.baseline)


@dataclass
class _Chain:
    """What the stages share: the run's settings, its components and what each stage produced."""

    config: RunConfig
    resolved: ResolvedRun
    plugins: Any
    main: bool  # rank 0 (or a single process): evaluates and writes
    data_given: bool  # the caller's own data, not the dataset component's
    loaded: LoadedModel
    quantizer: Quantizer
    trainer: Trainer | None
    adapter: Adapter | None = None
    #: the manifest of the int8 artifact the run starts from (adapter runs on ``--model ARTIFACT``), else None
    base_manifest: dict | None = None
    adapter_attached: bool = False
    adapter_merged: bool = False
    splits: DataSplits | None = None
    rows: list[Evaluation] = field(default_factory=list)
    baseline: Evaluation | None = None
    reference: Any = None  # a float copy of the baseline row's model, kept for timing
    model_q: Any = None
    train_result: TrainResult | None = None
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def timing(self) -> bool:
        """Speeds are compared, so the float baseline and the quantized model are timed together, in turns."""
        return self.config.eval.latency and self.main

    @property
    def perplexity_only(self) -> EvalSettings:
        return dataclasses.replace(self.config.eval, latency=False)

    def step(self, component, name: str):
        return component_step(self.plugins, component, name)


def run_chain(config: RunConfig, resolved: ResolvedRun, plugins, *, dataset: DatasetBuilder | None, data,
              model: LoadedModel | None, main: bool) -> RunResult:
    """The chain of :func:`ftq_core.pipeline.run`; ``main`` is False on data-parallel ranks other than 0.

    The result's ``rank`` and ``world_size`` are the caller's to fill in.
    """
    chain = _setup(config, resolved, plugins, model=model, main=main, data_given=data is not None)
    chain.splits = _build_data(chain, dataset, data)
    if chain.base_manifest is None:
        _evaluate_pretrained(chain)
    if chain.adapter is not None:
        _convert_then_adapt(chain)
    else:
        if chain.quantizer.phase is QuantPhase.TRAINING_AWARE:
            _prepare_then_train(chain)
        else:
            _train_then_prepare(chain)
        _convert(chain)
    if not main:
        return RunResult([], None, None, chain.out / "model", {}, chain.train_result, chain.layers, chain.model_q)
    artifact_dir = _save(chain)
    quantized = _evaluate_quantized(chain, artifact_dir)
    paths = _write_report(chain, quantized)
    settle_checkpoints(chain.checkpoint_dir, keep=config.keep_checkpoints)
    return RunResult(chain.rows, chain.baseline or quantized, quantized, artifact_dir, paths, chain.train_result,
                       chain.layers, chain.model_q)


def _setup(config: RunConfig, resolved: ResolvedRun, plugins, *, model: LoadedModel | None, main: bool,
           data_given: bool) -> _Chain:
    """Load the model, create the quantizer, trainer and adapter, and check the disk can hold what the run writes."""
    with component_step(plugins, resolved.quantizer.component, "create"):
        quantizer = resolved.quantizer.component.create(resolved.quantizer.config)
    trainer = None
    if resolved.trainer is not None:
        with component_step(plugins, resolved.trainer.component, "create"):
            trainer = resolved.trainer.component.create(resolved.trainer.config)
    adapter = None
    if resolved.adapter is not None:
        with component_step(plugins, resolved.adapter.component, "create"):
            adapter = resolved.adapter.component.create(resolved.adapter.config)
    base_artifact = _base_artifact(config) if model is None and adapter is not None else None
    _check_phases(config, quantizer, trainer, adapter, base_artifact)
    base_manifest = None
    if base_artifact is not None:
        from .artifacts import load_artifact

        artifact = load_artifact(base_artifact, plugins=plugins)
        loaded = LoadedModel(artifact.model, artifact.tokenizer, str(base_artifact))
        base_manifest = artifact.manifest
    else:
        loaded = model or load_model(config.model)
    kept = optional_member(trainer, Trainer, "checkpoints_kept") if trainer is not None else 0
    if adapter is not None:
        kept = 0  # a checkpoint over a frozen base holds the adapter and its optimizer state only: small
    check_free_space(config.output_dir, loaded.model, kept)
    return _Chain(config, resolved, plugins, main, data_given, loaded, quantizer, trainer, adapter, base_manifest)


def _base_artifact(config: RunConfig) -> Path | None:
    """The int8 artifact an adapter run starts from, when ``--model`` names one (or a run directory holding one)."""
    from .artifacts import is_artifact_dir, resolve_artifact_dir

    path = resolve_artifact_dir(config.model)
    return path if path.is_dir() and is_artifact_dir(path) else None


def _manifest_adapter(directory: Path) -> dict | None:
    """The ``adapter`` entry of an artifact's manifest (read before the artifact loads), or None."""
    from .untrusted_json import parse_untrusted_json

    try:
        entry = parse_untrusted_json((directory / "manifest.json").read_text()).get("adapter")
    except (OSError, ValueError, AttributeError):
        return None  # loading the artifact reports what is wrong with it
    return entry if isinstance(entry, dict) else None


def _check_phases(config: RunConfig, quantizer: Quantizer, trainer: Trainer | None, adapter: Adapter | None,
                  base_artifact: Path | None) -> None:
    """Refuse, before the model loads, component combinations that cannot run in one chain."""
    if quantizer.phase is QuantPhase.TRAINING_AWARE and trainer is None and adapter is None:
        raise UsageError(f"quantizer {config.quantizer.name!r} trains while quantizing; set a trainer (not 'none')")
    if adapter is None:
        return
    name = config.adapter.name
    if trainer is None:
        raise UsageError(f"adapter {name!r} is trained over the quantized model; set a trainer (not 'none')")
    if optional_member(trainer, Trainer, "distills"):
        raise UsageError(
            f"adapter {name!r} trains over the quantized model with the next-token loss; distillation needs the "
            f"float model as a teacher, which only quantization-aware training keeps: set trainer.distill = 0"
        )
    if base_artifact is not None:
        saved = _manifest_adapter(base_artifact)
        if saved and not saved.get("merged"):
            raise UsageError(
                f"{config.model} already carries a {saved.get('name', '?')!r} adapter; train a new one over its base "
                f"({saved.get('base_artifact') or 'the artifact it was trained over'}), or over a merged copy "
                f"(--set adapter.merge=true when it is trained)"
            )
        if config.quantizer != RunConfig().quantizer:
            raise UsageError(
                f"{config.model} is already quantized (an ftq artifact), so the run trains adapter {name!r} over it "
                f"as it is; drop --quantizer / [quantizer] (it would quantize again)"
            )
        return
    if quantizer.phase is QuantPhase.TRAINING_AWARE:
        raise UsageError(
            f"quantizer {config.quantizer.name!r} fine-tunes the whole model while quantizing, and adapter {name!r} "
            f"trains over a model already converted; run {config.quantizer.name!r} first, then train the adapter "
            f"over its artifact: ftq run --model OUT/model --adapter {name}"
        )


def _build_data(chain: _Chain, dataset: DatasetBuilder | None, data) -> DataSplits:
    """The token blocks: from the caller's ``data`` (packed at the dataset's block size) or the dataset component."""
    from .model_config_check import check_block_size

    if data is not None:
        block = optional_member(chain.resolved.dataset.config, DatasetBuilder, "block_size")
        splits = as_data_splits(data, chain.loaded.tokenizer, block_size=block)
    else:
        with chain.step(chain.resolved.dataset.component, "build"):
            splits = dataset.build(chain.loaded.tokenizer)
    check_block_size(getattr(chain.loaded.model, "config", None), splits.block_size)  # GPT-2's learned positions end; rotary ones stretch
    if chain.main:
        log.info("model: %s", chain.loaded.source)
        log.info("data: %s", splits.description)
    return splits


def _evaluate_pretrained(chain: _Chain) -> None:
    """The float model before any training: a row of the table (perplexity; it shares the baseline's speed)."""
    if chain.config.evaluate_pretrained and chain.main:
        log.info("evaluating the float model before fine-tuning")
        chain.rows.append(evaluate(chain.loaded.model, "fp32 pretrained", chain.splits.eval, chain.perplexity_only))


def _prepare_and_calibrate(chain: _Chain, model):
    """``quantizer.prepare``, then calibration batches if the quantizer needs them; the prepared model."""
    quantizer, component = chain.quantizer, chain.resolved.quantizer.component
    with chain.step(component, "prepare"):
        prepared = quantizer.prepare(model)
    if quantizer.needs_calibration:
        with chain.step(component, "calibration"):
            calibrate(prepared, chain.splits.train, batches=chain.config.calibration_batches)
    return prepared


def _prepare_then_train(chain: _Chain) -> None:
    """Quantization-aware: prepare (fake-quant), calibrate if asked, then fine-tune the prepared model."""
    float_model, trainer = chain.loaded.model, chain.trainer
    # A trainer that distils learns from the float model's outputs: a copy from before prepare changes it.
    teacher = copy.deepcopy(float_model) if optional_member(trainer, Trainer, "distills") else None
    if chain.timing and chain.rows:
        chain.reference = teacher if teacher is not None else copy.deepcopy(float_model)
    model_q = _prepare_and_calibrate(chain, float_model)
    on_calibrated = optional_member(chain.quantizer, Quantizer, "on_calibrated")
    if chain.quantizer.needs_calibration and on_calibrated is not None:  # e.g. fake-quant placed once ranges are known
        with chain.step(chain.resolved.quantizer.component, "calibration"):
            model_q = on_calibrated(model_q)
    with chain.step(chain.resolved.trainer.component, "train"):
        chain.train_result = trainer.train(
            model_q, chain.splits, checkpoint_dir=str(chain.checkpoint_dir), resume=chain.config.resume,
            on_step=optional_member(chain.quantizer, Quantizer, "on_train_step"),
            **({"teacher": teacher} if teacher is not None else {}),
        )
    chain.model_q = model_q
    chain.baseline = chain.rows[0] if chain.rows else None


def _train_then_prepare(chain: _Chain) -> None:
    """Post-training: fine-tune in float (if there is a trainer) and evaluate that, then prepare and calibrate."""
    float_model = chain.loaded.model
    if chain.trainer is not None:
        with chain.step(chain.resolved.trainer.component, "train"):
            chain.train_result = chain.trainer.train(float_model, chain.splits, checkpoint_dir=str(chain.checkpoint_dir),
                                                     resume=chain.config.resume)
        float_model.to("cpu")
        if chain.main:
            log.info("evaluating the fine-tuned float model")
            chain.rows.append(evaluate(float_model, "fp32 fine-tuned", chain.splits.eval, chain.perplexity_only))
    chain.baseline = chain.rows[-1] if chain.rows else None
    if chain.timing and chain.rows:
        chain.reference = copy.deepcopy(float_model)  # prepare/convert change the float model in place
    chain.model_q = _prepare_and_calibrate(chain, float_model)


def _convert_then_adapt(chain: _Chain) -> None:
    """Quantize (or take the int8 artifact as it is), evaluate it, then train only the adapter over it."""
    config, adapter, trainer = chain.config, chain.adapter, chain.trainer
    if chain.base_manifest is None:
        chain.baseline = chain.rows[-1] if chain.rows else None
        if chain.timing and chain.rows:
            chain.reference = copy.deepcopy(chain.loaded.model)  # prepare/convert change the float model in place
        chain.model_q = _prepare_and_calibrate(chain, chain.loaded.model)
        _convert(chain)
    else:
        chain.model_q = chain.loaded.model
        chain.layers = _saved_layers(chain.base_manifest, chain.loaded.source)
    untuned = _quantized_name(chain)
    if chain.main:
        log.info("evaluating %s before training adapter %r", untuned, config.adapter.name)
        chain.rows.append(evaluate(chain.model_q, untuned, chain.splits.eval, chain.perplexity_only))
        if chain.baseline is None:  # no float model in the run: the table compares with the untuned int8 one
            chain.baseline = chain.rows[-1]
    component = chain.resolved.adapter.component
    with chain.step(component, "attach"):
        chain.model_q = adapter.attach(chain.model_q)
    chain.adapter_attached = True
    with chain.step(chain.resolved.trainer.component, "train"):
        chain.train_result = trainer.train(chain.model_q, chain.splits, checkpoint_dir=str(chain.checkpoint_dir),
                                           resume=config.resume)
    chain.model_q.to("cpu").eval()  # int8 inference runs on the CPU
    if optional_member(chain.resolved.adapter.config, Adapter, "merge"):
        if chain.main:
            log.info("evaluating the adapter before merging it")
            chain.rows.append(evaluate(chain.model_q, f"{untuned} + {config.adapter.name} (unmerged)", chain.splits.eval,
                                       chain.perplexity_only))
        with chain.step(component, "merge"):
            chain.model_q = adapter.merge(chain.model_q)
        chain.adapter_merged = True


def _saved_layers(manifest: dict, where: str) -> list[LayerReport]:
    """The layer report an artifact's manifest records."""
    from .errors import ArtifactError

    try:
        return [LayerReport(**layer) for layer in manifest.get("layers", [])]
    except TypeError as exc:
        raise ArtifactError(f"the manifest of {where} has a malformed layer table ({exc}); write the artifact again") from None


def _quantized_name(chain: _Chain) -> str:
    """The table's name for the quantized model before any adapter, e.g. ``int8 dynamic``."""
    if chain.base_manifest is not None:
        return quantized_label(chain.base_manifest.get("method", "artifact"), chain.layers)
    return quantized_label(chain.config.quantizer.name, chain.layers)


def _convert(chain: _Chain) -> None:
    log.info("converting with %s", chain.config.quantizer.name)
    with chain.step(chain.resolved.quantizer.component, "convert"):
        chain.model_q = chain.quantizer.convert(chain.model_q)
        chain.layers = chain.quantizer.layer_report(chain.model_q)
    from .layers import own_storages

    own_storages(chain.model_q)  # let go of the float weights' file map (see own_storages)


def _components(chain: _Chain, *, with_dataset: bool) -> dict[str, dict[str, str]]:
    plugins, resolved = chain.plugins, chain.resolved
    if chain.base_manifest is not None:  # quantized by the run that wrote the base artifact
        components = {"quantizer": chain.base_manifest.get("components", {}).get("quantizer", {})}
    else:
        components = {"quantizer": component_provenance(plugins, resolved.quantizer.component)}
    if resolved.trainer is not None:
        components["trainer"] = component_provenance(plugins, resolved.trainer.component)
    if resolved.adapter is not None:
        components["adapter"] = component_provenance(plugins, resolved.adapter.component)
    if with_dataset:
        components["dataset"] = component_provenance(plugins, resolved.dataset.component)
    return components


def _save(chain: _Chain) -> Path:
    from .artifacts import save_artifact

    method, options, engine = _quantization(chain)
    manifest = build_manifest(
        method=method,
        quantizer_options=options,
        engine=engine,
        layers=chain.layers,
        source_model=chain.base_manifest.get("source_model", chain.loaded.source) if chain.base_manifest else chain.loaded.source,
        components=_components(chain, with_dataset=not chain.data_given),
        splits=chain.splits,
    )
    if chain.adapter is None:
        return save_artifact(chain.model_q, chain.loaded.tokenizer, chain.out / "model", manifest=manifest,
                             plugins=chain.plugins)
    component = chain.resolved.adapter.component
    manifest["adapter"] = {"name": component.name, "options": config_to_dict(chain.resolved.adapter.config),
                           "merged": chain.adapter_merged}
    if chain.base_manifest is not None:
        manifest["base_artifact"] = chain.loaded.source
    if chain.adapter_merged:  # folded into the int8 weights: a plain int8 model
        return save_artifact(chain.model_q, chain.loaded.tokenizer, chain.out / "model", manifest=manifest,
                             plugins=chain.plugins)
    with chain.step(component, "save"):
        files = dict(chain.adapter.files(chain.model_q))
    _check_adapter_files(component, files)
    manifest["adapter"]["files"] = sorted(files)
    with chain.step(component, "save"), chain.adapter.detached(chain.model_q) as base:
        return save_artifact(base, chain.loaded.tokenizer, chain.out / "model", manifest=manifest,
                             plugins=chain.plugins, extra_files=files)


#: Files of an artifact an adapter's files may not replace (tokenizer files start with these too).
_BASE_FILE_PREFIXES = ("model.", "config.json", "manifest.json", "tokenizer", "special_tokens_map", "generation_config",
                       "vocab", "merges", "chat_template")


def _check_adapter_files(component, files: dict) -> None:
    """Refuse adapter file names that would leave the artifact, replace its base files, or hold pickles or code."""
    import re

    from .errors import PluginError
    from .file_safety import CODE_SUFFIXES, PICKLE_SUFFIXES

    for name, data in files.items():
        why = None
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            why = "is not a plain file name"
        elif name.startswith(_BASE_FILE_PREFIXES):
            why = "would replace a file of the base model"
        elif name.lower().endswith(PICKLE_SUFFIXES + CODE_SUFFIXES):
            why = "has a pickle or code suffix, which artifacts never hold"
        elif not isinstance(data, bytes):
            why = f"is given as {type(data).__name__}, not bytes"
        if why:
            raise PluginError(f"adapter {component.name!r} (plugin {component.plugin!r}) asked to save {name!r}, which "
                              f"{why}; the plugin must name its files differently")


def _quantization(chain: _Chain) -> tuple[str, dict, str | None]:
    """The quantizer name, options and engine the artifact records: this run's, or its base artifact's."""
    if chain.base_manifest is not None:
        base = chain.base_manifest
        return base.get("method", "artifact"), base.get("quantizer_options", {}), base.get("engine")
    return chain.config.quantizer.name, config_to_dict(chain.resolved.quantizer.config), chain.quantizer.engine


def adapted_label(label: str, adapter: str, *, merged: bool) -> str:
    """The table's name for a quantized model with an adapter, e.g. ``int8 dynamic + lora (merged)``."""
    return f"{label} + {adapter}" + (" (merged)" if merged else "")


def _evaluate_quantized(chain: _Chain, artifact_dir: Path) -> Evaluation:
    """The quantized row; with timing on, measured in turns with the float baseline (see :func:`time_in_turns`)."""
    log.info("saved %s; evaluating the quantized model", artifact_dir)
    label = _quantized_name(chain)
    maker = _components(chain, with_dataset=False)["quantizer"]
    if maker.get("source", "built-in") != "built-in":  # a third-party quantizer is named with its package in the table
        parts = (maker.get("distribution") or maker.get("plugin"), maker.get("version"))
        label += f" ({' '.join(str(part) for part in parts if part)})"
    if chain.adapter is not None:
        label = adapted_label(label, chain.config.adapter.name, merged=chain.adapter_merged)
    settings = chain.perplexity_only if chain.reference is not None else chain.config.eval
    quantized = evaluate(chain.model_q, label, chain.splits.eval, settings, size_bytes=weights_size(artifact_dir))
    chain.rows.append(quantized)
    if chain.reference is not None:
        time_in_turns(chain.rows, chain.baseline, chain.reference, quantized, chain.model_q, chain.config.eval)
        chain.reference = None
    return quantized


def _write_report(chain: _Chain, quantized: Evaluation) -> dict[str, Path]:
    import torch

    config, resolved = chain.config, chain.resolved
    components = _components(chain, with_dataset=not chain.data_given)
    layer_dicts = [asdict(layer) for layer in chain.layers]
    method, options, engine = _quantization(chain)
    report = {
        "model": chain.loaded.source,
        "dataset": chain.splits.description,
        "quantizer": {"name": method, "options": options, "engine": engine, "plugin": components["quantizer"]},
        "adapter": None if resolved.adapter is None else {
            "name": config.adapter.name, "options": config_to_dict(resolved.adapter.config), "merged": chain.adapter_merged},
        "components": components,
        "trainer": None if chain.train_result is None else vars(chain.train_result),
        "rows": [row.to_dict() for row in chain.rows],
        "baseline": (chain.baseline or quantized).label,
        "layers": layer_dicts,
        "layers_summary": layer_summary(layer_dicts),
        "eval_settings": config_to_dict(config.eval),
        "threads": torch.get_num_threads(),
    }
    title = f"ftq run: {method}" + (f" + {config.adapter.name}" if resolved.adapter is not None else "") + f" on {config.model}"
    return write_report(chain.out, report, chain.rows, title=title)


def time_in_turns(rows: list[Evaluation], baseline: Evaluation, reference, quantized: Evaluation, model_q,
                  settings: EvalSettings) -> None:
    """Measure the baseline's float model and the quantized one in turns; other float rows share the float speed."""
    log.info("measuring prefill and decode speed: %s and %s in turns", baseline.label, quantized.label)
    reference.to("cpu").eval()  # int8 runs on the CPU; so is the float model it is compared with
    speeds = latency_in_turns({baseline.label: reference, quantized.label: model_q}, settings)
    for row, model in ((baseline, reference), (quantized, model_q)):
        measured = speeds[row.label]
        row.prefill_ms, row.decode_tokens_per_s = measured["prefill_ms"], measured["decode_tokens_per_s"]
        row.extra["latency"] = {k: round(v, 3) for k, v in measured.items()}
        row.extra["decode_loop"] = decode_loop_name(model, compile=settings.compile, new_tokens=settings.decode_tokens)
    for row in rows:
        if row.prefill_ms is None and row.label.startswith("fp32"):  # same architecture as the baseline
            row.prefill_ms, row.decode_tokens_per_s = baseline.prefill_ms, baseline.decode_tokens_per_s
            row.extra["latency_from"] = baseline.label


def quantized_label(name: str, layers: list[LayerReport]) -> str:
    """The table's name for a quantized model: its layers' precision and the quantizer, e.g. ``int8 dynamic``.

    The precision is the first word of the scheme most quantized layers
    report, so a 4-bit quantizer reads ``int4 NAME``, not ``int8 NAME``.
    """
    precisions = Counter(layer.scheme.split()[0] for layer in layers if layer.quantized and layer.scheme)
    return f"{precisions.most_common(1)[0][0]} {name}" if precisions else name


def settle_checkpoints(directory: Path, *, keep: bool) -> None:
    """After a completed run: delete its checkpoints (they only serve to resume it), or say where they are kept."""
    import shutil

    if directory.is_symlink() or not directory.is_dir():
        return  # never another directory's checkpoints (the run refuses a linked one before it starts)
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())
    if keep:
        log.info("checkpoints kept at %s (%.0f MB)", directory, size / 2**20)
        return
    shutil.rmtree(directory, ignore_errors=True)
    log.info("removed the run's checkpoints (%.0f MB) now that it completed; --set keep_checkpoints=true keeps them",
             size / 2**20)
