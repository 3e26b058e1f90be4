"""Saving and loading quantized models: safetensors + JSON, never a pickle.

An artifact directory holds ``model.safetensors`` (float tensors, and the
tensors of quantized modules exported by their codecs), the model's
``config.json``, tokenizer files, and ``manifest.json``, written last, with
the SHA-256 of every other file.  The directory is built beside the target and
renamed into place, so a crash leaves the previous artifact or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError, FtqWarning, UsageError
from .file_safety import (
    PICKLE_SUFFIXES,
    code_file_problems,
    is_plain_name,
    link_problems,
    pickle_file_names,
    read_regular_file,
    remote_code_problems,
    remove_tree,
)
from .manifest_schema import check_manifest, malformed
from .tensor_io import (
    ChecksumMismatch,
    atomic_write_json,
    fsync_dir,
    load_tensors,
    save_tensors,
    sha256_file,
    write_failure_kind,
)
from .untrusted_json import parse_untrusted_json

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "PICKLE_SUFFIXES",
    "LoadedArtifact",
    "save_artifact",
    "load_artifact",
    "read_manifest",
    "replace_directory",
    "check_replaceable",
    "is_artifact_dir",
    "resolve_artifact_dir",
    "weights_size",
    "export_state",
    "artifact_staging",
    "new_staging_dir",
    "seal_artifact",
    "restore_modules",
    "WEIGHTS",
    "WEIGHTS_INDEX",
]

ARTIFACT_FORMAT = "ftq-artifact"
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
#: A sharded artifact's map of tensor name -> shard file, in place of one ``model.safetensors``
WEIGHTS_INDEX = "model.safetensors.index.json"
#: The largest JSON file ftq reads from an artifact before checking it (far above any real manifest or index).
JSON_LIMIT = 64 << 20


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


def export_state(model, plugins) -> tuple[dict[str, Any], dict[str, dict]]:
    """All tensors of ``model``: codec-handled modules exported, the rest from the state dict."""
    modules: dict[str, dict] = {}
    tensors: dict[str, Any] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in modules):
            continue  # inside a module a codec already exported
        codec = plugins.codec_for(module)
        if codec is None:
            continue
        with plugins.guard(plugins.codec_provenance(codec.kind)["plugin"], f"module codec {codec.kind!r} export"):
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


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the kernel, C library or file system cannot do it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def weights_size(directory: str | os.PathLike) -> int:
    """Bytes of the weights a user ships: the model's ``model.safetensors`` and an adapter's beside it."""
    return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


def is_artifact_dir(path: Path) -> bool:
    """Whether ``path`` holds an ftq artifact (complete or not) that a save may replace."""
    try:
        return parse_untrusted_json((path / MANIFEST).read_text()).get("format") == ARTIFACT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_replaceable(target: Path) -> None:
    """Refuse to replace a directory that holds anything but an ftq artifact (or a link, whatever it points at)."""
    if target.is_symlink():
        raise UsageError(f"{target} is a symbolic link (to {os.readlink(target)}); ftq writes an artifact into a real "
                         f"directory only. Remove the link, or choose another output directory.")
    if not target.exists():
        return
    if not target.is_dir():
        raise UsageError(f"{target} exists and is a file, not an artifact directory; choose another output directory")
    if any(target.iterdir()) and not is_artifact_dir(target):
        raise UsageError(
            f"{target} already exists and does not hold an ftq artifact, so ftq will not replace it (that would "
            f"delete its files). Choose a new or empty output directory, or remove {target} yourself."
        )


def replace_directory(staging: Path, target: Path) -> None:
    """Move a complete ``staging`` directory to ``target``, replacing any old one.

    On Linux the two directories are exchanged in one atomic step, so the
    target path always holds the old complete artifact or the new one.
    Elsewhere the old one is renamed aside first; a crash between the two
    renames leaves it at ``target.old-*``, which :func:`load_artifact` names.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and _exchange(staging, target):
        fsync_dir(target.parent)
        shutil.rmtree(staging, ignore_errors=True)  # now the old artifact
        return
    old = None
    if target.exists():
        old = target.with_name(f"{target.name}.old-{os.getpid()}-{int(time.time())}")
        os.replace(target, old)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_staging(target: Path) -> None:
    """Drop staging directories of saves and exports whose process died (killed mid-write).

    Each is named ``.NAME.partial-PID-*`` after the process writing it; one
    whose process is still alive is another save in progress and is left alone.
    """
    prefix = f".{target.name}.partial-"
    for stale in target.parent.glob(f"{prefix}*"):
        pid = stale.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            remove_tree(stale)


def new_staging_dir(target: Path) -> Path:
    """A fresh private staging directory beside ``target`` (``.NAME.partial-PID-*``), stale ones removed first.

    The one rule for every save and export that is moved into place once complete.
    """
    target = Path(target)
    _remove_stale_staging(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent))


def _write_error(target: Path, exc: OSError) -> ArtifactError:
    kept = "the previous artifact there is unchanged" if target.exists() else "nothing was written there"
    fix = {
        "no-space": "Free some disk space or choose an output directory on another disk, then run again.",
        "not-writable": "Make the directory writable or choose another output directory.",
    }.get(write_failure_kind(exc), "Check the disk and run again.")
    return ArtifactError(f"could not save the artifact to {target}: {exc.strerror or exc}; {kept}. {fix}")


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
    target = Path(directory).absolute()
    with artifact_staging(target) as staging:
        tensors, modules = export_state(model, plugins)
        aliases = save_tensors(staging / WEIGHTS, tensors, metadata={"format": ARTIFACT_FORMAT})
        seal_artifact(staging, target, model, tokenizer, manifest=manifest, modules=modules, aliases=aliases,
                      plugins=plugins, extra_files=extra_files)
    return Path(directory)


@contextlib.contextmanager
def artifact_staging(target: Path):
    """A fresh staging directory beside ``target`` for an artifact's files; removed if the block fails.

    A write failure (disk full, no permission) becomes an :class:`ArtifactError` that says what was kept.
    """
    check_replaceable(target)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = new_staging_dir(target)
        yield staging
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise _write_error(target, exc) from None
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def seal_artifact(staging: Path, target: Path, model, tokenizer, *, manifest: dict[str, Any], modules: dict,
                  aliases: dict, plugins, extra_files: dict[str, bytes] | None = None,
                  digests: dict[str, str] | None = None) -> None:
    """Complete a staging directory whose weights are written: config, tokenizer, manifest (last), then
    move it to ``target``.  ``digests``: checksums already known for some files (not read again)."""
    (staging / "config.json").write_text(model.config.to_json_string())
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    for name, data in (extra_files or {}).items():
        (staging / name).write_bytes(data)
    known = digests or {}
    files = {
        path.name: known.get(path.name) or sha256_file(path)
        for path in sorted(staging.iterdir()) if path.is_file() and path.name != MANIFEST
    }
    full = {
        **manifest,
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "versions": _versions(),
        "modules": modules,
        # which package each codec came from, so a loader without it can say what to install
        "codecs": {kind: plugins.codec_provenance(kind) for kind in sorted({m["codec"] for m in modules.values()})},
        "aliases": aliases,
        "files": files,
    }
    atomic_write_json(staging / MANIFEST, full)  # last: its presence marks a complete artifact
    replace_directory(staging, target)


def read_manifest(directory: str | os.PathLike, *, verify: bool = True) -> dict:
    """The manifest of an artifact, checked against its declared schema, after checking every file against its
    checksum (``verify``)."""
    directory = Path(directory)
    manifest = _read_checked_manifest(directory)
    if verify:
        problems = _listing_problems(directory, manifest)
        for name, digest in manifest["files"].items():
            if not any(p.startswith(f"{name} ") for p in problems):
                problems += _digest_problems(name, _file_digest(directory / name), digest)
        if problems:
            raise _verification_error(directory, problems)
    return manifest


def _read_checked_manifest(directory: Path) -> dict:
    """``manifest.json`` of ``directory``: present, in a directory with nothing unsafe, of this ftq's format, and
    with every field of its declared type (:mod:`ftq_core.manifest_schema`) -- before any file it names is opened."""
    path = directory / MANIFEST
    if not path.is_file():
        olds = sorted(directory.parent.glob(f"{directory.name}.old-*"))
        hint = f" A previous complete artifact was left at {olds[-1]} by an interrupted save." if olds else ""
        raise ArtifactError(
            f"{directory} is not a complete ftq artifact: {MANIFEST} is missing (an interrupted save, or "
            f"not an ftq output directory).{hint} Re-run the command that wrote it."
        )
    _refuse_unsafe(directory)
    try:
        manifest = parse_untrusted_json(read_regular_file(path, limit=JSON_LIMIT))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} cannot be read as JSON ({exc}); the artifact is damaged, write it again") from None
    if not isinstance(manifest, dict):
        raise malformed("the manifest", "an object", manifest)
    found = manifest.get("format")
    if found != ARTIFACT_FORMAT:
        raise ArtifactError(f"{directory} holds no ftq artifact (manifest format {found!r})")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > ARTIFACT_VERSION:
        raise ArtifactError(
            f"{directory} was written by a newer ftq (artifact format {version}, this ftq "
            f"reads up to {ARTIFACT_VERSION}); upgrade ftq"
        )
    check_manifest(manifest)
    return manifest


def _refuse_unsafe(directory: Path) -> None:
    """Refuse what could run code or read outside the directory, whether or not files are verified: these
    checks are cheap and nothing ftq writes has them."""
    unsafe = [*link_problems(directory), *code_file_problems(directory), *remote_code_problems(directory)]
    pickles = pickle_file_names(p.name for p in directory.iterdir())
    if pickles:
        unsafe.append(f"it holds pickle-based file(s) {', '.join(pickles)}")
    if unsafe:
        raise ArtifactError(
            f"artifact {directory} is refused: {'; '.join(unsafe)}. ftq never runs code from an artifact, never "
            f"unpickles and never follows links out of it, and it writes none of these, so this artifact was not "
            f"written by ftq or was changed afterwards. Do not use it; write it again from the source model."
        )


def _listing_problems(directory: Path, manifest: dict) -> list[str]:
    """Files the manifest lists that are missing or not regular files, and files it does not list."""
    files = manifest["files"]
    problems = []
    for name in files:
        try:
            mode = os.lstat(directory / name).st_mode
        except FileNotFoundError:
            problems.append(f"{name} is missing")
            continue
        if not stat.S_ISREG(mode):
            problems.append(f"{name} is not a regular file")
    if WEIGHTS not in files and WEIGHTS_INDEX not in files:
        problems.append(f"the manifest lists no {WEIGHTS}")
    listed = set(files) | {MANIFEST}
    for path in sorted(directory.iterdir()):
        if path.name not in listed:
            problems.append(f"{path.name} is not recorded in the manifest (added after saving)")
    return problems


def _file_digest(path: Path) -> str | OSError:
    try:
        return sha256_file(path)
    except OSError as exc:
        return exc


def _digest_problems(name: str, digest: str | OSError, expected: str) -> list[str]:
    if isinstance(digest, OSError):
        return [f"{name} cannot be read ({digest.strerror or digest})"]
    return [] if digest == expected else [f"{name} does not match its checksum (changed after saving)"]


def _verification_error(directory: Path, problems: list[str]) -> ArtifactError:
    return ArtifactError(
        f"artifact {directory} failed verification: {'; '.join(problems)}. Do not use it; write it again "
        f"from the source model."
    )


def _check_versions(manifest: dict) -> None:
    import torch

    saved = manifest.get("versions", {}).get("torch", "")
    if saved and saved.split(".")[:2] != torch.__version__.split(".")[:2]:
        warnings.warn(
            f"this artifact was written with torch {saved}, and torch {torch.__version__} is loading it; "
            f"quantized kernels may differ. Re-quantize with this torch if outputs look wrong.",
            FtqWarning,
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
                FtqWarning,
                stacklevel=3,
            )
            torch.backends.quantized.engine = engine


def resolve_artifact_dir(path: str | os.PathLike) -> Path:
    """``path`` itself, or the ``model/`` artifact inside it when ``path`` is an ``ftq run`` output directory."""
    path = Path(path)
    if not (path / MANIFEST).exists() and (path / "model" / MANIFEST).is_file():
        return path / "model"
    return path


def _weight_map(directory: Path, manifest: dict) -> dict[str, str] | None:
    """A sharded artifact's ``{tensor name: shard file}`` (read from the verified index), or None for one file."""
    files = manifest["files"]
    if WEIGHTS_INDEX not in files:
        return None
    data = _verified_bytes(directory, WEIGHTS_INDEX, files[WEIGHTS_INDEX])
    index = parse_untrusted_json(data)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{WEIGHTS_INDEX} has no weight_map")
    for shard in set(weight_map.values()):
        if not is_plain_name(shard) or shard not in files:
            raise ValueError(f"{WEIGHTS_INDEX} names {shard!r}, which is not a file of the artifact")
    return weight_map


def _verified_bytes(directory: Path, name: str, digest: str) -> bytes:
    """The bytes of the artifact's file ``name``, read once without following a link and checked against ``digest``."""
    try:
        data = read_regular_file(directory / name)
    except OSError as exc:
        raise _verification_error(directory, [f"{name} cannot be read ({exc.strerror or exc})"]) from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise _verification_error(directory, [f"{name} does not match its checksum (changed after saving)"])
    return data


def _verified_tensors(directory: Path, name: str, manifest: dict) -> dict[str, Any]:
    """The tensors of the artifact's file ``name``, hashed as they are read (the bytes used are the bytes checked)."""
    try:
        return load_tensors(directory / name, sha256=manifest["files"][name])
    except ChecksumMismatch:
        raise _verification_error(directory, [f"{name} does not match its checksum (changed after saving)"]) from None


def _load_weights(directory: Path, manifest: dict, weight_map: dict[str, str] | None) -> dict[str, Any]:
    """Every tensor of the artifact: from ``model.safetensors``, or shard by shard as its index lists them."""
    if weight_map is None:
        tensors = _verified_tensors(directory, WEIGHTS, manifest)
    else:
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            part = _verified_tensors(directory, shard, manifest)
            if set(part) != {name for name, file in weight_map.items() if file == shard}:
                raise ValueError(f"{shard} does not hold the tensors {WEIGHTS_INDEX} lists for it")
            tensors.update(part)
    for alias, original in (manifest.get("aliases") or {}).items():
        tensors[alias] = tensors[original]
    return tensors


def _verified_copies(directory: Path, private: Path, manifest: dict, *, skip: set[str]) -> None:
    """Copy every file of the artifact but ``skip`` (the weights) into ``private``, each read once and verified.

    transformers and adapters open config, tokenizer and adapter files by
    path; pointed at these copies, they read exactly the bytes that were
    checked, whatever happens to the artifact meanwhile.
    """
    for name, digest in manifest["files"].items():
        if name not in skip:
            (private / name).write_bytes(_verified_bytes(directory, name, digest))


def _check_finite(directory: Path, tensors: dict[str, Any]) -> None:
    """Refuse NaN or infinite values in the float tensors (scales, norms, float weights): they load, then compute garbage."""
    import torch

    seen = set()
    for name, tensor in tensors.items():
        if id(tensor) in seen or not tensor.is_floating_point() or not tensor.numel():
            continue
        seen.add(id(tensor))
        # in chunks: a whole-tensor check allocates a mask as long as a float embedding
        if not all(bool(torch.isfinite(part).all()) for part in tensor.reshape(-1).split(1 << 22)):
            raise ArtifactError(
                f"artifact {directory}: tensor {name!r} holds NaN or infinite values, which a model written by ftq "
                f"never has. It is damaged or was edited; write it again from the source model."
            )


def _fitted(directory: Path, model, tensors: dict[str, Any]) -> dict[str, Any]:
    """The float tensors cast to the dtype of the model's own; a tensor of another shape, or an integer tensor
    where the model has a float one (an int8 norm), is refused."""
    import torch

    expected = {key: value for key, value in model.state_dict(keep_vars=True).items() if isinstance(value, torch.Tensor)}
    fitted = {}
    for key, value in tensors.items():
        own = expected.get(key)
        if own is not None and tuple(value.shape) != tuple(own.shape):
            raise ArtifactError(
                f"artifact {directory}: tensor {key!r} has shape {tuple(value.shape)}, and the model's config gives "
                f"it {tuple(own.shape)}. It is damaged or was edited; write it again from the source model."
            )
        if own is not None and own.is_floating_point() and not value.is_floating_point():
            raise ArtifactError(
                f"artifact {directory}: tensor {key!r} is stored as {value.dtype}, but it is a float tensor "
                f"({own.dtype}) of a layer no codec quantized. It is damaged or was edited; write it again from "
                f"the source model."
            )
        fitted[key] = value.to(own.dtype) if own is not None and value.dtype != own.dtype else value
    return fitted


def _missing_codec_fix(maker: dict) -> str:
    """What to do when an artifact's codec is not loaded, from the manifest's record of who made it."""
    package, plugin = maker.get("distribution"), maker.get("plugin")
    if maker.get("source") == "built-in":
        return (f"It comes from ftq's built-in plugin {plugin!r}: Install or enable it (it is disabled or failed to "
                f"load; `ftq plugins --all` shows why).")
    if package:
        version = f" {maker['version']}" if maker.get("version") else ""
        return (f"It was made by plugin {plugin!r} of package {package}{version}: Install or enable it "
                f"(`ftq install {package}`).")
    return "Install or enable the plugin that made it."


def _attach_saved_adapter(model, directory: Path, manifest: dict, plugins):
    """Attach the adapter saved beside the base, through the adapter component that wrote it."""
    from .errors import UnknownComponentError

    entry = manifest["adapter"]
    try:
        component = plugins.get("adapter", entry["name"])
    except UnknownComponentError:
        fix = _missing_codec_fix(manifest.get("components", {}).get("adapter", {}))
        raise ArtifactError(
            f"artifact {directory} holds an adapter of kind {entry['name']!r}, which no loaded plugin provides. {fix}"
        ) from None
    with plugins.guard(component.plugin, f"adapter {entry['name']!r} load"):
        adapter = component.create(component.make_config(entry.get("options", {})))
        return adapter.load(model, directory)


def restore_modules(tensors: dict[str, Any], modules: dict, makers: dict, plugins) -> dict[str, Any]:
    """``{name: module}`` rebuilt by each module's codec from its tensors, which are taken out of ``tensors``.

    ``modules``: the manifest's module table; ``makers``: its codec provenance (for the fix a missing codec needs).
    """
    codecs = plugins.codecs()
    restored = {}
    for name, entry in modules.items():
        codec = codecs.get(entry["codec"])
        if codec is None:
            fix = _missing_codec_fix(makers.get(entry["codec"], {}))
            raise ArtifactError(
                f"layer {name!r} was saved by codec {entry['codec']!r}, which no loaded plugin provides "
                f"(loaded: {', '.join(sorted(codecs)) or 'none'}). {fix}"
            )
        prefix = name + "."
        own = {key[len(prefix):]: tensors.pop(key) for key in [k for k in tensors if k.startswith(prefix)]}
        try:
            with plugins.guard(plugins.codec_provenance(entry["codec"])["plugin"], f"module codec {entry['codec']!r} restore"):
                restored[name] = codec.restore(own, entry["meta"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            # A built-in codec reading a damaged entry; a third-party codec's crash is a PluginError by now.
            raise ArtifactError(
                f"layer {name!r} cannot be rebuilt by codec {entry['codec']!r} from what the artifact holds "
                f"({type(exc).__name__}: {exc}). It is damaged or was edited; write it again from the source model."
            ) from exc
    return restored


def load_artifact(directory: str | os.PathLike, *, plugins=None) -> LoadedArtifact:
    """Rebuild a saved model (float or quantized) without unpickling anything.

    Each file is read once and the bytes used are the bytes verified: the
    weights are hashed as they are read into tensors, and the other files
    (config, tokenizer, adapter) are verified and copied into a private
    directory, which is what transformers and the adapter read.
    """
    from .plugins import get_plugins

    directory = Path(directory)
    _check_is_directory(directory)
    manifest = read_manifest(directory, verify=False)
    problems = _listing_problems(directory, manifest)
    if problems:
        raise _verification_error(directory, problems)
    _check_versions(manifest)
    plugins = plugins or get_plugins()
    with tempfile.TemporaryDirectory(prefix=f"ftq-verified-{directory.name}-") as private:
        return _load_verified(directory, Path(private), manifest, plugins)


def _check_is_directory(directory: Path) -> None:
    if directory.is_file():
        raise ArtifactError(
            f"{directory} is a file, not an artifact: an artifact is the directory that holds manifest.json "
            f"(for example ftq-out/model)"
        )
    if not directory.is_dir():
        olds = sorted(directory.parent.glob(f"{directory.name}.old-*"))
        hint = f" A previous complete artifact was left at {olds[-1]} by an interrupted save." if olds else ""
        raise ArtifactError(f"no artifact at {directory}: the directory does not exist.{hint}")


def _load_verified(directory: Path, private: Path, manifest: dict, plugins) -> LoadedArtifact:
    """:func:`load_artifact` once the manifest is checked: ``private`` receives the verified small files."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    from .attention import restore_attention_dtype

    try:
        weight_map = _weight_map(directory, manifest)
        _verified_copies(directory, private, manifest, skip={WEIGHTS, WEIGHTS_INDEX, *(weight_map or {}).values()})
        tensors = _load_weights(directory, manifest, weight_map)
        model = _empty_model(private, directory)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ArtifactError(
            f"artifact {directory} cannot be read ({type(exc).__name__}: {exc}). It is damaged or was not "
            f"written by ftq; write it again from the source model."
        ) from None
    _check_finite(directory, tensors)
    model = _fill(directory, model, tensors, manifest, plugins)
    restore_attention_dtype(model)  # recorded in config.json by the quantizer, if any
    adapter = manifest.get("adapter")
    if adapter and not adapter.get("merged"):
        model = _attach_saved_adapter(model, private, manifest, plugins)
    model.eval()
    tokenizer = None
    if (private / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(private), trust_remote_code=False)
        tokenizer.name_or_path = str(directory)
    return LoadedArtifact(model, tokenizer, manifest)


def _empty_model(private: Path, directory: Path):
    """The model ``config.json`` describes, its parameters on the meta device (filled by :func:`_fill`)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(private), trust_remote_code=False)
    config._name_or_path = str(directory)  # not the private copy, which is gone once loaded
    # Parameters start on the meta device: the saved tensors (int8 layers, float norms) are all
    # the model holds, never a float32 copy of every weight first (538 MB for SmolLM2-135M,
    # which glibc keeps resident after the swap).  Buffers such as rotary tables stay real.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)


def _fill(directory: Path, model, tensors: dict[str, Any], manifest: dict, plugins):
    """Put the artifact's tensors into ``model``: codec-saved layers rebuilt and swapped in, the rest loaded."""
    import torch

    from .layers import set_submodule

    modules = manifest["modules"]
    known = {name for name, _ in model.named_modules() if name}
    stray = sorted(name for name in modules if name not in known)
    if stray:
        raise ArtifactError(f"artifact {directory} names layers its model does not have: {stray[:5]}. It is damaged "
                            f"or was edited; write it again from the source model.")
    restored = restore_modules(tensors, modules, manifest.get("codecs", {}), plugins)
    # Float tensors go in while every layer is still a float module (quantized
    # modules have load hooks of their own that expect their own keys).
    result = model.load_state_dict(_fitted(directory, model, tensors), strict=False, assign=True)
    unexplained = [key for key in result.missing_keys if not any(key.startswith(n + ".") for n in modules)]
    if unexplained or result.unexpected_keys:
        raise ArtifactError(
            f"artifact {directory} does not fit its config: missing {unexplained[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}. It is damaged or was edited; write it again."
        )
    for name, module in restored.items():
        set_submodule(model, name, module)
    empty = [name for name, value in model.state_dict(keep_vars=True).items()
             if isinstance(value, torch.Tensor) and value.is_meta]
    if empty:
        raise ArtifactError(f"artifact {directory} holds no values for {empty[:5]}. It is damaged or was edited; "
                            f"write it again.")
    return model
