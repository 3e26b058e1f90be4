"""Saving and loading quantized models: safetensors + JSON, never a pickle.

An artifact directory holds ``model.safetensors`` (float tensors, and the
tensors of quantized modules exported by their codecs), the model's
``config.json``, tokenizer files, and ``manifest.json``, written last, with
the SHA-256 of every other file.  The directory is built beside the target and
renamed into place, so a crash leaves the previous artifact or the new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError
from .tensor_io import atomic_write_json, fsync_dir, load_tensors, save_tensors, sha256_file

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "LoadedArtifact", "save_artifact", "load_artifact", "read_manifest", "replace_directory"]

ARTIFACT_FORMAT = "ftq-artifact"
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


@dataclass
class LoadedArtifact:
    model: Any
    tokenizer: Any
    manifest: dict


def _versions() -> dict[str, str]:
    import importlib.metadata

    import torch
    import transformers

    try:
        ftq_version = importlib.metadata.version("ftq")
    except importlib.metadata.PackageNotFoundError:
        ftq_version = "unknown"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "ftq": ftq_version}


def _export_state(model, plugins) -> tuple[dict[str, Any], dict[str, dict]]:
    """All tensors of ``model``: codec-handled modules exported, the rest from the state dict."""
    modules: dict[str, dict] = {}
    tensors: dict[str, Any] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in modules):
            continue  # inside a module a codec already exported
        codec = plugins.codec_for(module)
        if codec is None:
            continue
        exported, meta = codec.export(module)
        modules[name] = {"codec": codec.kind, "meta": meta}
        for key, tensor in exported.items():
            tensors[f"{name}.{key}"] = tensor
    for key, value in model.state_dict().items():
        if any(key.startswith(prefix + ".") for prefix in modules):
            continue
        if not hasattr(value, "untyped_storage"):
            raise ArtifactError(
                f"state entry {key!r} is a {type(value).__name__}, not a tensor, and no loaded plugin has a "
                f"codec for the module holding it; ftq saves tensors only"
            )
        tensors[key] = value
    return tensors, modules


def replace_directory(staging: Path, target: Path) -> None:
    """Move a complete ``staging`` directory to ``target``, replacing any old one.

    At every moment the target path holds the old complete artifact or the new
    one (between the two renames, the old one sits at ``target.old-*``, which
    :func:`load_artifact` also finds).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}-{int(time.time())}")
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_artifact(
    model,
    tokenizer,
    directory: str | os.PathLike,
    *,
    manifest: dict[str, Any],
    plugins=None,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write ``model`` (float or quantized) and ``tokenizer`` to ``directory`` atomically.

    ``manifest`` is recorded as given (method, engine, layers, sources...), with
    versions, the module table and file checksums added.
    """
    from .plugins import get_plugins

    plugins = plugins or get_plugins()
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        tensors, modules = _export_state(model, plugins)
        aliases = save_tensors(staging / WEIGHTS, tensors, metadata={"format": ARTIFACT_FORMAT})
        (staging / "config.json").write_text(model.config.to_json_string())
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        files = {
            path.name: sha256_file(path) for path in sorted(staging.iterdir()) if path.is_file() and path.name != MANIFEST
        }
        full = {
            **manifest,
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_VERSION,
            "versions": _versions(),
            "modules": modules,
            "aliases": aliases,
            "files": files,
        }
        atomic_write_json(staging / MANIFEST, full)  # last: its presence marks a complete artifact
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_manifest(directory: str | os.PathLike, *, verify: bool = True) -> dict:
    """The manifest of an artifact, after checking every file against its checksum."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        olds = sorted(directory.parent.glob(f"{directory.name}.old-*"))
        hint = f" A previous complete artifact was left at {olds[-1]} by an interrupted save." if olds else ""
        raise ArtifactError(
            f"{directory} is not a complete ftq artifact: {MANIFEST} is missing (an interrupted save, or "
            f"not an ftq output directory).{hint} Re-run the command that wrote it."
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON ({exc}); the artifact is damaged, write it again") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{directory} holds no ftq artifact (manifest format {manifest.get('format')!r})")
    if manifest.get("format_version", 0) > ARTIFACT_VERSION:
        raise ArtifactError(
            f"{directory} was written by a newer ftq (artifact format {manifest['format_version']}, this ftq "
            f"reads up to {ARTIFACT_VERSION}); upgrade ftq"
        )
    if verify:
        problems = []
        for name, digest in manifest.get("files", {}).items():
            file = directory / name
            if not file.is_file():
                problems.append(f"{name} is missing")
            elif sha256_file(file) != digest:
                problems.append(f"{name} does not match its checksum (changed after saving)")
        if WEIGHTS not in manifest.get("files", {}):
            problems.append(f"the manifest lists no {WEIGHTS}")
        if problems:
            raise ArtifactError(
                f"artifact {directory} failed verification: {'; '.join(problems)}. Do not use it; write it again "
                f"from the source model."
            )
    return manifest


def _check_versions(manifest: dict) -> None:
    import torch

    saved = manifest.get("versions", {}).get("torch", "")
    if saved and saved.split(".")[:2] != torch.__version__.split(".")[:2]:
        warnings.warn(
            f"this artifact was written with torch {saved}, and torch {torch.__version__} is loading it; "
            f"quantized kernels may differ. Re-quantize with this torch if outputs look wrong.",
            stacklevel=3,
        )
    engine = manifest.get("engine")
    if engine:
        supported = torch.backends.quantized.supported_engines
        if engine not in supported:
            raise ArtifactError(
                f"this artifact's int8 layers were packed for the {engine!r} quantized engine, which this torch "
                f"does not have (available: {', '.join(e for e in supported if e != 'none')}). Re-quantize on "
                f"this machine with one of those engines."
            )
        if torch.backends.quantized.engine != engine:
            warnings.warn(
                f"switching torch's quantized engine from {torch.backends.quantized.engine!r} to {engine!r}, the "
                f"engine this artifact was quantized for",
                stacklevel=3,
            )
            torch.backends.quantized.engine = engine


def load_artifact(directory: str | os.PathLike, *, plugins=None) -> LoadedArtifact:
    """Rebuild a saved model (float or quantized) without unpickling anything."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .plugins import get_plugins
    from .layers_util import set_submodule

    directory = Path(directory)
    if not directory.exists():
        raise ArtifactError(f"no artifact at {directory}: the directory does not exist")
    manifest = read_manifest(directory)
    _check_versions(manifest)
    plugins = plugins or get_plugins()
    codecs = plugins.codecs()
    tensors = load_tensors(directory / WEIGHTS, manifest.get("aliases"))
    config = AutoConfig.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    modules = manifest.get("modules", {})
    restored = {}
    for name, entry in modules.items():
        codec = codecs.get(entry["codec"])
        if codec is None:
            raise ArtifactError(
                f"layer {name!r} was saved by codec {entry['codec']!r}, which no loaded plugin provides "
                f"(loaded: {', '.join(sorted(codecs)) or 'none'}). Install or enable the plugin that made it."
            )
        prefix = name + "."
        own = {key[len(prefix):]: tensors.pop(key) for key in [k for k in tensors if k.startswith(prefix)]}
        restored[name] = codec.restore(own, entry["meta"])
    # Float tensors go in while every layer is still a float module (quantized
    # modules have load hooks of their own that expect their own keys).
    result = model.load_state_dict(tensors, strict=False)
    unexplained = [key for key in result.missing_keys if not any(key.startswith(n + ".") for n in modules)]
    if unexplained or result.unexpected_keys:
        raise ArtifactError(
            f"artifact {directory} does not fit its config: missing {unexplained[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}. It is damaged or was edited; write it again."
        )
    for name, module in restored.items():
        set_submodule(model, name, module)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory)) if (directory / "tokenizer_config.json").is_file() else None
    return LoadedArtifact(model, tokenizer, manifest)
