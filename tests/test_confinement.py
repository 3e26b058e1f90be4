"""Everything ftq opens, writes or deletes stays inside what it was given, and a hostile artifact,
output directory or checkpoint gets one clear refusal, never a traceback.

Marker files outside the tree prove nothing there is touched: a planted link's target keeps its
content, another directory's checkpoints survive, an outside file is never hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _cli(*args: str):
    from click.testing import CliRunner

    from ftq_core.cli import cli

    return CliRunner().invoke(cli, list(args))


def _refused(result, code: int, *fragments: str) -> str:
    """The ``Error:`` text of a handled refusal with exit ``code`` holding every fragment."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    error = result.output[result.output.index("Error: "):]
    for fragment in fragments:
        assert fragment in error, f"{fragment!r} not in {error!r}"
    return error


def _copy(artifact: Path, tmp: Path) -> Path:
    copy = tmp / "copy" / "model"
    shutil.copytree(artifact, copy)
    return copy


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def _reseal(path: Path, name: str) -> None:
    """Record ``name``'s current checksum in the manifest (an edit made to look like ftq's own)."""
    manifest = _manifest(path)
    manifest["files"][name] = hashlib.sha256((path / name).read_bytes()).hexdigest()
    _write_manifest(path, manifest)


def _edit_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "ftq-artifact"})
    _reseal(path, "model.safetensors")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- lock files --------------------------------------------------------------------


def test_planted_symlink_lock_is_refused_and_its_target_untouched(tmp_path, tiny_model_dir):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    (tmp_path / ".model.ftq-lock").symlink_to(victim)
    result = _cli("quantize", str(tiny_model_dir), "-o", str(tmp_path / "model"))
    _refused(result, 2, ".model.ftq-lock is a symbolic link (to ", "not a lock file ftq made", "Remove ")
    assert victim.read_text() == "keep me"


def test_planted_dangling_run_lock_creates_no_file(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    missing = tmp_path / "created-by-ftq"
    (out / ".ftq-lock").symlink_to(missing)
    result = _cli("run", "--model", str(tiny_model_dir), "-o", str(out), "--set", "trainer.max_steps=1")
    _refused(result, 2, ".ftq-lock is a symbolic link")
    assert not os.path.lexists(missing)


def test_hard_linked_lock_is_refused(tmp_path):
    from ftq_core.errors import UsageError
    from ftq_core.output_lock import output_lock

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    os.link(victim, tmp_path / ".ftq-lock")
    with pytest.raises(UsageError, match=r"is a hard link \(2 names for one file\), not a lock file ftq made"):
        with output_lock(tmp_path / ".ftq-lock", what="out"):
            pass
    assert victim.read_text() == "keep me"


def test_quantize_leaves_no_lock_file_behind(artifact_dir):
    assert not [p.name for p in artifact_dir.parent.iterdir() if p.name.endswith(".ftq-lock")]


def test_a_run_and_a_quantize_into_its_artifact_exclude_each_other(tmp_path, tiny_model_dir):
    from ftq_core.errors import UsageError
    from ftq_core.output_lock import run_lock, target_lock

    out = tmp_path / "out"
    with run_lock(out):
        result = _cli("quantize", str(tiny_model_dir), "-o", str(out / "model"))
        _refused(result, 2, f"artifact directory {out / 'model'} is in use by ftq process {os.getpid()}")
    with target_lock(out / "model", what="artifact"):
        with pytest.raises(UsageError, match=f"is in use by ftq process {os.getpid()}"):
            with run_lock(out):
                pass
    assert not [p for p in [out / ".ftq-lock", out / ".model.ftq-lock"] if p.exists()]  # all released and deleted


# -- exports -----------------------------------------------------------------------


def test_export_cleans_stale_staging_of_dead_processes_only(tmp_path, artifact_dir):
    stale = tmp_path / f".exported.partial-{_dead_pid()}-abc"
    live = tmp_path / f".exported.partial-{os.getpid()}-xyz"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    result = _cli("export", str(artifact_dir), "-o", str(tmp_path / "exported"))
    assert result.exit_code == 0, result.output
    assert not stale.exists() and live.exists()
    assert not list(tmp_path.glob(".exported.ftq-lock"))


def test_export_onto_a_symlink_is_refused_before_any_work(tmp_path, artifact_dir, monkeypatch):
    import ftq_core.pipeline as pipeline

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "exported").symlink_to(elsewhere)
    monkeypatch.setattr(pipeline, "load", lambda directory: pytest.fail("the artifact was loaded"))
    result = _cli("export", str(artifact_dir), "-o", str(tmp_path / "exported"))
    _refused(result, 2, "exported is a symbolic link (to ", "Choose another -o, or remove the link.")
    assert list(elsewhere.iterdir()) == []


# -- checkpoints -------------------------------------------------------------------


def _other_checkpoints(tmp_path: Path) -> Path:
    other = tmp_path / "other-run-checkpoints"
    (other / "step-00000001").mkdir(parents=True)
    (other / "step-00000001" / "state.json").write_text('{"step": 1}')
    return other


def test_linked_checkpoints_directory_is_refused_before_training(tmp_path, tiny_model_dir):
    other = _other_checkpoints(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoints").symlink_to(other)
    result = _cli("run", "--model", str(tiny_model_dir), "-o", str(out), "--set", "trainer.max_steps=1")
    _refused(result, 2, "checkpoints is a symbolic link (to ", "will not do that in another directory")
    assert (other / "step-00000001" / "state.json").exists()


def _save(root: Path, step: int, keep: int = 1):
    import torch

    from ftq_plugins.trainers.checkpoints import save_checkpoint

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return save_checkpoint(root, step=step, model=model, optimizer=optimizer, scheduler=scheduler, extra={}, keep=keep)


def test_checkpoint_rotation_never_follows_links(tmp_path):
    from ftq_core.errors import TrainingError

    other = _other_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "step-00000000").symlink_to(other / "step-00000001")  # the oldest name: rotation drops it
    _save(root, 5, keep=1)
    assert (other / "step-00000001" / "state.json").exists()
    assert not os.path.lexists(root / "step-00000000") and (root / "step-00000005").is_dir()
    linked = tmp_path / "linked"
    linked.symlink_to(other)
    with pytest.raises(TrainingError, match="linked is a symbolic link"):
        _save(linked, 6)
    assert sorted(p.name for p in other.iterdir()) == ["step-00000001"]


@pytest.mark.parametrize("pointer", ["/abs/step-00000001", "../other-run-checkpoints/step-00000001", "step-1/../..",
                                     "model.safetensors"])
def test_latest_must_name_a_step_folder_inside(tmp_path, pointer):
    from ftq_core.errors import TrainingError
    from ftq_plugins.trainers.checkpoints import latest_checkpoint

    _other_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    _save(root, 2)
    (root / "latest").write_text(pointer.replace("/abs", str(tmp_path / "other-run-checkpoints")) + "\n")
    with pytest.raises(TrainingError, match=r"cannot resume: .*latest names .*, not a step-N folder inside"):
        latest_checkpoint(root)


def test_latest_as_a_link_or_naming_a_link_is_refused(tmp_path):
    from ftq_core.errors import TrainingError
    from ftq_plugins.trainers.checkpoints import latest_checkpoint

    other = _other_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    _save(root, 2)
    (root / "step-00000009").symlink_to(other / "step-00000001")
    (root / "latest").write_text("step-00000009\n")
    with pytest.raises(TrainingError, match="step-00000009 is a symbolic link"):
        latest_checkpoint(root)
    (root / "step-00000009").unlink()
    (root / "latest").unlink()
    (root / "latest").symlink_to(tmp_path / "pointer")
    with pytest.raises(TrainingError, match="latest is not a file"):
        latest_checkpoint(root)


def test_checkpoint_disk_full_is_one_clear_error(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    from ftq_core.errors import TrainingError

    root = tmp_path / "checkpoints"
    _save(root, 1)

    def full(*args, **kwargs):
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(TrainingError, match="could not write the checkpoint of step 2 in .*: No space left on device; "
                                            "the previous checkpoint step-00000001 is intact"):
        _save(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]


# -- artifacts: disk full ----------------------------------------------------------


def test_artifact_disk_full_is_one_clear_error_and_keeps_the_old_one(tmp_path, artifact_dir, tiny_model_dir, monkeypatch):
    import safetensors
    import safetensors.torch

    target = _copy(artifact_dir, tmp_path)
    before = (target / "manifest.json").read_bytes()

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                          'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = _cli("quantize", str(tiny_model_dir), "-o", str(target))
    _refused(result, 1, f"could not save the artifact to {target}: No space left on device; the previous artifact "
                        f"there is unchanged. Free some disk space")
    assert (target / "manifest.json").read_bytes() == before
    assert not list(target.parent.glob(".model.partial-*"))


# -- artifacts: manifest names and schema ------------------------------------------


@pytest.mark.parametrize("name", ["../secret.bin", "/etc/hostname", "sub/model.safetensors", ".."])
def test_manifest_file_names_must_be_plain(tmp_path, artifact_dir, monkeypatch, name):
    import ftq_core.artifacts as artifacts
    from ftq_core.errors import ArtifactError

    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "secret.bin").write_bytes(b"outside")
    path = _copy(artifact_dir, tmp_path)
    manifest = _manifest(path)
    manifest["files"][name] = hashlib.sha256(b"outside").hexdigest()
    _write_manifest(path, manifest)
    opened = []
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: opened.append(p) or "0" * 64)
    with pytest.raises(ArtifactError, match=r"manifest.json is malformed: a key of files must be a plain file name "
                                            r"inside the artifact .*; write the artifact again from the source model"):
        artifacts.read_manifest(path)
    assert opened == []


MALFORMED = [
    ("modules-is-a-list", lambda m: m.update(modules=[]), "modules must be an object, got a list []"),
    ("format-version-string", lambda m: m.update(format_version="1"), "format_version must be an integer, got the string '1'"),
    ("module-without-codec", lambda m: m["modules"]["lm_head"].pop("codec"), "modules['lm_head'].codec is missing"),
    ("proc-self-mem", lambda m: m["files"].update({"/proc/self/mem": "0" * 64}), "a key of files must be a plain file name"),
    ("files-missing", lambda m: m.pop("files"), "files is missing"),
    ("files-is-a-list", lambda m: m.update(files=["model.safetensors"]), "files must be an object"),
    ("digest-is-a-number", lambda m: m["files"].update({"config.json": 5}), "files['config.json'] must be a SHA-256 digest"),
    ("meta-is-a-list", lambda m: m["modules"]["lm_head"].update(meta=[1]), "modules['lm_head'].meta must be an object"),
    ("aliases-is-a-list", lambda m: m.update(aliases=[["a", "b"]]), "aliases must be an object"),
    ("torch-version-number", lambda m: m["versions"].update(torch=2), "versions['torch'] must be a string, got the number 2"),
    ("engine-is-a-list", lambda m: m.update(engine=["x86"]), "engine must be a string"),
    ("layers-is-an-object", lambda m: m.update(layers={}), "layers must be a list"),
    ("adapter-files-with-a-path", lambda m: m.update(adapter={"name": "lora", "files": ["../x"]}),
     "adapter.files[0] must be a plain file name"),
    ("manifest-is-a-list", lambda m: None, "the manifest must be an object, got a list [{"),
]


@pytest.mark.parametrize(("edit", "fragment"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_manifest_is_one_clear_error(tmp_path, artifact_dir, edit, fragment):
    path = _copy(artifact_dir, tmp_path)
    manifest = _manifest(path)
    edit(manifest)
    _write_manifest(path, [manifest] if "got a list [{" in fragment else manifest)
    result = _cli("generate", str(path), "-p", "hi", "-n", "1")
    error = _refused(result, 1, "manifest.json is malformed: ", fragment)
    assert error.rstrip().endswith("; write the artifact again from the source model")


# -- artifacts: the bytes verified are the bytes used -----------------------------


def test_weights_swapped_after_a_separate_check_are_refused(tmp_path, artifact_dir, monkeypatch):
    import ftq_core.artifacts as artifacts
    from ftq_core.errors import ArtifactError

    path = _copy(artifact_dir, tmp_path)
    swapped = tmp_path / "swapped.safetensors"
    shutil.copy(path / "model.safetensors", swapped)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(swapped))
    tensors["model.layers.0.input_layernorm.weight"] *= 3
    save_file(tensors, str(swapped), metadata={"format": "ftq-artifact"})
    real = artifacts.sha256_file

    def hash_then_swap(file):
        digest = real(file)
        if Path(file).name == "model.safetensors":
            os.replace(swapped, file)  # the attacker wins the race right after any separate check
        return digest

    monkeypatch.setattr(artifacts, "sha256_file", hash_then_swap)
    monkeypatch.setattr("ftq_core.tensor_io.sha256_file", hash_then_swap)
    artifacts.read_manifest(path)  # a separate check passes, then the file is swapped
    with pytest.raises(ArtifactError, match="model.safetensors does not match its checksum"):
        artifacts.load_artifact(path)


def test_config_swapped_after_the_manifest_check_is_refused(tmp_path, artifact_dir, monkeypatch):
    import ftq_core.artifacts as artifacts
    from ftq_core.errors import ArtifactError

    path = _copy(artifact_dir, tmp_path)
    real = artifacts.read_manifest

    def check_then_swap(directory, **kwargs):
        manifest = real(directory, **kwargs)
        config = json.loads((path / "config.json").read_text())
        config["rms_norm_eps"] = 0.5
        (path / "config.json").write_text(json.dumps(config))
        return manifest

    monkeypatch.setattr(artifacts, "read_manifest", check_then_swap)
    with pytest.raises(ArtifactError, match="config.json does not match its checksum"):
        artifacts.load_artifact(path)


# -- artifacts: tensors that lie ---------------------------------------------------


def _nan(name: str):
    return lambda t: t[name].__setitem__(0, float("nan"))


def _duplicate_key(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length].decode()
    first, last = "model.layers.0.self_attn.k_proj.weight_scale", "model.layers.1.self_attn.k_proj.weight_scale"
    assert first in header and last in header
    header = header.replace(f'"{last}"', f'"{first}"').encode()
    (path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length:])
    _reseal(path, "model.safetensors")


LYING_TENSORS = [
    ("norm-of-the-wrong-shape", lambda p: _edit_weights(p, lambda t: t.update({
        "model.layers.0.input_layernorm.weight": t["model.layers.0.input_layernorm.weight"][:16].clone()})),
     "tensor 'model.layers.0.input_layernorm.weight' has shape (16,), and the model's config gives it (32,)"),
    ("duplicate-tensor-name", _duplicate_key, "appears twice"),
    ("nan-scale", lambda p: _edit_weights(p, _nan("model.layers.1.mlp.up_proj.weight_scale")),
     "tensor 'model.layers.1.mlp.up_proj.weight_scale' holds NaN or infinite values"),
    ("inf-norm", lambda p: _edit_weights(p, lambda t: t["model.layers.1.post_attention_layernorm.weight"].fill_(float("inf"))),
     "tensor 'model.layers.1.post_attention_layernorm.weight' holds NaN or infinite values"),
    ("int8-norm", lambda p: _edit_weights(p, lambda t: t.update({
        "model.layers.0.input_layernorm.weight": t["model.layers.0.input_layernorm.weight"].to(__import__("torch").int8)})),
     "tensor 'model.layers.0.input_layernorm.weight' is stored as torch.int8, but it is a float tensor"),
]


@pytest.mark.parametrize(("edit", "fragment"), [c[1:] for c in LYING_TENSORS], ids=[c[0] for c in LYING_TENSORS])
def test_artifact_tensors_that_lie_are_refused(tmp_path, artifact_dir, edit, fragment):
    path = _copy(artifact_dir, tmp_path)
    edit(path)
    result = _cli("generate", str(path), "-p", "hi", "-n", "1")
    _refused(result, 1, fragment, "write it again")


# -- any manifest: loads or ArtifactError --------------------------------------------

_OTHER_VALUES = st.sampled_from([None, True, 0, -1, 2.5, "", "x", "../x", "/etc/passwd", [], ["a"], {}, {"a": 1}])
_BAD_NAMES = st.sampled_from(["../model.safetensors", "/etc/passwd", "a/b", "..", ".", "", "x\\y", "/proc/self/mem"])


@st.composite
def _mutation(draw, manifest: dict):
    """A manifest with one field deleted or replaced, or a file name that leaves the directory."""
    mutated = json.loads(json.dumps(manifest))
    kind = draw(st.sampled_from(["delete", "replace", "bad-name", "nested"]))
    if kind == "bad-name":
        mutated["files"][draw(_BAD_NAMES)] = draw(st.sampled_from([mutated["files"]["config.json"], "0" * 64]))
        return mutated
    holder = mutated
    if kind == "nested":
        key = draw(st.sampled_from(["modules", "files", "versions", "aliases", "codecs", "layers"]))
        holder = mutated[key]
        if isinstance(holder, list):
            holder = holder[0] if holder else mutated
        elif holder:
            inner = draw(st.sampled_from(sorted(holder)))
            holder = holder[inner] if isinstance(holder[inner], dict) and draw(st.booleans()) else holder
    if not holder:
        return mutated
    field = draw(st.sampled_from(sorted(holder)))
    if kind == "delete":
        del holder[field]
    else:
        holder[field] = draw(_OTHER_VALUES)
    return mutated


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutated_manifest_loads_or_is_an_artifact_error(artifact_dir, tmp_path_factory, data):
    import warnings

    from ftq_core.artifacts import load_artifact, read_manifest
    from ftq_core.errors import ArtifactError

    mutated = data.draw(_mutation(_manifest(artifact_dir)))
    path = _copy(artifact_dir, tmp_path_factory.mktemp("mutated"))
    _write_manifest(path, mutated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for load in (read_manifest, load_artifact):
            try:
                load(path)
            except ArtifactError:
                pass
