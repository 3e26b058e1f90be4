"""What ftq opens while it loads someone else's files: nothing outside what it was given.

Python raises an ``open`` audit event for every file opened through it
(``open``, ``os.open``, ``io`` and the libraries built on them); a hook
records the paths while a test loads an artifact or a model directory, and
every path must lie inside that directory or in the software ftq runs on
(the interpreter, site-packages, the machine's own /proc, /sys and /dev).
Hostile directories must be refused without their outside targets ever
being opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

_recording: list[str] | None = None


def _hook(event: str, args: tuple) -> None:
    if _recording is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _recording.append(os.fsdecode(args[0]))


sys.addaudithook(_hook)  # hooks cannot be removed; it records only inside `opened`


@contextlib.contextmanager
def opened():
    """Yields a list that fills with the absolute paths opened inside the block (kept if the block raises)."""
    global _recording
    paths: list[Path] = []
    _recording = []
    try:
        yield paths
    finally:
        paths.extend(Path(os.path.abspath(p)).resolve() for p in _recording)
        _recording = None


def _software_roots() -> list[Path]:
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values(), "/proc", "/sys", "/dev",
             "/etc", "/usr", "/lib", "/lib64"}
    roots.update(p for p in sys.path if p and os.path.isdir(p))  # the repository itself when run from a checkout
    return [Path(r).resolve() for r in roots if r]


def _private(path: Path) -> bool:
    """A folder ftq made for itself in the temporary directory (verified copies of small files, say)."""
    tmp = Path(tempfile.gettempdir()).resolve()
    return tmp in path.parents and path.relative_to(tmp).parts[0].startswith("ftq-")


def _outside(paths: list[Path], allowed: list[Path]) -> list[Path]:
    roots = [*_software_roots(), *(a.resolve() for a in allowed)]
    return sorted({p for p in paths if not _private(p) and not any(p == r or r in p.parents for r in roots)})


@pytest.fixture
def artifact(tmp_path, tiny_tokenizer):
    from ftq_testing import make_tiny_llama

    import ftq_core
    from ftq_core.artifacts import save_artifact

    result = ftq_core.quantize(make_tiny_llama(len(tiny_tokenizer)), "dynamic")
    return save_artifact(result.model, tiny_tokenizer, tmp_path / "model", manifest={"method": "dynamic", "engine": result.engine})


def test_loading_an_artifact_opens_nothing_outside_it(artifact):
    from ftq_core.artifacts import load_artifact

    with opened() as paths:
        load_artifact(artifact)
    assert any(p.parent == artifact.resolve() for p in paths), "the hook saw the artifact's own files"
    assert _outside(paths, [artifact]) == []


def test_loading_a_model_directory_opens_nothing_outside_it(tiny_model_dir):
    from ftq_core.models import load_model

    with opened() as paths:
        load_model(str(tiny_model_dir), use_cache=False)
    assert any(p.parent == tiny_model_dir.resolve() for p in paths)
    assert _outside(paths, [tiny_model_dir]) == []


@pytest.mark.parametrize("name", ["../secret.txt", "ABSOLUTE", "sub/../../secret.txt"])
def test_a_manifest_naming_a_file_outside_is_refused_without_opening_it(tmp_path, artifact, name):
    from ftq_core.artifacts import load_artifact
    from ftq_core.errors import ArtifactError

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the artifact")
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["files"][str(secret) if name == "ABSOLUTE" else name] = hashlib.sha256(secret.read_bytes()).hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))  # checksums true: what a hostile sender writes
    with opened() as paths, pytest.raises(ArtifactError, match="manifest"):
        load_artifact(artifact)
    assert secret.resolve() not in paths


def test_a_hub_snapshot_whose_blobs_link_out_is_refused_without_opening_the_target(tmp_path, tiny_model_dir):
    from ftq_core.errors import FtqError
    from ftq_core.models import load_model

    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.jinja"
    secret.write_text("{{ 'leaked' }}")
    repo = tmp_path / "models--x--y"
    snapshot = repo / "snapshots" / "abc"
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "blobs").symlink_to(outside, target_is_directory=True)  # blobs itself leaves the cache
    (snapshot / "chat_template.jinja").symlink_to(repo / "blobs" / "secret.jinja")
    with opened() as paths, pytest.raises(FtqError, match="is refused"):
        load_model(str(snapshot), use_cache=False)
    assert secret.resolve() not in paths
