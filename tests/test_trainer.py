"""The ``causal-lm`` trainer: it learns, its schedule, checkpoints and resume."""

from __future__ import annotations

import pytest
import torch
from ftq_testing import SAMPLE_TEXT, make_tiny_llama

from ftq_core.data import splits_from_texts
from ftq_core.plugins import Plugins
from ftq_plugins.trainers.causal_lm import batch_indices, lr_factor


def trainer(**options):
    component = Plugins(load_entrypoints=False).get("trainer", "causal-lm")
    return component.create(component.make_config({"progress": False, **options}))


@pytest.fixture
def splits(tiny_tokenizer):
    return splits_from_texts([SAMPLE_TEXT.read_text()[:40_000]], tiny_tokenizer, block_size=32)


def test_fine_tuning_lowers_held_out_loss(splits):
    model = make_tiny_llama()
    t = trainer(max_steps=25, batch_size=4, lr=3e-3, warmup_steps=2, checkpoint_every=0)
    before = t.evaluate_loss(model, splits.eval, torch.device("cpu"))
    result = t.train(model, splits, checkpoint_dir=None, resume=False)
    assert result.steps == 25 and result.eval_losses[-1][0] == 25
    assert result.eval_losses[-1][1] < before - 0.5
    assert result.tokens_per_second > 0


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=3, total=20, floor=0.1) for s in range(21)]
    assert factors[0] < factors[1] < factors[2] < factors[3] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[20] == pytest.approx(0.1)


def test_data_order_is_a_function_of_seed_and_step():
    first_epoch = [i for step in range(5) for i in batch_indices(step, 4, 20, seed=1)]
    assert sorted(first_epoch) == list(range(20))  # an epoch visits every block once
    assert batch_indices(7, 4, 20, seed=1) == batch_indices(7, 4, 20, seed=1)
    assert batch_indices(7, 4, 20, seed=1) != batch_indices(7, 4, 20, seed=2)


def test_resume_continues_from_the_checkpoint_to_the_same_weights(tmp_path, splits):
    options = dict(max_steps=6, batch_size=2, lr=1e-3, checkpoint_every=3, eval_every=0)
    straight = make_tiny_llama()
    trainer(**options).train(straight, splits, checkpoint_dir=str(tmp_path / "a"), resume=False)

    interrupted = make_tiny_llama()
    trainer(**{**options, "max_steps": 3}).train(interrupted, splits, checkpoint_dir=str(tmp_path / "b"), resume=False)
    resumed = make_tiny_llama(seed=99)  # a fresh process would start from other weights
    result = trainer(**options).train(resumed, splits, checkpoint_dir=str(tmp_path / "b"), resume=True)
    assert result.resumed_from == 3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "b" / "latest").read_text().strip() == "step-00000006"


def test_diverging_loss_stops_with_the_step(tmp_path, splits, monkeypatch):
    from ftq_core.errors import TrainingError

    model = make_tiny_llama()
    original = model.forward

    def poisoned(*args, **kwargs):
        out = original(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(model, "forward", poisoned)
    with pytest.raises(TrainingError, match="diverged at step 1"):
        trainer(max_steps=3, batch_size=2).train(model, splits, checkpoint_dir=str(tmp_path), resume=False)


def test_distillation_from_an_identical_teacher_has_zero_loss(splits):
    import copy

    from ftq_plugins.trainers.causal_lm import distillation_loss

    model = make_tiny_llama()
    teacher = copy.deepcopy(model)
    t = trainer(max_steps=2, batch_size=2, lr=1e-3, warmup_steps=0, checkpoint_every=0, distill=1.0)
    # the first step's loss is KL(model || itself) = 0; the plain next-token loss would be ~ln(512)
    result = t.train(model, splits, checkpoint_dir=None, resume=False, teacher=teacher)
    assert result.train_losses[0][1] == pytest.approx(0.0, abs=1e-5)
    logits = torch.randn(2, 5, 7)
    other = torch.randn(2, 5, 7)
    expected = sum(
        (p * (p.log() - q.log())).sum()
        for p, q in zip(other.softmax(-1).reshape(-1, 7), logits.softmax(-1).reshape(-1, 7))
    ) / 10
    assert distillation_loss(logits, other).item() == pytest.approx(expected.item(), rel=1e-5)


def test_distillation_without_a_teacher_names_the_fix(splits):
    from ftq_core.errors import UsageError

    with pytest.raises(UsageError, match="needs the float model as a teacher.*qat or qat-int8.*distill = 0"):
        trainer(max_steps=1, batch_size=2, distill=0.5).train(make_tiny_llama(), splits, checkpoint_dir=None, resume=False)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_auto_precision_is_bf16_where_the_cpu_computes_bf16_natively(monkeypatch, native_bf16):
    import torch

    import ftq_core.cpu_features as cpu_features
    from ftq_plugins.trainers.causal_lm import CausalLMTrainer, CausalLMTrainerConfig, Precision

    monkeypatch.setattr(cpu_features, "cpu_has_native_bf16", lambda: native_bf16)
    cpu = torch.device("cpu")
    assert CausalLMTrainer(CausalLMTrainerConfig()).uses_bf16(cpu) is native_bf16
    assert CausalLMTrainer(CausalLMTrainerConfig(precision=Precision.FP32)).uses_bf16(cpu) is False
    assert CausalLMTrainer(CausalLMTrainerConfig(precision=Precision.BF16)).uses_bf16(cpu) is True


def test_resume_refuses_a_checkpoint_of_another_precision_or_world_size_either_way():
    from ftq_core.errors import UsageError
    from ftq_plugins.trainers.causal_lm import CausalLMTrainer, CausalLMTrainerConfig

    trainer = CausalLMTrainer(CausalLMTrainerConfig())
    now = {"data": "abc", "seed": 0}
    trainer._check_resumable({"run": {"data": "abc", "seed": 0}}, now, "ckpt")  # same run: fine
    with pytest.raises(UsageError, match=r"bf16: checkpoint True, now False\).*precision = 'fp32' or 'bf16'"):
        trainer._check_resumable({"run": {"data": "abc", "seed": 0, "bf16": True}}, now, "ckpt")
    with pytest.raises(UsageError, match=r"world_size: checkpoint 2, now 1"):
        trainer._check_resumable({"run": {"data": "abc", "seed": 0, "world_size": 2}}, now, "ckpt")
    with pytest.raises(UsageError, match=r"bf16: checkpoint False, now True"):
        trainer._check_resumable({"run": {"data": "abc", "seed": 0}}, {**now, "bf16": True}, "ckpt")
