"""Faults lose nothing: kill -9 and resume, kill during save, diverging loss, full or unwritable disks."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ftq_testing import SAMPLE_TEXT

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def one_thread():
    """One torch thread: steadier timing on a busy machine, same numerics run to run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(FTQ_LOAD_PLUGINS="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("FTQ_DEBUG", None)
    return env


def _write_config(path: Path, model_dir: Path, output_dir: Path, *, max_steps: int, checkpoint_every: int) -> Path:
    path.write_text(
        f"""
model = "{model_dir}"
output_dir = "{output_dir}"
evaluate_pretrained = false

[dataset]
name = "text"
path = "{SAMPLE_TEXT}"
block_size = 32

[trainer]
name = "causal-lm"
max_steps = {max_steps}
batch_size = 2
checkpoint_every = {checkpoint_every}
keep_checkpoints = 2
progress = false
seed = 7

[eval]
max_blocks = 2
latency = false
"""
    )
    return path


def _ftq(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftq_core.cli", *args]


def _latest_step(checkpoints: Path) -> int:
    try:
        return int((checkpoints / "latest").read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return 0


def _outcome(out: Path) -> tuple[list, str, dict]:
    report = json.loads((out / "report.json").read_text())
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    return report["trainer"]["train_losses"], manifest["files"]["model.safetensors"], report["trainer"]


def test_kill_9_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_model_dir):
    """SIGKILL a real `ftq run`, `ftq run --resume`: same per-step losses and bitwise-same weights."""
    max_steps, every = 48, 4
    clean_cfg = _write_config(tmp_path / "clean.toml", tiny_model_dir, tmp_path / "clean", max_steps=max_steps, checkpoint_every=every)
    killed_cfg = _write_config(tmp_path / "killed.toml", tiny_model_dir, tmp_path / "killed", max_steps=max_steps, checkpoint_every=every)
    log = (tmp_path / "clean.log").open("w")
    clean = subprocess.Popen(_ftq("run", "-c", str(clean_cfg)), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    victim = subprocess.Popen(_ftq("run", "-c", str(killed_cfg)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 300
    while _latest_step(checkpoints) < 2 * every and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert victim.poll() is None, f"the run ended before it could be killed: {victim.stderr.read().decode()[-2000:]}"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = _latest_step(checkpoints)
    assert victim.returncode == -signal.SIGKILL
    assert 0 < killed_at < max_steps
    assert not (tmp_path / "killed" / "model").exists()

    resumed = subprocess.run(_ftq("run", "-c", str(killed_cfg), "--resume"), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing from" in resumed.stderr
    assert clean.wait(timeout=600) == 0, (tmp_path / "clean.log").read_text()[-3000:]

    clean_losses, clean_weights, _ = _outcome(tmp_path / "clean")
    resumed_losses, resumed_weights, trainer = _outcome(tmp_path / "killed")
    assert killed_at <= trainer["resumed_from"] < max_steps
    assert len(clean_losses) == max_steps
    assert resumed_losses == clean_losses  # bitwise: floats through JSON repr round-trip exactly
    assert resumed_weights == clean_weights  # SHA-256 of the saved weights


def _trainer(**options):
    from ftq_plugins.trainers.causal_lm import CausalLMTrainer, CausalLMTrainerConfig

    defaults = dict(max_steps=6, batch_size=2, checkpoint_every=2, progress=False, eval_batches=1, seed=3)
    return CausalLMTrainer(CausalLMTrainerConfig(**(defaults | options)))


@pytest.fixture
def tiny_splits(tiny_tokenizer):
    from ftq_core.data import splits_from_texts

    return splits_from_texts([SAMPLE_TEXT.read_text()], tiny_tokenizer, block_size=32)


class _Crash(Exception):
    pass


class FakeQuantObservers:
    """A training-aware quantizer's state in miniature: a FakeQuantize before every Linear,
    observing ranges until step 3, then frozen (``on_step`` as the protocol asks: a function
    of the step)."""

    freeze_at = 3

    def prepare(self, model):
        from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver

        from ftq_core.layers import iter_linear_layers

        for _, linear in list(iter_linear_layers(model)):
            linear.act_fq = FakeQuantize(observer=MovingAverageMinMaxObserver, quant_min=-128, quant_max=127, dtype=__import__("torch").qint8)
            linear.register_forward_pre_hook(lambda module, args: (module.act_fq(args[0]),))
        return model

    def on_step(self, step, model):
        from ftq_core.layers import iter_linear_layers

        if step >= self.freeze_at:
            for _, linear in iter_linear_layers(model):
                linear.act_fq.disable_observer()


def test_resume_restores_observer_state_and_continues_bitwise(tmp_path, tiny_tokenizer, tiny_splits, one_thread):
    """A crash after step 5 (checkpoint at 4) and a resume give the run that never crashed, observers included."""
    import torch
    from ftq_testing import make_tiny_llama

    def fresh():
        return FakeQuantObservers().prepare(make_tiny_llama(len(tiny_tokenizer), seed=1))

    quant = FakeQuantObservers()
    clean_model = fresh()
    clean = _trainer().train(clean_model, tiny_splits, checkpoint_dir=str(tmp_path / "clean"), resume=False, on_step=quant.on_step)

    def crash_after_5(step, model):
        quant.on_step(step, model)
        if step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        _trainer().train(fresh(), tiny_splits, checkpoint_dir=str(tmp_path / "crashed"), resume=False, on_step=crash_after_5)
    resumed_model = fresh()  # a new process would rebuild the model from scratch
    resumed = _trainer().train(resumed_model, tiny_splits, checkpoint_dir=str(tmp_path / "crashed"), resume=True, on_step=quant.on_step)

    assert resumed.resumed_from == 4
    assert resumed.train_losses == clean.train_losses
    clean_state, resumed_state = clean_model.state_dict(), resumed_model.state_dict()
    assert any("activation_post_process.min_val" in key for key in clean_state)
    assert clean_state.keys() == resumed_state.keys()
    for key in clean_state:
        assert torch.equal(clean_state[key], resumed_state[key]), key


def test_resume_with_other_settings_is_refused(tmp_path, tiny_tokenizer, tiny_splits, one_thread):
    from ftq_testing import make_tiny_llama

    from ftq_core.errors import UsageError

    _trainer(max_steps=2).train(make_tiny_llama(len(tiny_tokenizer)), tiny_splits, checkpoint_dir=str(tmp_path), resume=False)
    with pytest.raises(UsageError, match=r"cannot resume from .*step-00000002.*lr: checkpoint 5e-05, now 0\.001"):
        _trainer(max_steps=4, lr=1e-3).train(make_tiny_llama(len(tiny_tokenizer)), tiny_splits, checkpoint_dir=str(tmp_path), resume=True)


def test_damaged_latest_pointer_falls_back_to_newest_complete_checkpoint(tmp_path, tiny_tokenizer, tiny_splits, one_thread):
    from ftq_testing import make_tiny_llama

    from ftq_plugins.trainers.checkpoints import latest_checkpoint

    _trainer(max_steps=4, keep_checkpoints=3).train(make_tiny_llama(len(tiny_tokenizer)), tiny_splits, checkpoint_dir=str(tmp_path), resume=False)
    (tmp_path / "latest").write_text("step-00000099\n")  # names nothing
    (tmp_path / "step-00000004" / "state.json").unlink()  # the newest is incomplete
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000002"


# -- diverging loss ----------------------------------------------------------


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_tokenizer, tiny_splits, one_thread):
    import torch
    from ftq_testing import make_tiny_llama

    from ftq_core.errors import TrainingError
    from ftq_plugins.trainers.checkpoints import latest_checkpoint, load_latest_checkpoint

    model = make_tiny_llama(len(tiny_tokenizer))
    forward = model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # step 3 (the third micro-batch) returns a NaN loss
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if model.training and calls["n"] == 3:
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    with pytest.raises(TrainingError) as info:
        _trainer(max_steps=6).train(model, tiny_splits, checkpoint_dir=str(tmp_path), resume=False)
    message = str(info.value)
    assert "training diverged at step 3: the loss is nan" in message
    assert f"The last good checkpoint, {tmp_path / 'step-00000002'}, is kept" in message
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    fresh = make_tiny_llama(len(tiny_tokenizer))
    optimizer = torch.optim.AdamW(fresh.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    load_latest_checkpoint(tmp_path, model=fresh, optimizer=optimizer, scheduler=scheduler)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_diverging_run_gives_a_clear_cli_error(tmp_path, tiny_model_dir, monkeypatch):
    """Through `ftq run`: exit code 1, the step, the kept checkpoint, no traceback, no artifact."""
    from click.testing import CliRunner
    from transformers import LlamaForCausalLM

    from ftq_core.cli import cli

    forward = LlamaForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] >= 3:
                out.loss = out.loss + float("inf")
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", poisoned)
    result = CliRunner().invoke(
        cli,
        ["run", "--model", str(tiny_model_dir), "-o", str(tmp_path / "out"), "--max-steps", "8",
         "--set", "trainer.checkpoint_every=1", "--set", "trainer.progress=false", "--set", "dataset.block_size=32",
         "--set", "evaluate_pretrained=false", "--set", "eval.latency=false"],
    )
    assert result.exit_code == 1, result.output
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000002"
    assert f"Error: training diverged at step 3: the loss is inf. The last good checkpoint, {checkpoint}, is kept." in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "model").exists()


# -- kill during save ----------------------------------------------------------


def _save(model, tokenizer, target: Path, tag: str):
    from ftq_core.artifacts import save_artifact

    return save_artifact(model, tokenizer, target, manifest={"method": "none", "tag": tag})


def _load_or_none(path: Path):
    from ftq_core.artifacts import load_artifact
    from ftq_core.errors import ArtifactError

    try:
        return load_artifact(path)
    except ArtifactError:
        return None


FAULT_POINTS = ["weights", "tokenizer", "manifest", "after-swap"]


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_kill_during_save_leaves_previous_or_new_complete_artifact(tmp_path, tiny_tokenizer, monkeypatch, point):
    """A save dies (no clean-up runs, as under SIGKILL) between file writes: the target is the old
    complete artifact or the new complete one, and no leftover directory loads."""
    from ftq_testing import make_tiny_llama

    import ftq_core.artifacts as artifacts

    target = tmp_path / "model"
    _save(make_tiny_llama(len(tiny_tokenizer), seed=0), tiny_tokenizer, target, "old")

    class Killed(BaseException):
        pass

    monkeypatch.setattr(artifacts.shutil, "rmtree", lambda *a, **k: None)  # a killed process cleans nothing
    if point == "weights":

        def save_tensors(path, tensors, metadata=None):
            Path(path).write_bytes(b"half a file")
            raise Killed

        monkeypatch.setattr(artifacts, "save_tensors", save_tensors)
    elif point == "tokenizer":
        monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", lambda self, d, **k: (_ for _ in ()).throw(Killed()))
    elif point == "manifest":
        monkeypatch.setattr(artifacts, "atomic_write_json", lambda *a, **k: (_ for _ in ()).throw(Killed()))
    else:  # the first directory sync after the new artifact is in place
        monkeypatch.setattr(artifacts, "fsync_dir", lambda p: (_ for _ in ()).throw(Killed()))

    with pytest.raises(Killed):
        _save(make_tiny_llama(len(tiny_tokenizer), seed=1), tiny_tokenizer, target, "new")
    monkeypatch.undo()

    loaded = _load_or_none(target)
    assert loaded is not None, "the target must always hold a complete artifact"
    assert loaded.manifest["tag"] == ("new" if point == "after-swap" else "old")
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert leftovers, "the simulated kill should leave its staging directory behind"
    for leftover in leftovers:
        if point == "after-swap":
            continue  # the swapped-out old artifact: complete, and removed by the next save
        assert _load_or_none(leftover) is None, f"partial {leftover.name} must not load"


def test_interrupted_two_rename_fallback_never_loads_partial(tmp_path, tiny_tokenizer, monkeypatch):
    """Without an atomic exchange, a crash between the renames leaves no target; loading names the old one."""
    from ftq_testing import make_tiny_llama

    import ftq_core.artifacts as artifacts
    from ftq_core.errors import ArtifactError

    target = tmp_path / "model"
    _save(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, target, "old")
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == target:
            raise KeyboardInterrupt  # killed after the old one moved aside, before the new one moved in
        return real_replace(src, dst)

    monkeypatch.setattr(artifacts.os, "replace", replace)
    monkeypatch.setattr(artifacts.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(KeyboardInterrupt):
        _save(make_tiny_llama(len(tiny_tokenizer), seed=1), tiny_tokenizer, target, "new")
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match=r"A previous complete artifact was left at .*model\.old-"):
        artifacts.load_artifact(target)
    old = next(tmp_path.glob("model.old-*"))
    assert artifacts.load_artifact(old).manifest["tag"] == "old"


def test_really_killed_save_leaves_staging_that_next_save_removes(tmp_path, tiny_model_dir):
    """A subprocess dies by os._exit in the middle of a save; the next save cleans up after it."""
    script = f"""
import os, sys
from pathlib import Path
import ftq_core.artifacts as artifacts
from ftq_core.models import load_model
loaded = load_model({str(tiny_model_dir)!r})
target = Path({str(tmp_path / 'model')!r})
artifacts.save_artifact(loaded.model, loaded.tokenizer, target, manifest={{"method": "none", "tag": "old"}})
artifacts.atomic_write_json = lambda *a, **k: os._exit(9)
artifacts.save_artifact(loaded.model, loaded.tokenizer, target, manifest={{"method": "none", "tag": "new"}})
"""
    done = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    staging = list(tmp_path.glob(".model.partial-*"))
    assert len(staging) == 1 and (staging[0] / "model.safetensors").is_file()
    assert _load_or_none(staging[0]) is None
    from ftq_core.models import load_model

    loaded = load_model(str(tiny_model_dir))
    assert _load_or_none(tmp_path / "model").manifest["tag"] == "old"
    _save(loaded.model, loaded.tokenizer, tmp_path / "model", "newer")
    assert not list(tmp_path.glob(".model.partial-*"))
    assert _load_or_none(tmp_path / "model").manifest["tag"] == "newer"


def test_save_refuses_to_replace_a_directory_that_is_not_an_artifact(tmp_path, tiny_tokenizer):
    from ftq_testing import make_tiny_llama

    from ftq_core.errors import UsageError

    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(UsageError, match="does not hold an ftq artifact, so ftq will not replace it"):
        _save(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, precious, "new")
    assert (precious / "thesis.txt").read_text() == "years of work"


# -- full or unwritable disks ----------------------------------------------------------


def test_not_enough_free_space_is_an_error_before_training(tmp_path, tiny_model_dir, monkeypatch, fast_run_options):
    import ftq_core
    import ftq_core.preflight as preflight
    from ftq_core.errors import UsageError

    real = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    trained = []
    monkeypatch.setattr("ftq_plugins.trainers.causal_lm.CausalLMTrainer.train", lambda *a, **k: trained.append(1))
    options = fast_run_options | {"model": str(tiny_model_dir)}
    with pytest.raises(UsageError) as info:
        ftq_core.run(options)
    message = str(info.value)
    assert "not enough free disk space for this run" in message
    assert "1 checkpoint(s) of model + optimizer state and the artifact" in message
    assert "0.00 GiB are free" in message and "trainer.keep_checkpoints" in message
    assert not trained
    assert not (Path(options["output_dir"]) / "checkpoints").exists()


def test_free_space_estimate_scales_with_model_and_checkpoints(tiny_llama):
    from ftq_core.preflight import estimate_run_bytes, model_bytes

    size = model_bytes(tiny_llama)
    params = sum(p.numel() for p in tiny_llama.parameters()) * 4  # tied embedding counted once
    assert params <= size <= params + sum(b.numel() * b.element_size() for b in tiny_llama.buffers())
    assert estimate_run_bytes(size, checkpoints_kept=0) < estimate_run_bytes(size, checkpoints_kept=2) < estimate_run_bytes(size, checkpoints_kept=3)
    assert estimate_run_bytes(size, checkpoints_kept=2) >= 9 * size + 2 * size


def test_unwritable_output_directory_fails_before_loading_anything(tmp_path):
    from click.testing import CliRunner

    from ftq_core.cli import cli

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(cli, ["run", "--model", "does-not-matter", "-o", str(blocker / "out")])
    assert result.exit_code == 2, result.output
    assert f"Error: cannot write to output directory {blocker / 'out'}" in result.output
    assert "choose another --output-dir" in result.output


def test_disk_full_while_saving_keeps_the_previous_artifact(tmp_path, tiny_tokenizer, monkeypatch):
    from ftq_testing import make_tiny_llama

    import ftq_core.artifacts as artifacts
    from ftq_core.errors import ArtifactError

    target = tmp_path / "model"
    _save(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, target, "old")

    def full_disk(path, tensors, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(artifacts, "save_tensors", full_disk)
    with pytest.raises(ArtifactError) as info:
        _save(make_tiny_llama(len(tiny_tokenizer), seed=1), tiny_tokenizer, target, "new")
    assert str(info.value) == (
        f"could not save the artifact to {target}: No space left on device; the previous artifact there is "
        f"unchanged. Free some disk space or choose an output directory on another disk, then run again."
    )
    monkeypatch.undo()
    assert artifacts.load_artifact(target).manifest["tag"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_tokenizer, tiny_splits, monkeypatch, one_thread):
    from ftq_testing import make_tiny_llama

    import ftq_plugins.trainers.checkpoints as checkpoints
    from ftq_core.errors import TrainingError

    real = checkpoints.save_tensors
    calls = {"n": 0}

    def fills_up(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] > 3:  # the second checkpoint's first file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpoints, "save_tensors", fills_up)
    with pytest.raises(TrainingError) as info:
        _trainer(max_steps=6).train(make_tiny_llama(len(tiny_tokenizer)), tiny_splits, checkpoint_dir=str(tmp_path), resume=False)
    assert str(info.value).startswith(
        f"could not write the checkpoint of step 4 in {tmp_path}: No space left on device; the previous "
        f"checkpoint step-00000002 is intact. To go on, free disk space"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000002"]


def test_quantize_checks_free_space_before_quantizing(tmp_path, tiny_model_dir, monkeypatch):
    from click.testing import CliRunner

    import ftq_core.preflight as preflight
    from ftq_core.cli import cli

    real = shutil.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: real(p)._replace(free=100_000))
    quantized = []
    monkeypatch.setattr("ftq_core.pipeline.quantize", lambda *a, **k: quantized.append(1))
    out = tmp_path / "int8"
    result = CliRunner().invoke(cli, ["quantize", str(tiny_model_dir), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "not enough free disk space for this run" in result.output and "(the artifact, for a" in result.output
    assert "Free some space or choose an output directory on another disk (--output-dir)." in result.output
    assert "checkpoints" not in result.output
    assert not quantized and not out.exists()


# -- refusals come before the model loads ------------------------------------------


@pytest.fixture
def model_load_forbidden(monkeypatch):
    """Fails the test if the chain gets as far as loading a model."""
    import ftq_core.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(pipeline, "load_model", refuse)


@pytest.mark.parametrize("case", ["foreign-model-dir", "missing-data", "data-is-a-directory", "output-is-a-file"])
def test_output_and_data_refusals_come_before_the_model_loads(tmp_path, model_load_forbidden, case):
    import ftq_core
    from ftq_core.errors import UsageError

    options = {"output_dir": str(tmp_path / "out"), "model": "smollm2"}
    if case == "foreign-model-dir":
        (tmp_path / "out" / "model").mkdir(parents=True)
        (tmp_path / "out" / "model" / "x").write_text("someone's file")
    elif case == "missing-data":
        options["dataset"] = {"path": str(tmp_path / "nope.txt")}
    elif case == "data-is-a-directory":
        options["dataset"] = {"path": str(tmp_path)}
    else:
        (tmp_path / "out").write_text("a file")
    with pytest.raises(UsageError):
        ftq_core.run(options)


def test_quantize_refuses_a_foreign_output_before_loading(tmp_path, monkeypatch):
    import ftq_core.pipeline as pipeline
    from ftq_core.errors import UsageError

    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "art").mkdir()
    (tmp_path / "art" / "x").write_text("mine")
    with pytest.raises(UsageError, match="does not hold an ftq artifact"):
        pipeline.quantize_to_artifact("smollm2", tmp_path / "art", "dynamic")


# -- one run per output directory --------------------------------------------------

_HOLD_LOCK = """
import sys, time
from pathlib import Path
from ftq_core.output_lock import LOCK_NAME, output_lock
with output_lock(Path(sys.argv[1]) / LOCK_NAME, what="out"):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_second_run_on_the_same_output_directory_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run(_ftq("run", "--model", str(tiny_model_dir), "-o", str(out), "--set", "trainer.max_steps=1"),
                                env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 2, second.stderr
    assert f"is in use by ftq process {holder.pid}, which is still running" in second.stderr
    assert "Traceback" not in second.stderr


def test_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    from ftq_core.output_lock import LOCK_NAME, output_lock

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (out / LOCK_NAME).read_text().startswith(str(holder.pid))  # the stale file is still there
    with output_lock(out / LOCK_NAME, what="out"):
        assert (out / LOCK_NAME).read_text().startswith(str(os.getpid()))


# -- resuming: the fingerprint is content, the report is complete -----------------


def test_data_fingerprint_ignores_where_the_tokenizer_was_read_from(tiny_tokenizer):
    import copy

    from ftq_core.data import splits_from_texts

    moved = copy.deepcopy(tiny_tokenizer)
    moved.name_or_path = "/somewhere/else/entirely"
    text = [SAMPLE_TEXT.read_text()]
    assert splits_from_texts(text, tiny_tokenizer, block_size=32).fingerprint == splits_from_texts(text, moved, block_size=32).fingerprint
    other = splits_from_texts([text[0][:-400]], tiny_tokenizer, block_size=32)
    assert other.fingerprint != splits_from_texts(text, tiny_tokenizer, block_size=32).fingerprint


def test_resume_from_the_final_checkpoint_reports_loss_and_speed(tmp_path, tiny_tokenizer, tiny_splits, one_thread):
    from ftq_testing import make_tiny_llama

    first = _trainer(max_steps=4, checkpoint_every=2).train(make_tiny_llama(len(tiny_tokenizer)), tiny_splits,
                                                             checkpoint_dir=str(tmp_path / "c"))
    again = _trainer(max_steps=4, checkpoint_every=2).train(make_tiny_llama(len(tiny_tokenizer)), tiny_splits,
                                                             checkpoint_dir=str(tmp_path / "c"), resume=True)
    assert again.resumed_from == 4
    assert again.final_train_loss == first.final_train_loss
    assert again.tokens_per_second is not None and again.tokens_per_second > 0


@pytest.mark.slow
def test_first_run_of_the_bundled_model_from_an_empty_cache_can_be_resumed(tmp_path):
    """The README's first run reads the tokenizer from the GGUF package, a resumed one from the model cache:
    the checkpoint must still be recognised as the same data."""
    env = _env() | {"FTQ_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    common = ["run", "-o", str(tmp_path / "out"), "--trainer", "causal-lm", "--set", "dataset.block_size=32",
              "--set", "dataset.max_train_blocks=8", "--set", "trainer.batch_size=1", "--set", "trainer.checkpoint_every=1",
              "--set", "trainer.progress=false", "--set", "evaluate_pretrained=false", "--set", "eval.latency=false",
              "--set", "eval.max_blocks=1", "--set", "quantizer.kernel=int-mm", "--set", "keep_checkpoints=true"]
    first = subprocess.run(_ftq(*common, "--max-steps", "1"), env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run(_ftq(*common, "--max-steps", "2", "--resume"), env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resume: continuing from" in resumed.stderr


def test_checkpoints_are_removed_after_a_completed_run_unless_kept(tmp_path, tiny_tokenizer, fast_run_options):
    from ftq_testing import make_tiny_llama

    import ftq_core
    from ftq_core.models import LoadedModel

    def fresh_model():  # a run quantizes the model it is given in place
        return LoadedModel(make_tiny_llama(len(tiny_tokenizer)), tiny_tokenizer, "tiny-llama")

    ftq_core.run(fast_run_options, model=fresh_model())
    out = Path(fast_run_options["output_dir"])
    assert (out / "model" / "manifest.json").is_file() and not (out / "checkpoints").exists()
    kept = fast_run_options | {"output_dir": str(tmp_path / "kept"), "keep_checkpoints": True}
    ftq_core.run(kept, model=fresh_model())
    # one checkpoint is kept while training (the newest), and it stays after the run
    assert [p.name for p in (tmp_path / "kept" / "checkpoints").glob("step-*")] == ["step-00000003"]
