"""Data-parallel runs: torchrun environment, gloo ranks agreeing, observer sync, ``--nproc``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ftq_testing import make_tiny_llama

from ftq_core.distributed import Rank, current_rank, sync_observers, torchrun_command
from ftq_core.errors import UsageError

HERE = Path(__file__).resolve().parent


def test_rank_comes_from_the_torchrun_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert current_rank() == Rank(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert current_rank() == Rank(3, 4, 1) and not current_rank().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UsageError, match="not within WORLD_SIZE"):
        current_rank()


def test_rank_batches_split_the_global_batch():
    from ftq_plugins.trainers.causal_lm import batch_indices, rank_batch_indices

    for step in range(5):
        whole = batch_indices(step, 6, 40, seed=1)
        assert rank_batch_indices(step, 3, 40, 1, 0, 2) + rank_batch_indices(step, 3, 40, 1, 1, 2) == whole


def test_nproc_starts_torchrun_with_the_same_arguments(monkeypatch):
    from click.testing import CliRunner

    import ftq_core.distributed
    from ftq_core.cli import cli

    calls = []
    monkeypatch.setattr(ftq_core.distributed, "launch", lambda nproc, args: calls.append((nproc, args)) or 0)
    argv = ["run", "--nproc", "2", "--max-steps", "3", "--set", "trainer.batch_size=1"]
    monkeypatch.setattr(sys, "argv", ["ftq", *argv])
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    assert calls == [(2, ["run", "--max-steps", "3", "--set", "trainer.batch_size=1"])]
    command = torchrun_command(2, ["run", "--max-steps", "3"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "ftq_core.cli", "run", "--max-steps", "3"]


def _observer_rank(rank: int, world_size: int, directory: str) -> None:
    """One gloo rank: observers see this rank's data, then :func:`sync_observers`."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.ao.quantization import FakeQuantize, MinMaxObserver, MovingAverageMinMaxObserver, PerChannelMinMaxObserver

    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world_size)
    try:
        observers = torch.nn.ModuleDict({
            "minmax": MinMaxObserver(),
            "moving": MovingAverageMinMaxObserver(averaging_constant=0.5),
            "channel": PerChannelMinMaxObserver(ch_axis=0),
            "fake": FakeQuantize(),
            "unused": PerChannelMinMaxObserver(ch_axis=0),
        })
        generator = torch.Generator().manual_seed(rank)
        for _ in range(3):
            data = torch.randn(4, 16, generator=generator) * (rank + 1) + rank
            for name in ("minmax", "moving", "channel", "fake"):
                observers[name](data)
        observed = [m for m in observers.modules() if hasattr(m, "min_val") and m.min_val.numel()]
        state = {f"before.{i}.{k}": getattr(m, k).clone() for i, m in enumerate(observed) for k in ("min_val", "max_val")}
        count = sync_observers(observers)
        state |= {f"after.{i}.{k}": getattr(m, k).clone() for i, m in enumerate(observed) for k in ("min_val", "max_val")}
        for i, module in enumerate(observed):
            scale, zero_point = module.calculate_qparams()
            state[f"scale.{i}"], state[f"zero_point.{i}"] = scale.float(), zero_point.float()
        state["count"] = torch.tensor([count])
        save_file(state, f"{directory}/observers-{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_sync_observers_gives_every_gloo_rank_the_range_of_all(tmp_path):
    from safetensors.torch import load_file

    torch.multiprocessing.spawn(_observer_rank, args=(2, str(tmp_path)), nprocs=2)
    ranks = [load_file(tmp_path / f"observers-{r}.safetensors") for r in range(2)]
    assert ranks[0]["count"].item() == 5  # the FakeQuantize's observer and the unused one included
    observed = len([k for k in ranks[0] if k.startswith("scale.")])
    assert observed == 4
    for i in range(observed):
        low = torch.minimum(ranks[0][f"before.{i}.min_val"], ranks[1][f"before.{i}.min_val"])
        high = torch.maximum(ranks[0][f"before.{i}.max_val"], ranks[1][f"before.{i}.max_val"])
        assert not torch.equal(ranks[0][f"before.{i}.max_val"], ranks[1][f"before.{i}.max_val"])  # ranks saw different data
        for state in ranks:
            assert torch.equal(state[f"after.{i}.min_val"], low) and torch.equal(state[f"after.{i}.max_val"], high)
        assert torch.equal(ranks[0][f"scale.{i}"], ranks[1][f"scale.{i}"])
        assert torch.equal(ranks[0][f"zero_point.{i}"], ranks[1][f"zero_point.{i}"])


def test_sync_observers_is_a_no_op_in_one_process():
    from torch.ao.quantization import MinMaxObserver

    observer = MinMaxObserver()
    observer(torch.arange(5.0))
    assert sync_observers(torch.nn.Sequential(observer)) == 1
    assert observer.min_val.item() == 0 and observer.max_val.item() == 4


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "tiny-llama"
    make_tiny_llama(len(tiny_tokenizer)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_two_gloo_processes_train_the_same_adapter_as_one_process(tmp_path, tiny_model_dir):
    """LoRA over the int8 model under DDP: both ranks end with one adapter, the one a single process with the
    global batch trains; the int8 base is never synchronised (it does not train) and stays as quantized."""
    from distributed_worker import run_options
    from safetensors.torch import load_file

    import ftq_core

    env = dict(os.environ, FTQ_LOAD_PLUGINS="", OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(HERE / "distributed_worker.py"), str(tiny_model_dir), str(tmp_path), "2", "lora"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank-{r}.safetensors") for r in range(2)]
    adapters = [k for k in ranks[0] if ".lora_" in k]
    assert adapters and ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert (tmp_path / "run" / "model" / "adapter_model.safetensors").is_file()
    single = ftq_core.run(run_options(str(tiny_model_dir), str(tmp_path / "single"), 4, "lora"))
    expected = single.model.state_dict()
    for name in ranks[0]:
        if name in adapters:
            assert torch.allclose(ranks[0][name], expected[name], rtol=1e-4, atol=1e-6), name
        else:  # the int8 base: quantized the same way from the same weights
            assert torch.equal(ranks[0][name], expected[name]), name


def test_two_gloo_processes_match_one_process_with_the_global_batch(tmp_path, tiny_model_dir, tiny_tokenizer):
    """2 ranks x batch 2 under torchrun == 1 process x batch 4: same int8 model on both ranks, and close to the single run."""
    from distributed_worker import run_options
    from safetensors.torch import load_file

    import ftq_core

    env = dict(os.environ, FTQ_LOAD_PLUGINS="", OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(HERE / "distributed_worker.py"), str(tiny_model_dir), str(tmp_path), "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank-{r}.safetensors") for r in range(2)]
    summaries = [(tmp_path / f"rank-{r}.txt").read_text().split() for r in range(2)]
    assert [s[0] for s in summaries] == ["2", "2"]
    assert summaries[0][1] == summaries[1][1]  # the all-reduced loss
    assert [s[2] for s in summaries] == ["True", "False"]  # only rank 0 evaluated
    assert (tmp_path / "run" / "model" / "manifest.json").is_file() and (tmp_path / "run" / "report.json").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000003"]
    assert ranks[0].keys() == ranks[1].keys() and any(k.endswith("weight_int8") for k in ranks[0])
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name

    torch.manual_seed(0)
    single = ftq_core.run(run_options(str(tiny_model_dir), str(tmp_path / "single"), 4))
    expected = {k: v for k, v in single.model.state_dict().items()}
    assert expected.keys() == ranks[0].keys()
    assert abs(float(summaries[0][1]) - single.train.final_train_loss) < 1e-4
    initial = make_tiny_llama(len(tiny_tokenizer)).state_dict()
    for name, value in ranks[0].items():
        if name.endswith("weight_int8"):
            # int8 codes agree but for rare flips at a rounding boundary
            difference = (value.int() - expected[name].int()).abs()
            assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3, name
        elif value.is_floating_point():
            assert torch.allclose(value, expected[name], rtol=1e-4, atol=1e-6), name
            if name in initial and name.endswith("embed_tokens.weight"):
                assert not torch.allclose(value, initial[name])  # training moved it
