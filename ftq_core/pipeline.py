"""ftq's Python API: ``run`` (the whole chain), ``quantize``, ``quantize_to_artifact``, ``load``, ``evaluate_artifact``.

Each function checks everything that can refuse before the slow work (model
loading, training).  The stages of ``run`` are in :mod:`ftq_core.stages`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from .artifacts import (
    LoadedArtifact,
    check_replaceable,
    is_artifact_dir,
    load_artifact,
    new_staging_dir,
    resolve_artifact_dir,
    save_artifact,
    weights_size,
)
from .configs import config_to_dict
from .data import as_data_splits
from .distributed import barrier, process_group
from .errors import UsageError
from .evaluation import EvalSettings, Evaluation, evaluate
from .file_safety import plain_directory_problem
from .manifest import build_manifest, component_provenance
from .memory_plan import Layerwise
from .model_config_check import check_block_size
from .models import LoadedModel, lazy_model_dir, load_model
from .output_lock import run_lock, target_lock
from .plugins import get_plugins
from .preflight import check_free_space
from .protocols import DatasetBuilder, LayerReport, Quantizer, QuantPhase, optional_member
from .run_config import ResolvedRun, RunConfig, resolve, run_config_from_mapping
from .stages import RunResult, adapted_label, calibrate, calibration_batches, component_step, run_chain

log = logging.getLogger("ftq")

__all__ = [
    "RunResult", "QuantizeResult", "run", "quantize", "quantize_to_artifact", "calibrate", "load", "evaluate_artifact",
    "export",
]


#: Batches (of one block each) post-training quantizers calibrate on.
CALIBRATION_BATCHES = 8


@dataclass
class QuantizeResult:
    model: Any
    layers: list[LayerReport]
    engine: str | None
    quantizer: str
    options: dict[str, Any]


def quantize(
    model,
    quantizer: str = "dynamic",
    options: Mapping[str, Any] | None = None,
    *,
    calibration_data=None,
    tokenizer=None,
    calibration_batches: int = CALIBRATION_BATCHES,
    plugins=None,
) -> QuantizeResult:
    """Quantize a float model with a registered quantizer (post-training).

    ``calibration_data`` (texts, a Dataset of token blocks, or DataSplits) is
    needed by quantizers that calibrate; texts also need ``tokenizer``.
    """
    plugins = plugins or get_plugins()
    component = plugins.get("quantizer", quantizer)
    config = component.make_config(options)
    with component_step(plugins, component, "create"):
        instance = component.create(config)
    if instance.phase is QuantPhase.TRAINING_AWARE:
        raise UsageError(
            f"quantizer {quantizer!r} is quantization-aware training: it needs a fine-tune between prepare and "
            f"convert. Use ftq_core.run (ftq run) with a trainer instead."
        )
    if instance.needs_calibration and calibration_data is None:
        raise UsageError(f"quantizer {quantizer!r} needs calibration data; pass calibration_data=")
    with component_step(plugins, component, "prepare"):
        model = instance.prepare(model)
    if instance.needs_calibration:
        splits = as_data_splits(calibration_data, tokenizer)
        with component_step(plugins, component, "calibration"):
            calibrate(model, splits.train, batches=calibration_batches)
    with component_step(plugins, component, "convert"):
        model = instance.convert(model)
        layers = instance.layer_report(model)
    from .layers import own_storages

    own_storages(model)  # let go of the float weights' file map (see own_storages)
    return QuantizeResult(model, layers, instance.engine, quantizer, config_to_dict(config))


def quantize_to_artifact(
    model_source: str,
    output_dir,
    quantizer: str = "dynamic",
    options: Mapping[str, Any] | None = None,
    *,
    data_path: str | None = None,
    plugins=None,
    layerwise: Layerwise | str = Layerwise.AUTO,
) -> tuple[Path, QuantizeResult]:
    """Quantize a float model (bundled name, .gguf, HF directory) without fine-tuning and save the artifact.

    Everything that can refuse -- the quantizer's options, the output
    directory, the calibration file, another ftq writing there, memory the
    model will not fit in -- is checked before the model loads.
    ``layerwise``: load one decoder layer at a time (``on``), the whole model
    (``off``), or whichever fits in memory (``auto``; see :mod:`ftq_core.layerwise`).
    """
    plugins = plugins or get_plugins()
    target = Path(output_dir)
    layerwise = _layerwise_mode(layerwise)
    component = plugins.get("quantizer", quantizer)
    config = component.make_config(options)
    with component_step(plugins, component, "create"):
        instance = component.create(config)
    check_replaceable(target.absolute())
    _check_output_dir(target)
    dataset = None
    if instance.needs_calibration:
        text = plugins.get("dataset", "text")
        dataset = _checked_dataset(plugins, text, text.make_config({"path": data_path} if data_path else {}))
    lazy = lazy_model_dir(model_source)
    plan = _choose_layerwise(layerwise, lazy, instance, quantizer, model_source)
    if plan is not None:
        return _quantize_layerwise(lazy, plan, target, instance, component, config, quantizer, plugins, dataset)
    with target_lock(target, what=f"artifact directory {target}"):
        loaded = load_model(model_source)
        check_free_space(target, loaded.model)  # before quantizing, not after
        calibration = dataset.build(loaded.tokenizer) if dataset is not None else None
        if calibration is not None:
            check_block_size(loaded.model.config, calibration.block_size)
        result = quantize(loaded.model, quantizer, options, calibration_data=calibration, tokenizer=loaded.tokenizer,
                          plugins=plugins)
        manifest = build_manifest(
            method=quantizer, quantizer_options=result.options, engine=result.engine, layers=result.layers,
            source_model=loaded.source, components={"quantizer": component_provenance(plugins, component)},
        )
        path = save_artifact(result.model, loaded.tokenizer, target, manifest=manifest, plugins=plugins)
    return path, result


def _layerwise_mode(value: Layerwise | str) -> Layerwise:
    try:
        return Layerwise(value)
    except ValueError:
        raise UsageError(f"layerwise must be one of {', '.join(m.value for m in Layerwise)}, not {value!r}") from None


def _choose_layerwise(mode: Layerwise, lazy, instance, quantizer: str, source: str):
    """The memory plan when quantizing one layer at a time, ``None`` for the whole model; refuses
    (:class:`UsageError`) what would not fit in memory."""
    from .memory_plan import available_bytes, gib, plan_quantize_memory

    begin = optional_member(instance, Quantizer, "begin_layerwise")
    refusal = optional_member(instance, Quantizer, "layerwise_refusal") or (lambda: None)
    why_not = None
    if lazy is None:
        why_not = (f"{source} is not a Hugging Face safetensors directory (bundled and GGUF models are dequantized "
                   f"whole); convert it to one to quantize it layer by layer")
    elif begin is None:
        why_not = f"quantizer {quantizer!r} converts the whole model only"
    else:
        from .layerwise import layout_problem

        why_not = refusal() or layout_problem(lazy.config, calibrated=instance.needs_calibration)
    if mode is Layerwise.ON and why_not:
        raise UsageError(f"cannot quantize layer by layer: {why_not}")
    if lazy is None:
        return None
    plan = plan_quantize_memory(lazy.checkpoint, lazy.config)
    free = available_bytes()
    if mode is Layerwise.ON:
        chosen = True
    elif mode is Layerwise.OFF:
        chosen = False
    else:
        chosen = plan.whole > free and not why_not
    need = plan.layerwise if chosen else plan.whole
    if need > free:
        other = ""
        if not chosen and not why_not and plan.layerwise <= free:
            other = f" Layer by layer it needs about {gib(plan.layerwise)}: use --layerwise on (or auto)."
        elif not chosen and why_not:
            other = f" Layer by layer would need about {gib(plan.layerwise)}, but {why_not}."
        raise UsageError(
            f"quantizing {source} {'layer by layer' if chosen else 'as a whole model'} needs about {gib(need)} of "
            f"memory and {gib(free)} is available; it would be killed part-way.{other} Close other programs or "
            f"use a machine with more memory."
        )
    if chosen and mode is Layerwise.AUTO:
        log.info("the whole float model needs about %s and %s is available: quantizing one layer at a time "
                 "(about %s)", gib(plan.whole), gib(free), gib(plan.layerwise))
    return plan if chosen else None


def _quantize_layerwise(lazy, plan, target: Path, instance, component, config, quantizer: str, plugins, dataset):
    from .layerwise import quantize_layerwise
    from .preflight import check_free_bytes

    check_free_bytes(target, 2 * plan.int8, "the int8 artifact")
    options = config_to_dict(config)
    with target_lock(target, what=f"artifact directory {target}"):
        batches = None
        if dataset is not None:  # what quantize() calibrates on: its recorders keep these input ids
            splits = dataset.build(lazy.tokenizer)
            check_block_size(lazy.config, splits.block_size)
            collated = calibration_batches(splits.train, batches=CALIBRATION_BATCHES)
            batches = [batch.input_ids for batch in collated]
        model, layers = quantize_layerwise(
            lazy, target, instance, quantizer=quantizer, options=options, plugins=plugins, batches=batches,
            manifest_fields={"method": quantizer, "quantizer_options": options,
                             "components": {"quantizer": component_provenance(plugins, component)}},
        )
    return target, QuantizeResult(model, layers, instance.engine, quantizer, options)


def _check_output_dir(path: Path) -> None:
    """Fail before any training if the output directory cannot be written."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"output directory {path} is a file; choose another --output-dir")
    probe_parent = path if path.exists() else path.parent
    while not probe_parent.exists():
        probe_parent = probe_parent.parent
    try:
        probe = probe_parent / f".ftq-write-test-{os.getpid()}-{time.time_ns()}"  # per process: ranks probe at once
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
        # rank 0 alone writes, so it alone holds the output directory's locks
        lock = run_lock(out) if rank.is_main else contextlib.nullcontext()
        with lock:
            if rank.is_main and model is None:
                config, resolved = _quantize_big_base_first(config, resolved, plugins, distributed=rank.world_size > 1)
            result = run_chain(config, resolved, plugins, dataset=dataset, data=data, model=model, main=rank.is_main)
        barrier()  # the other ranks wait for rank 0's artifact and report
    result.rank, result.world_size = rank.rank, rank.world_size
    return result


def _quantize_big_base_first(config: RunConfig, resolved: ResolvedRun, plugins, *, distributed: bool):
    """``(config, resolved)`` of the run to do: for an adapter over a float model that fits in memory only one
    decoder layer at a time, the run over its int8 artifact, quantized that way into ``<output_dir>/base`` first.

    It is what ``ftq quantize --layerwise on`` then ``ftq run --model OUT/base`` do, so a killed quantization
    resumes with the same command; the float model is never whole in memory, so no float row is evaluated.
    """
    layerwise = Layerwise(config.layerwise)
    if not config.adapts or layerwise is Layerwise.OFF or is_artifact_dir(resolve_artifact_dir(config.model)):
        return config, resolved  # an int8 artifact is trained over as it is
    lazy = lazy_model_dir(config.model)
    if lazy is None:
        return config, resolved
    component, options = resolved.quantizer.component, resolved.quantizer.config
    with component_step(plugins, component, "create"):
        instance = component.create(options)
    if _choose_layerwise(layerwise, lazy, instance, config.quantizer.name, config.model) is None:
        return config, resolved
    if distributed:
        raise UsageError(
            f"{config.model} fits in memory only one decoder layer at a time; quantize it first (ftq quantize "
            f"{config.model} --layerwise on -o BASE), then start the distributed run with --model BASE"
        )
    base = Path(config.output_dir) / "base"
    data_path = config.dataset.options.get("path") if config.dataset.name == "text" else None
    log.info("%s is quantized layer by layer into %s first; adapter %r then trains over it", config.model, base,
             config.adapter.name)
    quantize_to_artifact(config.model, base, config.quantizer.name, config.quantizer.options, data_path=data_path,
                         plugins=plugins, layerwise=Layerwise.ON)
    over_base = replace(config, model=str(base), quantizer=RunConfig().quantizer)
    return over_base, resolve(over_base, plugins)


def _preflight(out: Path, resolved: ResolvedRun, plugins, *, own_data: bool) -> DatasetBuilder | None:
    """Every check that can refuse the run and needs no model: output directory, data file.

    Returns the dataset component instance (None when the caller passed its own data).
    """
    _check_output_dir(out)
    check_replaceable((out / "model").absolute())
    linked = plain_directory_problem(out / "checkpoints")
    if linked:
        raise UsageError(
            f"{linked}; a run writes, rotates and deletes its checkpoints there and will not do that in another "
            f"directory. Remove it, or choose another output directory (-o)."
        )
    if own_data:
        return None
    return _checked_dataset(plugins, *resolved.dataset)


def _checked_dataset(plugins, component, config) -> DatasetBuilder:
    """The dataset component built from ``config``, its cheap checks passed (before any model loads)."""
    with component_step(plugins, component, "create"):
        dataset = component.create(config)
    check = optional_member(dataset, DatasetBuilder, "check")
    if check is not None:
        with component_step(plugins, component, "check"):
            check()
    return dataset


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
        with component_step(plugins, component, "build"):
            splits = builder.build(artifact.tokenizer)
    label = artifact.manifest.get("method", "model")
    adapter = artifact.manifest.get("adapter")
    if isinstance(adapter, dict) and adapter.get("name"):
        label = adapted_label(label, adapter["name"], merged=bool(adapter.get("merged")))
    return evaluate(artifact.model, label, splits.eval, settings or EvalSettings(),
                    size_bytes=weights_size(resolve_artifact_dir(directory)))


def export(directory, output_dir, format: str = "hf", options: Mapping[str, Any] | None = None, *, plugins=None) -> str:
    """Write the artifact at ``directory`` (or a run directory's ``model/``) with the exporter ``format``.

    Returns the exporter's description of what it wrote.  ``output_dir`` must
    not exist or be empty; the exporter writes into a staging directory beside
    it, which replaces it only once the export is complete (and verified, for
    exporters that read their output back).
    """
    import shutil

    plugins = plugins or get_plugins()
    component = plugins.get("exporter", format)
    config = component.make_config(options)
    target = Path(output_dir).absolute()
    _check_export_target(target, output_dir)  # before loading anything
    with component_step(plugins, component, "create"):
        exporter = component.create(config)
    artifact = load(directory)  # verified against its manifest before anything is written
    target.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(target, what=f"export directory {output_dir}"):
        _check_export_target(target, output_dir)  # again, now that no other ftq can write there
        staging = new_staging_dir(target)
        try:
            with component_step(plugins, component, "export"):
                written = exporter.export(artifact, staging)
            umask = os.umask(0)
            os.umask(umask)
            staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the export is for other programs to read
            if target.exists():
                target.rmdir()
            staging.replace(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return written


def _check_export_target(target: Path, shown) -> None:
    """Refuse an export target that is a link, or that exists and is not an empty directory."""
    if target.is_symlink():
        raise UsageError(f"{shown} is a symbolic link (to {os.readlink(target)}); an export is written into a real "
                         f"directory only. Choose another -o, or remove the link.")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UsageError(f"{shown} already exists and is not an empty directory; choose another -o or remove it")
