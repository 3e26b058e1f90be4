"""The chain: load model → dataset → (prepare) → train or calibrate → convert → evaluate → save.

The pipeline decides the order of phases from what the quantizer declares
(:class:`ftq_core.protocols.QuantPhase`); plugins never call each other.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .artifacts import LoadedArtifact, check_replaceable, load_artifact, resolve_artifact_dir, save_artifact
from .configs import config_to_dict
from .data import as_data_splits
from .distributed import barrier, process_group
from .errors import DatasetError, UsageError
from .evaluation import EvalSettings, Evaluation, decode_loop_name, evaluate, latency_in_turns, state_bytes
from .models import LoadedModel, load_model
from .output_lock import LOCK_NAME, output_lock
from .plugins import get_plugins
from .preflight import check_free_space
from .protocols import DataSplits, LayerReport, QuantPhase, TrainResult
from .report import layer_summary, markdown_table, write_report
from .run_config import RunConfig, resolve, run_config_from_mapping

log = logging.getLogger("ftq")

__all__ = [
    "RunResult", "QuantizeResult", "run", "quantize", "quantize_to_artifact", "calibrate", "load", "evaluate_artifact",
]


@dataclass
class QuantizeResult:
    model: Any
    layers: list[LayerReport]
    engine: str | None
    quantizer: str
    options: dict[str, Any]


@dataclass
class RunResult:
    """What :func:`run` produced: the report rows, where things were written.

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


def calibrate(model, blocks, *, batches: int, batch_size: int = 1, progress: bool = True) -> int:
    """Run ``batches`` batches of ``blocks`` through ``model`` so its observers see real activations."""
    import torch
    from tqdm.auto import tqdm

    count = min(len(blocks), batches * batch_size)
    if count == 0:
        raise DatasetError(
            "calibration needs at least one block of data, and the dataset gave none; add data or lower block_size"
        )
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, count, batch_size), desc="calibrate", unit="batch", disable=not progress):
            batch = torch.stack([blocks[i] for i in range(start, min(start + batch_size, count))])
            model(input_ids=batch.to(next(model.parameters()).device))
    return count


def quantize(
    model,
    quantizer: str = "dynamic",
    options: Mapping[str, Any] | None = None,
    *,
    calibration_data=None,
    tokenizer=None,
    calibration_batches: int = 8,
    plugins=None,
) -> QuantizeResult:
    """Quantize a float model with a registered quantizer (post-training).

    ``calibration_data`` (texts, a Dataset of token blocks, or DataSplits) is
    needed by quantizers that calibrate; texts also need ``tokenizer``.
    """
    plugins = plugins or get_plugins()
    component = plugins.get("quantizer", quantizer)
    config = component.make_config(options)
    with _step(plugins, component, "create"):
        instance = component.create(config)
    if instance.phase is QuantPhase.TRAINING_AWARE:
        raise UsageError(
            f"quantizer {quantizer!r} is quantization-aware training: it needs a fine-tune between prepare and "
            f"convert. Use ftq_core.run (ftq run) with a trainer instead."
        )
    if instance.needs_calibration and calibration_data is None:
        raise UsageError(f"quantizer {quantizer!r} needs calibration data; pass calibration_data=")
    with _step(plugins, component, "prepare"):
        model = instance.prepare(model)
    if instance.needs_calibration:
        splits = as_data_splits(calibration_data, tokenizer)
        with _step(plugins, component, "calibration"):
            calibrate(model, splits.train, batches=calibration_batches)
    with _step(plugins, component, "convert"):
        model = instance.convert(model)
        layers = instance.layer_report(model)
    return QuantizeResult(model, layers, instance.engine, quantizer, config_to_dict(config))


def _step(plugins, component, step: str):
    """A crash of a third-party component in ``step`` as one line naming its plugin (:meth:`Plugins.guard`)."""
    return plugins.guard(component.plugin, f"{component.kind} {component.name!r} {step}")


def _provenance(plugins, component) -> dict[str, str]:
    """The component's name and the plugin, package and version it came from (for manifest and report)."""
    return {"name": component.name, **plugins.provenance(component.plugin)}


def quantize_to_artifact(
    model_source: str,
    output_dir,
    quantizer: str = "dynamic",
    options: Mapping[str, Any] | None = None,
    *,
    data_path: str | None = None,
    plugins=None,
) -> tuple[Path, QuantizeResult]:
    """Quantize a float model (bundled name, .gguf, HF directory) without fine-tuning and save the artifact.

    Everything that can refuse -- the quantizer's options, the output
    directory, the calibration file, another ftq writing there -- is checked
    before the model loads.
    """
    plugins = plugins or get_plugins()
    target = Path(output_dir)
    component = plugins.get("quantizer", quantizer)
    with _step(plugins, component, "create"):
        needs_calibration = component.create(component.make_config(options)).needs_calibration
    check_replaceable(target.absolute())
    _check_output_dir(target)
    dataset = None
    if needs_calibration:
        text = plugins.get("dataset", "text")
        dataset = _checked_dataset(plugins, text, text.make_config({"path": data_path} if data_path else {}))
    lock = target.absolute().parent / f".{target.name}{LOCK_NAME}"
    with output_lock(lock, what=f"artifact directory {target}"):
        loaded = load_model(model_source)
        check_free_space(target, loaded.model, None)  # before quantizing, not after
        calibration = dataset.build(loaded.tokenizer) if dataset is not None else None
        result = quantize(loaded.model, quantizer, options, calibration_data=calibration, tokenizer=loaded.tokenizer,
                          plugins=plugins)
        manifest = {
            "method": quantizer,
            "quantizer_options": result.options,
            "engine": result.engine,
            "layers": [asdict(layer) for layer in result.layers],
            "source_model": loaded.source,
            "components": {"quantizer": _provenance(plugins, component)},
        }
        path = save_artifact(result.model, loaded.tokenizer, target, manifest=manifest, plugins=plugins)
    return path, result


def _check_output_dir(path: Path) -> None:
    """Fail before any training if the output directory cannot be written."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output directory {path} is a file; choose another --output-dir")
    probe_parent = path if path.exists() else path.parent
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    try:
        probe = probe_parent / f".ftq-write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write to output directory {path} ({exc.strerror}); choose another --output-dir") from None
    # Free space is checked once the model's size is known (preflight.check_free_space).


def run(config: RunConfig | Mapping[str, Any] | None = None, *, data=None, model: LoadedModel | None = None, plugins=None) -> RunResult:
    """Run the whole chain and write the artifact and report under ``config.output_dir``.

    ``data`` overrides the dataset plugin with texts, a Dataset of token blocks
    or DataSplits; ``model`` overrides ``config.model`` with an already loaded one.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), every rank trains its share
    of each batch under DDP and converts; rank 0 alone evaluates and writes
    the artifact and report while the others wait (:mod:`ftq_core.distributed`).
    """
    import torch

    if config is None:
        config = RunConfig()
    plugins = plugins or get_plugins()
    if isinstance(config, Mapping):
        config = run_config_from_mapping(config, plugins=plugins)
    resolved = resolve(config, plugins)  # every config problem, before any slow work
    out = Path(config.output_dir)
    dataset = _preflight(out, resolved, plugins, own_data=data is not None)
    with process_group(use_cuda=torch.cuda.is_available()) as rank:
        # rank 0 alone writes, so it alone holds the output directory's lock
        lock = output_lock(out / LOCK_NAME, what=f"output directory {out}") if rank.is_main else contextlib.nullcontext()
        with lock:
            result = _run_chain(config, resolved, plugins, dataset=dataset, data=data, model=model, main=rank.is_main)
        barrier()  # the other ranks wait for rank 0's artifact and report
    result.rank, result.world_size = rank.rank, rank.world_size
    return result


def _preflight(out: Path, resolved, plugins, *, own_data: bool):
    """Every check that can refuse the run and needs no model: output directory, data file.

    Returns the dataset component instance (None when the caller passed its own data).
    """
    _check_output_dir(out)
    check_replaceable((out / "model").absolute())
    if own_data:
        return None
    return _checked_dataset(plugins, *resolved.dataset)


def _checked_dataset(plugins, component, config):
    """The dataset component built from ``config``, its cheap checks passed (before any model loads)."""
    with _step(plugins, component, "create"):
        dataset = component.create(config)
    check = getattr(dataset, "check", None)  # optional in the DatasetBuilder protocol
    if check is not None:
        with _step(plugins, component, "check"):
            check()
    return dataset


def _run_chain(config: RunConfig, resolved, plugins, *, dataset, data, model: LoadedModel | None, main: bool) -> RunResult:
    """The chain of :func:`run`; ``main`` is False on data-parallel ranks other than 0."""
    out = Path(config.output_dir)
    loaded = model or load_model(config.model)
    float_model, tokenizer = loaded.model, loaded.tokenizer
    check_free_space(out, float_model, resolved.trainer[1] if resolved.trainer else None)
    dataset_component, dataset_config = resolved.dataset
    if data is not None:
        block = getattr(dataset_config, "block_size", 256)
        splits: DataSplits = as_data_splits(data, tokenizer, block_size=block)
    else:
        with _step(plugins, dataset_component, "build"):
            splits = dataset.build(tokenizer)
    if main:
        log.info("model: %s", loaded.source)
        log.info("data: %s", splits.description)

    settings: EvalSettings = config.eval
    rows: list[Evaluation] = []
    quantizer_component, quantizer_config = resolved.quantizer
    with _step(plugins, quantizer_component, "create"):
        quantizer = quantizer_component.create(quantizer_config)
    trainer = None
    if resolved.trainer:
        with _step(plugins, resolved.trainer[0], "create"):
            trainer = resolved.trainer[0].create(resolved.trainer[1])
    # Speeds are compared, so the float baseline and the quantized model are
    # timed together, in turns, once both exist (see _time_in_turns); float
    # rows measure perplexity only.
    timing = settings.latency and main
    perplexity_only = dataclasses.replace(settings, latency=False)
    if config.evaluate_pretrained and main:
        log.info("evaluating the float model before fine-tuning")
        rows.append(evaluate(float_model, "fp32 pretrained", splits.eval, perplexity_only))
    reference = None  # a float copy of the baseline row's model, kept for timing
    checkpoint_dir = str(out / "checkpoints")
    train_result = None

    if quantizer.phase is QuantPhase.TRAINING_AWARE:
        if trainer is None:
            raise UsageError(f"quantizer {config.quantizer.name!r} trains while quantizing; set a trainer (not 'none')")
        # A trainer that distils (option ``distill``) learns from the float model's outputs.
        teacher = copy.deepcopy(float_model) if getattr(resolved.trainer[1], "distill", 0) else None
        if timing and rows:
            reference = teacher if teacher is not None else copy.deepcopy(float_model)
        with _step(plugins, quantizer_component, "prepare"):
            model_q = quantizer.prepare(float_model)
        if quantizer.needs_calibration:  # e.g. outlier statistics gathered before fake-quant goes in
            with _step(plugins, quantizer_component, "calibration"):
                calibrate(model_q, splits.train, batches=config.calibration_batches)
                on_calibrated = getattr(quantizer, "on_calibrated", None)
                if on_calibrated is not None:
                    model_q = on_calibrated(model_q)
        with _step(plugins, resolved.trainer[0], "train"):
            train_result = trainer.train(model_q, splits, checkpoint_dir=checkpoint_dir, resume=config.resume,
                                         on_step=getattr(quantizer, "on_train_step", None),
                                         **({"teacher": teacher} if teacher is not None else {}))
        del teacher
        baseline = rows[0] if rows else None
    else:
        if trainer is not None:
            with _step(plugins, resolved.trainer[0], "train"):
                train_result = trainer.train(float_model, splits, checkpoint_dir=checkpoint_dir, resume=config.resume)
            float_model.to("cpu")
            if main:
                log.info("evaluating the fine-tuned float model")
                rows.append(evaluate(float_model, "fp32 fine-tuned", splits.eval, perplexity_only))
        baseline = rows[-1] if rows else None
        if timing and rows:
            reference = copy.deepcopy(float_model)  # prepare/convert change the float model in place
        with _step(plugins, quantizer_component, "prepare"):
            model_q = quantizer.prepare(float_model)
        if quantizer.needs_calibration:
            with _step(plugins, quantizer_component, "calibration"):
                calibrate(model_q, splits.train, batches=config.calibration_batches)
    log.info("converting with %s", config.quantizer.name)
    with _step(plugins, quantizer_component, "convert"):
        model_q = quantizer.convert(model_q)
        layers = quantizer.layer_report(model_q)
    if not main:
        return RunResult([], None, None, out / "model", {}, train_result, layers, model_q)
    layer_dicts = [asdict(layer) for layer in layers]
    components = {"quantizer": _provenance(plugins, quantizer_component)}
    if resolved.trainer:
        components["trainer"] = _provenance(plugins, resolved.trainer[0])
    if data is None:
        components["dataset"] = _provenance(plugins, dataset_component)
    manifest = {
        "method": config.quantizer.name,
        "quantizer_options": config_to_dict(quantizer_config),
        "engine": quantizer.engine,
        "layers": layer_dicts,
        "source_model": loaded.source,
        "dataset_fingerprint": splits.fingerprint,
        "dataset": splits.description,
        "components": components,
    }
    artifact_dir = save_artifact(model_q, tokenizer, out / "model", manifest=manifest, plugins=plugins)
    log.info("saved %s; evaluating the quantized model", artifact_dir)
    label = _quantized_label(config.quantizer.name, layers)
    maker = components["quantizer"]
    if maker["source"] != "built-in":  # a third-party quantizer is named with its package in the table
        label += f" ({' '.join(part for part in (maker['distribution'] or maker['plugin'], maker['version']) if part)})"
    quantized = evaluate(model_q, label, splits.eval, perplexity_only if reference is not None else settings,
                         size_bytes=(artifact_dir / "model.safetensors").stat().st_size)
    rows.append(quantized)
    if reference is not None:
        _time_in_turns(rows, baseline, reference, quantized, model_q, settings)
        del reference
    baseline = baseline or quantized
    report = {
        "model": loaded.source,
        "dataset": splits.description,
        "quantizer": {"name": config.quantizer.name, "options": config_to_dict(quantizer_config), "engine": quantizer.engine,
                      "plugin": components["quantizer"]},
        "components": components,
        "trainer": None if train_result is None else vars(train_result),
        "rows": [row.to_dict() for row in rows],
        "baseline": baseline.label,
        "layers": layer_dicts,
        "layers_summary": layer_summary(layer_dicts),
        "eval_settings": config_to_dict(settings),
        "threads": _threads(),
    }
    paths = write_report(out, report, rows, title=f"ftq run: {config.quantizer.name} on {config.model}")
    _settle_checkpoints(Path(checkpoint_dir), keep=config.keep_checkpoints)
    return RunResult(rows, baseline, quantized, artifact_dir, paths, train_result, layers, model_q)


def _time_in_turns(rows: list[Evaluation], baseline: Evaluation, reference, quantized: Evaluation, model_q,
                   settings: EvalSettings) -> None:
    """Measure the baseline's float model and the quantized one in turns; other float rows share the float speed."""
    log.info("measuring prefill and decode speed: %s and %s in turns", baseline.label, quantized.label)
    reference.to("cpu").eval()  # int8 runs on the CPU; so is the float model it is compared with
    speeds = latency_in_turns({baseline.label: reference, quantized.label: model_q}, settings)
    for row, model in ((baseline, reference), (quantized, model_q)):
        measured = speeds[row.label]
        row.prefill_ms, row.decode_tokens_per_s = measured["prefill_ms"], measured["decode_tokens_per_s"]
        row.extra["latency"] = {k: round(v, 3) for k, v in measured.items()}
        row.extra["decode_loop"] = decode_loop_name(model)
    for row in rows:
        if row.prefill_ms is None and row.label.startswith("fp32"):  # same architecture as the baseline
            row.prefill_ms, row.decode_tokens_per_s = baseline.prefill_ms, baseline.decode_tokens_per_s
            row.extra["latency_from"] = baseline.label


def _quantized_label(name: str, layers: list[LayerReport]) -> str:
    """The table's name for a quantized model: its layers' precision and the quantizer, e.g. ``int8 dynamic``.

    The precision is the first word of the scheme most quantized layers
    report, so a 4-bit quantizer reads ``int4 NAME``, not ``int8 NAME``.
    """
    from collections import Counter

    precisions = Counter(layer.scheme.split()[0] for layer in layers if layer.quantized and layer.scheme)
    return f"{precisions.most_common(1)[0][0]} {name}" if precisions else name


def _settle_checkpoints(directory: Path, *, keep: bool) -> None:
    """After a completed run: delete its checkpoints (they only serve to resume it), or say where they are kept."""
    import shutil

    if not directory.is_dir():
        return
    size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())
    if keep:
        log.info("checkpoints kept at %s (%.0f MB)", directory, size / 2**20)
        return
    shutil.rmtree(directory, ignore_errors=True)
    log.info("removed the run's checkpoints (%.0f MB) now that it completed; --set keep_checkpoints=true keeps them",
             size / 2**20)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def load(directory) -> LoadedArtifact:
    """Load an artifact written by :func:`run` or ``ftq quantize`` (verified, never unpickled).

    ``directory`` may also be a run's output directory: its ``model/`` is loaded.
    """
    return load_artifact(resolve_artifact_dir(directory))


def evaluate_artifact(
    directory,
    *,
    data=None,
    settings: EvalSettings | None = None,
    dataset: str = "text",
    dataset_options: Mapping | None = None,
    plugins=None,
) -> Evaluation:
    """Evaluate a saved artifact (or a run directory's ``model/``) on held-out data.

    ``data`` (texts, a Dataset of token blocks, DataSplits) or the ``dataset``
    component with ``dataset_options`` (the bundled sample by default); the
    dataset's checks run before the model loads.
    """
    plugins = plugins or get_plugins()
    builder = None
    if data is None:
        component = plugins.get("dataset", dataset)
        builder = _checked_dataset(plugins, component, component.make_config(dataset_options or {}))
    artifact = load(directory)
    if builder is None:
        splits = as_data_splits(data, artifact.tokenizer)
    else:
        with _step(plugins, component, "build"):
            splits = builder.build(artifact.tokenizer)
    size = (resolve_artifact_dir(directory) / "model.safetensors").stat().st_size
    return evaluate(artifact.model, artifact.manifest.get("method", "model"), splits.eval, settings or EvalSettings(), size_bytes=size)
