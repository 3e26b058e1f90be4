"""Loading never unpickles, every artifact file is checksummed and verified, and plugin code
runs only when the plugin is installed and not disabled."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def _malicious_pickle(marker: Path) -> bytes:
    return pickle.dumps(_Payload(marker))


def test_the_payload_is_live(tmp_path):
    """Sanity: unpickling the payload does run code, so the refusals below mean something."""
    marker = tmp_path / "ran"
    pickle.loads(_malicious_pickle(marker))
    assert marker.read_text() == "pwned"


@pytest.fixture
def artifact(tmp_path, tiny_tokenizer):
    from ftq_testing import make_tiny_llama

    import ftq_core
    from ftq_core.artifacts import save_artifact

    result = ftq_core.quantize(make_tiny_llama(len(tiny_tokenizer)), "dynamic")
    return save_artifact(result.model, tiny_tokenizer, tmp_path / "model", manifest={"method": "dynamic", "engine": result.engine})


def _relist(directory: Path) -> None:
    """Rewrite the manifest so its checksums match the directory: what an attacker would do."""
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["files"] = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.name != "manifest.json"
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any unpickling during the test fails it, wherever it comes from (ftq, transformers, torch)."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    class RefusingUnpickler(pickle.Unpickler):  # still subclassable by modules imported meanwhile
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "optimizer.pkl"])
def test_planted_pickle_in_an_artifact_is_refused_without_running(tmp_path, artifact, name):
    import ftq_core
    from ftq_core.errors import ArtifactError

    marker = tmp_path / "pwned"
    (artifact / name).write_bytes(_malicious_pickle(marker))
    _relist(artifact)  # even with checksums that match
    with pytest.raises(ArtifactError, match=rf"it holds pickle-based file\(s\) {re.escape(name)}\..*never unpickles"):
        ftq_core.load(artifact)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused_without_running(tmp_path, artifact):
    import ftq_core
    from ftq_core.errors import ArtifactError

    marker = tmp_path / "pwned"
    (artifact / "model.safetensors").write_bytes(_malicious_pickle(marker))
    _relist(artifact)
    with pytest.raises(ArtifactError, match=r"cannot be read \((SafetensorError|ValueError): .*It is damaged or was not written by ftq"):
        ftq_core.load(artifact)
    assert not marker.exists()


def test_loading_an_artifact_and_a_model_never_unpickles(tmp_path, artifact, tiny_model_dir, no_unpickling):
    import ftq_core
    from ftq_core.models import load_model

    loaded = ftq_core.load(artifact)
    assert loaded.manifest["files"]
    model_dir = tmp_path / "with-pickle"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "pwned"
    (model_dir / "pytorch_model.bin").write_bytes(_malicious_pickle(marker))  # safetensors wins; the .bin is never read
    assert load_model(str(model_dir)).model is not None
    assert not marker.exists()


def test_model_directory_with_only_pickle_weights_is_refused(tmp_path, tiny_model_dir, no_unpickling):
    from ftq_core.errors import ModelNotFoundError
    from ftq_core.models import load_model

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (model_dir / "pytorch_model.bin").write_bytes(_malicious_pickle(marker))
    with pytest.raises(ModelNotFoundError, match="has no .safetensors weights .*never unpickles"):
        load_model(str(model_dir))
    assert not marker.exists()


def test_resume_from_a_checkpoint_with_a_planted_pickle_is_refused(tmp_path, tiny_tokenizer, no_unpickling):
    from ftq_testing import SAMPLE_TEXT, make_tiny_llama

    from ftq_core.data import splits_from_texts
    from ftq_core.errors import TrainingError
    from ftq_plugins.trainers.causal_lm import CausalLMTrainer, CausalLMTrainerConfig

    splits = splits_from_texts([SAMPLE_TEXT.read_text()], tiny_tokenizer, block_size=32)
    trainer = CausalLMTrainer(CausalLMTrainerConfig(max_steps=2, checkpoint_every=2, progress=False, eval_batches=1))
    trainer.train(make_tiny_llama(len(tiny_tokenizer)), splits, checkpoint_dir=str(tmp_path / "ckpt"), resume=False)
    marker = tmp_path / "pwned"
    (tmp_path / "ckpt" / "step-00000002" / "optimizer.safetensors").write_bytes(_malicious_pickle(marker))
    longer = CausalLMTrainer(CausalLMTrainerConfig(max_steps=3, checkpoint_every=2, progress=False, eval_batches=1))
    with pytest.raises(TrainingError, match="cannot resume from checkpoint .*step-00000002"):
        longer.train(make_tiny_llama(len(tiny_tokenizer)), splits, checkpoint_dir=str(tmp_path / "ckpt"), resume=True)
    assert not marker.exists()


def _sources() -> list[Path]:
    return sorted([*REPO.joinpath("ftq_core").rglob("*.py"), *REPO.joinpath("plugins").rglob("*.py")])


def test_source_never_unpickles_or_runs_remote_code():
    """A grep over ftq's own code: no pickle module, torch.load only with weights_only=True."""
    problems = []
    for path in _sources():
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                problems.append(f"{path.name}: {match.group(0)}")
        for pattern in (r"^\s*import pickle", r"^\s*from pickle", r"import dill", r"weights_only\s*=\s*False",
                        r"trust_remote_code\s*=\s*True", r"\.load\(.*pickle"):
            for match in re.finditer(pattern, text, flags=re.MULTILINE):
                problems.append(f"{path.name}: {match.group(0).strip()}")
    assert len(_sources()) > 10
    assert not problems, problems


def test_manifest_records_a_checksum_of_every_file(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    files = {p.name for p in artifact.iterdir() if p.name != "manifest.json"}
    assert set(manifest["files"]) == files and "model.safetensors" in files
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((artifact / name).read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("edit", ["flip-weights-byte", "edit-tokenizer", "delete-config"])
def test_load_verifies_every_checksum(artifact, edit):
    import ftq_core
    from ftq_core.errors import ArtifactError

    if edit == "flip-weights-byte":
        data = bytearray((artifact / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 1
        (artifact / "model.safetensors").write_bytes(bytes(data))
        expected = "model.safetensors does not match its checksum"
    elif edit == "edit-tokenizer":
        (artifact / "tokenizer.json").write_text((artifact / "tokenizer.json").read_text() + " ")
        expected = "tokenizer.json does not match its checksum"
    else:
        (artifact / "config.json").unlink()
        expected = "config.json is missing"
    with pytest.raises(ArtifactError, match=f"failed verification: {expected}"):
        ftq_core.load(artifact)


# -- plugin code runs only when installed and not disabled ----------------------------


def _install_fake_plugin(site: Path, module: str, marker: Path, *, entry_point: bool = True) -> None:
    """A plugin module whose import leaves ``marker``, and (optionally) its installed dist-info."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        from dataclasses import dataclass
        from ftq_core import hookimpl

        Path({str(marker)!r}).write_text("imported")

        @dataclass(frozen=True, kw_only=True)
        class Options:
            pass

        @hookimpl
        def register_quantizers(register):
            register("fake-{module}", lambda config: None, Options)
    """))
    if entry_point:
        dist = site / f"{module}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        (dist / "entry_points.txt").write_text(f"[ftq]\n{module} = {module}\n")


@pytest.mark.parametrize(
    ("load", "disable", "installed", "runs"),
    [
        (None, None, True, True),  # installed, autoload on
        ("", None, True, False),  # FTQ_LOAD_PLUGINS="": third-party loading off
        ("someone-else", None, True, False),  # allow-list without it
        (None, "self", True, False),  # FTQ_DISABLE_PLUGINS names it
        (None, None, False, False),  # importable but not installed as a plugin
    ],
    ids=["installed", "autoload-off", "not-allowed", "disabled", "not-installed"],
)
def test_plugin_code_runs_only_when_installed_and_enabled(tmp_path, monkeypatch, request, load, disable, installed, runs):
    from ftq_core.plugins import Plugins

    module = f"ftq_fake_plugin_{request.node.callspec.id.replace('-', '_')}"
    marker = tmp_path / "imported"
    _install_fake_plugin(tmp_path / "site", module, marker, entry_point=installed)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    if load is None:
        monkeypatch.delenv("FTQ_LOAD_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("FTQ_LOAD_PLUGINS", load)
    if disable:
        monkeypatch.setenv("FTQ_DISABLE_PLUGINS", module)
    plugins = Plugins()
    assert marker.exists() is runs
    names = {info.name: info for info in plugins.describe()}
    if runs:
        assert names[module].loaded and names[module].location == str(tmp_path / "site" / f"{module}.py")
        assert f"fake-{module}" in plugins.table("quantizer").names()
    else:
        assert f"fake-{module}" not in plugins.table("quantizer").names()
    if disable:
        assert names[module].disabled and not names[module].loaded and names[module].errors == []


def test_cli_disable_flag_keeps_plugin_code_from_running(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ftq_core.cli import cli

    module = "ftq_fake_plugin_cli_disabled"
    marker = tmp_path / "imported"
    _install_fake_plugin(tmp_path / "site", module, marker)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("FTQ_LOAD_PLUGINS", raising=False)
    result = CliRunner().invoke(cli, ["--disable-plugin", module, "plugins", "--json"])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    listed = {p["name"]: p for p in json.loads(result.output)}
    assert listed[module]["loaded"] is False


def test_bundled_model_loads_without_unpickling(no_unpickling):
    """The real SmolLM2 path (GGUF, then the safetensors cache) never unpickles; its disk estimate is sane."""
    from ftq_core.errors import ModelNotFoundError
    from ftq_core.models import load_model
    from ftq_core.preflight import estimate_run_bytes, model_bytes

    try:
        loaded = load_model("smollm2")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    size = model_bytes(loaded.model)
    assert 400 * 2**20 < size < 700 * 2**20  # ~135M float32 parameters, tied embedding counted once
    assert estimate_run_bytes(size, checkpoints_kept=2) > 11 * size


# -- no code from an artifact or model directory, no links out --------------------

_EVIL_MODULE = """
open({marker!r}, "w").write("pwned")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "evil-llama"
"""


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The real ``ftq`` in a subprocess: real stdin (a "y" for any prompt), exit code and stderr."""
    env = dict(os.environ, FTQ_LOAD_PLUGINS="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FTQ_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ftq_core.cli", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def _plant_remote_code(directory: Path, json_name: str, marker: Path) -> None:
    """What the attack looks like: a code file and an ``auto_map`` naming it."""
    (directory / "evil.py").write_text(_EVIL_MODULE.format(marker=str(marker)))
    path = directory / json_name
    content = json.loads(path.read_text()) if path.is_file() else {}
    content["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoTokenizer": ["evil.EvilConfig", None]}
    path.write_text(json.dumps(content))


def test_the_remote_code_payload_is_live(tmp_path, tiny_model_dir):
    """Sanity: transformers does run the planted code when asked to trust it, so the refusals below mean something."""
    from transformers import AutoConfig

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "ran"
    _plant_remote_code(model_dir, "config.json", marker)
    AutoConfig.from_pretrained(str(model_dir), trust_remote_code=True)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("json_name", ["config.json", "tokenizer_config.json"])
@pytest.mark.parametrize("stdin", ["y\n", None], ids=["answers-y", "no-stdin"])
def test_artifact_with_auto_map_never_runs_its_code(tmp_path, artifact, json_name, stdin):
    marker = tmp_path / "pwned"
    _plant_remote_code(artifact, json_name, marker)
    _relist(artifact)  # checksums that match: only the content gives it away
    result = _cli("generate", str(artifact), "-p", "hello", "-n", "2", stdin=stdin)
    assert result.returncode == 1, result.stderr
    assert f"{json_name} has an auto_map" in result.stderr and "never runs code from an artifact" in result.stderr
    assert "evil.py is a code file" in result.stderr
    assert "Traceback" not in result.stderr and "[y/N]" not in result.stdout + result.stderr
    assert not marker.exists()


def test_code_file_alone_in_an_artifact_is_refused(tmp_path, artifact):
    import ftq_core
    from ftq_core.errors import ArtifactError

    (artifact / "helper.so").write_bytes(b"\x7fELF")
    _relist(artifact)
    with pytest.raises(ArtifactError, match="helper.so is a code file"):
        ftq_core.load(artifact)


def test_symlink_out_of_an_artifact_is_refused(tmp_path, artifact):
    import ftq_core
    from ftq_core.errors import ArtifactError

    outside = tmp_path / "elsewhere.json"
    shutil.copy(artifact / "tokenizer.json", outside)  # same bytes: the checksum alone cannot tell
    (artifact / "tokenizer.json").unlink()
    (artifact / "tokenizer.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"tokenizer.json is a symbolic link to .*elsewhere.json, outside"):
        ftq_core.load(artifact)


def test_hard_link_in_an_artifact_is_refused(tmp_path, artifact):
    import ftq_core
    from ftq_core.errors import ArtifactError

    os.link(artifact / "tokenizer.json", tmp_path / "second-name.json")
    with pytest.raises(ArtifactError, match=r"tokenizer.json is a hard link \(2 names"):
        ftq_core.load(artifact)


def test_model_directory_with_auto_map_is_refused_before_transformers_reads_it(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    marker = tmp_path / "pwned"
    _plant_remote_code(model_dir, "config.json", marker)
    result = _cli("quantize", str(model_dir), "-o", str(tmp_path / "out"), stdin="y\n")
    assert result.returncode == 2, result.stderr
    assert "config.json has an auto_map" in result.stderr and "never code from a model directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_model_directory_linking_outside_is_refused(tmp_path, tiny_model_dir):
    from ftq_core.errors import ModelNotFoundError
    from ftq_core.models import load_model

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    shutil.move(model_dir / "tokenizer.json", tmp_path / "secret.json")
    (model_dir / "tokenizer.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(ModelNotFoundError, match="tokenizer.json is a symbolic link to .*secret.json, outside"):
        load_model(str(model_dir))


def test_hub_cache_snapshot_links_into_its_own_blobs_load(tmp_path, tiny_model_dir):
    """A Hugging Face cache snapshot is all links into ``../../blobs``: that layout is accepted."""
    from ftq_core.models import load_model

    repo = tmp_path / "models--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(tiny_model_dir.iterdir())):
        blob = repo / "blobs" / f"blob{index}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    assert load_model(str(snapshot)).model is not None


def test_checkpoint_with_a_symlink_is_refused_on_resume(tmp_path, tiny_tokenizer):
    from ftq_testing import SAMPLE_TEXT, make_tiny_llama

    from ftq_core.data import splits_from_texts
    from ftq_core.errors import TrainingError
    from ftq_plugins.trainers.causal_lm import CausalLMTrainer, CausalLMTrainerConfig

    splits = splits_from_texts([SAMPLE_TEXT.read_text()], tiny_tokenizer, block_size=32)
    trainer = CausalLMTrainer(CausalLMTrainerConfig(max_steps=2, checkpoint_every=2, progress=False, eval_batches=1))
    trainer.train(make_tiny_llama(len(tiny_tokenizer)), splits, checkpoint_dir=str(tmp_path / "ckpt"), resume=False)
    state = tmp_path / "ckpt" / "step-00000002" / "state.json"
    shutil.move(state, tmp_path / "state.json")
    state.symlink_to(tmp_path / "state.json")
    with pytest.raises(TrainingError, match="state.json is a symbolic link .*outside"):
        trainer.train(make_tiny_llama(len(tiny_tokenizer)), splits, checkpoint_dir=str(tmp_path / "ckpt"), resume=True)


def test_chat_template_escape_is_stopped_with_one_line(tmp_path, tiny_tokenizer):
    import copy

    from ftq_testing import make_tiny_llama

    import ftq_core
    from ftq_core.artifacts import save_artifact

    marker = tmp_path / "pwned"
    tokenizer = copy.deepcopy(tiny_tokenizer)
    # the classic Jinja escape: from a string to object.__subclasses__() and on to os
    tokenizer.chat_template = (
        "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}"
    )
    result = ftq_core.quantize(make_tiny_llama(len(tokenizer)), "dynamic")
    path = save_artifact(result.model, tokenizer, tmp_path / "model", manifest={"method": "dynamic", "engine": result.engine})
    out = _cli("generate", str(path), "-p", "hi", "-n", "2", "--chat")
    assert out.returncode == 1, out.stderr
    assert "template sandbox stopped it" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not marker.exists()
