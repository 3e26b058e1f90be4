"""Quantize a model one decoder layer at a time: the float model is never whole in memory.

The model is built on the meta device; each decoder layer's weights are read
from the checkpoint's shards in float32, converted by the quantizer
(``begin_layerwise``: see :class:`~ftq_core.protocols.Quantizer`), written to
a shard of the artifact, and their float memory released.  The embeddings,
final norm and head come last, then the steps that look at the whole int8
model.  Peak memory is the int8 model plus one float layer and the float
embeddings, instead of the float model and its copies.

Each layer's shard is written as soon as the layer is converted, into a work
directory beside the target with a journal (``progress.json``) of what was
written and its checksum.  A run killed mid-way and started again with the
same model, quantizer and options reads those layers back (verified) instead
of converting them again, and writes the same artifact.  The finished
artifact is the shards, a ``model.safetensors.index.json`` and the usual
manifest, moved into place in one step as any artifact is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .artifacts import (
    ARTIFACT_FORMAT,
    WEIGHTS_INDEX,
    artifact_staging,
    export_state,
    restore_modules,
    seal_artifact,
)
from .tensor_io import atomic_write_json, load_tensors, save_tensors, sha256_file
from .untrusted_json import parse_untrusted_json

log = logging.getLogger("ftq")

__all__ = ["quantize_layerwise", "work_dir_for", "layout_problem"]

JOURNAL = "progress.json"


def work_dir_for(target: Path) -> Path:
    """Where an interrupted layer-by-layer quantization of ``target`` keeps the layers it wrote."""
    return target.parent / f".{target.name}.layerwise"


def layout_problem(config, *, calibrated: bool = False) -> str | None:
    """Why a model of ``config`` cannot be read layer by layer (``None``: it can), from its empty (meta) build.

    ``calibrated``: calibration inputs are carried from layer to layer with the attention mask the first
    layer gets, which a model mixing layer types (sliding-window and full attention) does not share.
    """
    from .checkpoint import empty_model

    model = empty_model(config)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not len(layers):
        return (f"a {config.model_type!r} model's decoder layers are not at model.layers (the Llama, Mistral, "
                f"Qwen and Gemma layout this reads layer by layer)")
    kinds = set(getattr(config, "layer_types", None) or ())
    if calibrated and len(kinds) > 1:
        return (f"its layers mix attention kinds ({', '.join(sorted(kinds))}), and calibration inputs are carried "
                f"from layer to layer with one mask; quantize without calibration (dynamic defaults)")
    return None


def _shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _run_key(lazy, quantizer: str, options: dict) -> str:
    """What must match for layers written by an earlier run to be reused: the checkpoint, the quantizer and options."""
    from .artifacts import _versions

    files = {}
    for shard in sorted(set(lazy.checkpoint.shard_of.values())):
        stat = (lazy.checkpoint.directory / shard).stat()
        files[shard] = [stat.st_size, stat.st_mtime_ns]
    described = {"files": files, "quantizer": quantizer, "options": options, "versions": _versions()}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


class _Journal:
    """The work directory's record of the layers written so far, rewritten atomically after each."""

    def __init__(self, directory: Path, key: str):
        self.directory, self.key = directory, key
        self.layers: dict[str, dict] = {}
        recorded = self._read()
        if recorded is not None and recorded.get("key") == key and isinstance(recorded.get("layers"), dict):
            self.layers = recorded["layers"]
        elif directory.exists():
            shutil.rmtree(directory)  # another model, quantizer or ftq: nothing in it can be reused
        directory.mkdir(parents=True, exist_ok=True)

    def _read(self) -> dict | None:
        try:
            value = parse_untrusted_json((self.directory / JOURNAL).read_text())
            return value if isinstance(value, dict) else None
        except (OSError, ValueError):
            return None

    def saved(self, index: int) -> dict | None:
        """The record of layer ``index`` if its shard is there and matches its checksum."""
        entry = self.layers.get(str(index))
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or Path(entry["file"]).name != entry["file"]:
            return None
        path = self.directory / entry["file"]
        if path.is_symlink() or not path.is_file() or sha256_file(path) != entry.get("sha256"):
            return None
        return entry

    def record(self, index: int, entry: dict) -> None:
        self.layers[str(index)] = entry
        atomic_write_json(self.directory / JOURNAL, {"key": self.key, "layers": self.layers})


def _check_names(model, checkpoint) -> None:
    """Refuse a checkpoint whose tensor names or shapes do not fit the config, before any weight is read."""
    params = dict(model.named_parameters())
    tied = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    buffers = {name for name, _ in model.named_buffers()}
    missing = [n for n in params if n not in checkpoint.info]
    unexpected = [n for n in checkpoint.info if n not in params and n not in tied and n not in buffers]
    wrong = [n for n, p in params.items() if n in checkpoint.info and tuple(p.shape) != checkpoint.info[n][1]]
    from .models import refuse_incomplete_weights

    refuse_incomplete_weights(checkpoint.directory, {"missing_keys": missing, "unexpected_keys": unexpected,
                                                     "mismatched_keys": wrong})


class _Outside:
    """The parameters outside the decoder layers (embeddings, final norm, head): read and released as the
    conversion needs them, ties (a head that is the embeddings) kept through both."""

    def __init__(self, model, checkpoint):
        self.model, self.checkpoint = model, checkpoint
        self.embeddings = model.get_input_embeddings()
        self.prefix = next(name for name, module in model.named_modules() if module is self.embeddings) + "."
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self.ties = [names for names in groups.values() if len(names) > 1]

    def _retie(self) -> None:
        for names in self.ties:
            first = self.model.get_parameter(names[0])
            for other in names[1:]:
                owner, _, leaf = other.rpartition(".")
                module = self.model.get_submodule(owner) if owner else self.model
                if isinstance(getattr(module, leaf, None), type(first)):  # not where an int8 layer now stands
                    setattr(module, leaf, first)

    def read_embeddings(self) -> None:
        import torch

        from .checkpoint import materialize

        materialize(self.embeddings, self.prefix, self.checkpoint, torch.float32)
        self._retie()

    def release_embeddings(self) -> None:
        from .checkpoint import release

        release(self.embeddings)
        self._retie()

    def read_rest(self) -> None:
        """Every parameter still on the meta device but the embeddings (the final norm, an untied head)."""
        import torch

        from .checkpoint import materialize

        materialize(self.model, "", self.checkpoint, torch.float32, skip=(self.embeddings.weight,))
        self._retie()


def _restore_layer(journal: _Journal, entry: dict, plugins) -> tuple[dict[str, Any], dict[str, Any]]:
    """A written layer read back: ``({module name: int8 module}, {name: float tensor})``."""
    tensors = load_tensors(journal.directory / entry["file"], sha256=entry["sha256"])  # the bytes used are the bytes checked
    modules = restore_modules(tensors, entry["modules"], {}, plugins)
    return modules, tensors


def quantize_layerwise(lazy, target: Path, instance, *, quantizer: str, options: dict, plugins,
                       manifest_fields: dict, batches: list | None = None) -> tuple[Any, list]:
    """Quantize the model ``lazy`` (:func:`~ftq_core.models.lazy_model_dir`) with ``instance`` layer by layer
    and save the artifact at ``target``.  ``batches``: calibration input ids, for quantizers that calibrate.
    Returns ``(int8 model, layer reports)``."""
    import torch
    from tqdm.auto import tqdm

    from .checkpoint import empty_model, materialize
    from .manifest import build_manifest

    model = empty_model(lazy.config)
    _check_names(model, lazy.checkpoint)
    state = instance.begin_layerwise(model)
    layers = model.model.layers
    count = len(layers) + 1  # one shard per decoder layer, and one for the rest
    work = work_dir_for(target)
    journal = _Journal(work, _run_key(lazy, quantizer, options))
    written: dict[int, dict] = {}
    reused = 0
    outside = _Outside(model, lazy.checkpoint)
    with torch.no_grad():
        activations = None
        if batches:  # the first layer's inputs come through the (transformed) embeddings
            outside.read_embeddings()
            state.embeddings(model)
            activations = _LayerInputs.capture(model, batches)
            outside.release_embeddings()  # read again once the layers are int8: they would sit idle till then
        for index in tqdm(range(len(layers)), desc="quantize layers", unit="layer"):
            prefix = f"model.layers.{index}."
            entry = journal.saved(index)
            layer, outputs = layers[index], None
            if activations is not None:  # the float layer's outputs are the next layer's calibration inputs
                materialize(layer, prefix, lazy.checkpoint, torch.float32)
                state.prepare_layer(model, index)
                outputs = activations.outputs(layer)
            if entry is not None:
                modules, floats = _restore_layer(journal, entry, plugins)
                state.skip_layer(model, index, modules)
                _adopt_floats(model, floats)
                reused += 1
            else:
                if activations is None:
                    materialize(layer, prefix, lazy.checkpoint, torch.float32)
                    state.prepare_layer(model, index)
                state.convert_layer(model, index, activations.replay(layer) if activations is not None else None)
                entry = _write_layer(journal, index, count, layer, prefix, plugins)
            if outputs is not None:
                activations.advance(outputs)
            written[index] = entry
            _return_freed_memory()
        if reused:
            log.info("reused %d of %d layers written by an interrupted run (checksums verified)", reused, len(layers))
        outside.read_rest()
        model = state.finish(model, activations.head_replay(model) if activations is not None else None,
                             read_embeddings=outside.read_embeddings)
    reports = instance.layer_report(model)
    manifest = build_manifest(layers=reports, engine=instance.engine, source_model=lazy.source, **manifest_fields)
    _save_sharded(model, lazy.tokenizer, target, written, count, manifest, plugins, work)
    shutil.rmtree(work, ignore_errors=True)
    return model, reports


class _Captured(Exception):
    """Stops the model's forward at the first decoder layer, its inputs caught."""


class _LayerInputs:
    """The calibration batches' inputs to the current decoder layer: float hidden states and the keyword
    arguments the model passes every layer (position embeddings, mask), caught at the first layer."""

    def __init__(self, calls: list[tuple[tuple, dict]]):
        self.calls = calls

    @classmethod
    def capture(cls, model, batches) -> "_LayerInputs":
        calls = []

        def catch(module, args, kwargs):
            calls.append((args, kwargs))
            raise _Captured

        handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for ids in batches:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
        finally:
            handle.remove()
        return cls(calls)

    def _call(self, layer, args, kwargs):
        out = layer(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def replay(self, layer):
        """A function that runs every batch through ``layer`` (as it is when called) for observers' hooks."""
        def run() -> None:
            for args, kwargs in self.calls:
                self._call(layer, args, kwargs)

        return run

    def outputs(self, layer) -> list:
        return [self._call(layer, args, kwargs) for args, kwargs in self.calls]

    def advance(self, outputs: list) -> None:
        self.calls = [((hidden, *args[1:]), kwargs) for hidden, (args, kwargs) in zip(outputs, self.calls)]

    def head_replay(self, model):
        """The final norm and the head over the last layer's outputs, as the model's forward runs them."""
        def run() -> None:
            for args, _ in self.calls:
                model.lm_head(model.model.norm(args[0]))  # logits dropped at once: a batch's is vocabulary-sized

        return run


def _return_freed_memory() -> None:
    """Hand the freed float layer back to the system (glibc keeps freed heap memory for reuse, and a float32
    layer freed between int8 allocations would otherwise stay resident, about 0.8x the int8 model by the end)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library: nothing to trim
            pass


def _adopt_floats(model, tensors: dict[str, Any]) -> None:
    """Put a written layer's float tensors (its norms) onto the model's meta parameters of those names."""
    from .checkpoint import set_parameter

    for name, value in tensors.items():
        set_parameter(model, name, value)


def _write_layer(journal: _Journal, index: int, count: int, layer, prefix: str, plugins) -> dict:
    """Write decoder layer ``index`` (converted) to its shard in the work directory and record it."""
    tensors, modules = export_state(layer, plugins)
    file = _shard_name(index, count)
    aliases = save_tensors(journal.directory / file, {prefix + k: v for k, v in tensors.items()},
                           metadata={"format": ARTIFACT_FORMAT})
    if aliases:  # a layer's tensors are its own; shared ones would need the other shard to load
        raise RuntimeError(f"layer {index} shares tensors within itself ({aliases}); cannot shard it")
    entry = {
        "file": file,
        "sha256": sha256_file(journal.directory / file),
        "tensors": sorted(prefix + k for k in tensors),
        "modules": {prefix + name: value for name, value in modules.items()},
    }
    journal.record(index, entry)
    return entry


def _save_sharded(model, tokenizer, target: Path, written: dict[int, dict], count: int, manifest: dict, plugins,
                  work: Path) -> None:
    """The artifact: the layers' shards moved from the work directory, the rest in the last shard, an index."""
    from .tensor_io import atomic_write_text

    tensors, modules = export_state(model, plugins)
    in_layers = {name for entry in written.values() for name in entry["tensors"]}
    missing = sorted(in_layers - set(tensors))
    if missing:
        raise RuntimeError(f"the int8 model lacks tensors its layer shards hold: {missing[:3]}")
    rest = {name: value for name, value in tensors.items() if name not in in_layers}
    weight_map = {name: entry["file"] for entry in written.values() for name in entry["tensors"]}
    last = _shard_name(count - 1, count)
    with artifact_staging(target.absolute()) as staging:
        digests = {}
        for entry in written.values():
            os.replace(work / entry["file"], staging / entry["file"])
            digests[entry["file"]] = entry["sha256"]
        aliases = save_tensors(staging / last, rest, metadata={"format": ARTIFACT_FORMAT})
        weight_map.update({name: last for name in rest if name not in aliases})
        total = sum((staging / f).stat().st_size for f in set(weight_map.values()))
        atomic_write_text(staging / WEIGHTS_INDEX, json.dumps(
            {"metadata": {"total_size": total, "format": ARTIFACT_FORMAT}, "weight_map": dict(sorted(weight_map.items()))},
            indent=2) + "\n")
        seal_artifact(staging, target.absolute(), model, tokenizer, manifest=manifest, modules=modules,
                      aliases=aliases, plugins=plugins, digests=digests)
