"""The ``causal-lm`` trainer: next-token fine-tuning with AdamW.

One readable loop: warmup + cosine learning rate, gradient accumulation and
clipping, periodic held-out evaluation, checkpoints every N steps and exact
resume (the data order is a pure function of the seed and the step, so a
resumed run sees the same batches an uninterrupted one would; model,
optimizer, scheduler and RNG state come back from the checkpoint, so on the
CPU a killed and resumed run is bitwise identical to an uninterrupted one).
A non-finite loss or gradient stops training before it reaches the weights
or a checkpoint.  bf16 autocast
(float32 weights and AdamW state) on CUDA and on CPUs that compute bf16
natively, float32 elsewhere.

Data-parallel when a ``torch.distributed`` process group is up (``torchrun``,
``ftq run --nproc``): the model is wrapped in DDP, each of the N ranks takes
its own ``batch_size`` slice of a global batch of ``N * batch_size`` blocks
(so N ranks compute what one process with ``N * batch_size`` would: exactly in
float32, to bf16 rounding under autocast), and only rank 0 writes checkpoints.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from ftq_core.configs import check
from ftq_core.data import collate
from ftq_core.hookspecs import hookimpl
from ftq_core.protocols import TrainResult

log = logging.getLogger("ftq")

__all__ = [
    "Device", "Precision", "CausalLMTrainerConfig", "CausalLMTrainer", "lr_factor", "rank_batch_indices",
    "set_activation_checkpointing", "trains_only_adapters",
]


#: Default peak learning rates.  Adapters start from zero (LoRA's B = 0) and
#: move a low-rank update, so they need a larger step than full fine-tuning,
#: whose every weight is already where pre-training left it.  Measured on the
#: bundled model and sample, 30 steps: see benchmarks/RESULTS.md.
FULL_LR = 5e-5
ADAPTER_LR = 1e-3
#: A run trains "only adapters" when its trainable parameters are fewer than
#: this share of the model's parameters and buffers (int8 weights are buffers):
#: LoRA's defaults train 3.6% of SmolLM2; freezing a few layers of a full
#: fine-tune stays well above it.
ADAPTER_SHARE = 0.2


def trains_only_adapters(model) -> bool:
    """Whether the trainable parameters are a small share of the model (see :data:`ADAPTER_SHARE`)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return 0 < trainable < ADAPTER_SHARE * total


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(enum.Enum):
    AUTO = "auto"  # bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else float32
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass(frozen=True, kw_only=True)
class CausalLMTrainerConfig:
    """Options of the ``causal-lm`` trainer."""

    max_steps: int = field(default=30, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=2, metadata={"help": "blocks per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float | None = field(
        default=None,
        metadata={"help": f"peak learning rate; none: {FULL_LR:g} when the whole model trains, {ADAPTER_LR:g} when "
                          f"only adapters do (under {ADAPTER_SHARE:.0%} of the parameters)"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_steps: int = field(default=3, metadata={"help": "linear warmup steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of lr"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: off)"})
    eval_every: int = field(default=10, metadata={"help": "held-out evaluation every N steps (0: at the end only)"})
    eval_batches: int = field(default=4, metadata={"help": "held-out batches per evaluation"})
    checkpoint_every: int = field(default=10, metadata={"help": "checkpoint every N steps (0: off)"})
    keep_checkpoints: int = field(
        default=1, metadata={"help": "checkpoints kept on disk while training (the newest complete ones; 1 is what resume needs)"}
    )
    seed: int = field(default=0, metadata={"help": "seed for data order and initialisation"})
    device: Device = field(default=Device.AUTO, metadata={"help": "auto: CUDA when available"})
    precision: Precision = field(
        default=Precision.AUTO,
        metadata={"help": "auto: bf16 autocast (float32 weights and optimizer) on CUDA and on CPUs with native bf16 "
                          "(AVX512-BF16 or AMX: about twice as fast), else fp32"},
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "recompute each decoder layer's activations, and the logits a chunk of tokens at a time, "
                          "in backward instead of keeping them (less memory, about a quarter more compute); none: "
                          "on when only adapters train, whose runs are chosen for their small memory"},
    )
    distill: float = field(
        default=0.0,
        metadata={"help": "quantization-aware training: weight in [0, 1] of the KL divergence to the float model's "
                          "next-token distribution (1: distillation only, 0: next-token loss only)"},
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        check(
            [
                (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
                (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
                (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
                (self.lr is None or self.lr > 0, f"lr must be > 0, got {self.lr}"),
                # larger steps overflow AdamW's float32 update; sensible values are 1e-5 to 1e-3
                (self.lr is None or self.lr <= 1.0, f"lr must be <= 1 (typical: 1e-5 to 1e-3), got {self.lr}"),
                (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
                (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
                (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
                (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
                (self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}"),
                (self.eval_batches >= 1, f"eval_batches must be >= 1, got {self.eval_batches}"),
                (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
                (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
                (0 <= self.distill <= 1, f"distill must be in [0, 1], got {self.distill}"),
            ]
        )


#: Options that shape the loss curve: a checkpoint resumes only under the same values.
#: (``max_steps`` may change, to extend a run; evaluation, checkpoint and display
#: options do not affect the weights.)
_RESUME_MUST_MATCH = ("seed", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "max_grad_norm", "distill")


def set_activation_checkpointing(model, on: bool) -> None:
    """Turn transformers' per-layer activation checkpointing on or off.

    Non-reentrant: the recomputation is exact (RNG state replayed), and
    gradients reach adapters although each layer's input comes from frozen
    embeddings that require no grad.
    """
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the older names are deprecated)
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    if not on and hasattr(model, "disable_input_require_grads"):
        # enabling also hooked the input embeddings to require grad (for reentrant checkpointing, which this is
        # not); transformers takes that hook off again only for models peft loaded, so it is taken off here
        try:
            model.disable_input_require_grads()
        except AttributeError:  # never enabled
            pass


def distillation_loss(student_logits, teacher_logits):
    """Mean over tokens of KL(teacher || student) on next-token distributions.

    Matching the float model's whole distribution, not only the next token of
    the fine-tuning text, is what lets a short quantization-aware fine-tune
    undo rounding damage without pulling the model towards that text.
    """
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab), dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


def lr_factor(step: int, *, warmup: int, total: int, floor: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def rank_batch_indices(micro_step: int, batch_size: int, dataset_len: int, seed: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's ``batch_size`` indices of the global micro-batch of ``world_size * batch_size``."""
    indices = batch_indices(micro_step, batch_size * world_size, dataset_len, seed)
    return indices[rank * batch_size : (rank + 1) * batch_size]


def batch_indices(micro_step: int, batch_size: int, dataset_len: int, seed: int) -> list[int]:
    """Indices of micro-batch ``micro_step``: epoch-wise shuffles seeded by (seed, epoch)."""
    import torch

    per_epoch = max(1, dataset_len // batch_size)
    epoch, position = divmod(micro_step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(dataset_len, generator=generator)
    return order[position * batch_size : (position + 1) * batch_size].tolist()


class CausalLMTrainer:
    """Fine-tunes a causal LM in place; see :class:`ftq_core.protocols.Trainer`."""

    def __init__(self, config: CausalLMTrainerConfig):
        self.config = config

    def _device(self):
        import torch

        if self.config.device is Device.CUDA or (self.config.device is Device.AUTO and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                from ftq_core.errors import UsageError

                raise UsageError("trainer device 'cuda' was asked for but no CUDA GPU is available; use device = 'auto' or 'cpu'")
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                return torch.device("cuda", torch.cuda.current_device())  # the process group set LOCAL_RANK's GPU
            return torch.device("cuda")
        return torch.device("cpu")

    def uses_bf16(self, device) -> bool:
        """Whether training runs under bf16 autocast on ``device`` (see ``precision``)."""
        from ftq_core.cpu_features import cpu_has_native_bf16

        if self.config.precision is not Precision.AUTO:
            return self.config.precision is Precision.BF16
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())

    def _autocast(self, device):
        import torch

        if self.uses_bf16(device):
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def learning_rate(self, model) -> float:
        """The peak learning rate: ``lr``, or the default for what trains (the whole model, or only adapters)."""
        if self.config.lr is not None:
            return self.config.lr
        return ADAPTER_LR if trains_only_adapters(model) else FULL_LR

    def checkpoints_activations(self, model) -> bool:
        """Whether training recomputes activations (see ``activation_checkpointing``)."""
        from ftq_core.errors import UsageError

        wanted = self.config.activation_checkpointing
        if wanted is None:
            wanted = trains_only_adapters(model)
        if wanted and not getattr(model, "supports_gradient_checkpointing", False):
            if self.config.activation_checkpointing:
                raise UsageError(
                    f"trainer option activation_checkpointing = true, but {type(model).__name__} does not support it "
                    f"(transformers' gradient checkpointing); set it to false"
                )
            return False
        return wanted

    def evaluate_loss(self, model, dataset, device) -> float:
        import torch

        cfg = self.config
        model.eval()
        losses = []
        with torch.no_grad(), self._autocast(device):
            for start in range(0, min(len(dataset), cfg.eval_batches * cfg.batch_size), cfg.batch_size):
                batch = collate([dataset[i] for i in range(start, min(start + cfg.batch_size, len(dataset)))]).to(device)
                losses.append(model(**batch.model_inputs(), labels=batch.labels).loss.float().item())
        model.train()
        return sum(losses) / len(losses)

    def _run_signature(self, data) -> dict:
        """What must match between a checkpoint and a resumed run for the loss curve to continue exactly."""
        cfg = self.config
        return {
            "data": data.fingerprint,
            **{name: getattr(cfg, name) for name in _RESUME_MUST_MATCH},
        }

    def _check_resumable(self, state: dict, signature: dict, path) -> None:
        from ftq_core.errors import UsageError

        saved = state.get("run")
        if saved is None:
            return  # a checkpoint from before signatures were recorded
        # keys recorded only when they differ from these (older checkpoints lack them)
        defaults = {"bf16": False, "world_size": 1}
        keys = list(signature) + [k for k in defaults if k not in signature]
        changed = [
            f"{key}: checkpoint {saved.get(key, defaults.get(key))!r}, now {signature.get(key, defaults.get(key))!r}"
            for key in keys if saved.get(key, defaults.get(key)) != signature.get(key, defaults.get(key))
        ]
        if changed:
            hint = (" (bf16: this CPU trains in bf16 by default; precision = 'fp32' or 'bf16' picks one)"
                    if any(c.startswith("bf16") for c in changed) else "")
            raise UsageError(
                f"cannot resume from {path}: it was written by a run with other settings ({'; '.join(changed)}){hint}. "
                f"Resume with the settings it was written with, or run without --resume to start over."
            )

    def _diverged(self, step: int, what: str, checkpoint_dir, lr: float) -> Exception:
        from ftq_core.errors import TrainingError

        from .checkpoints import latest_checkpoint

        cfg = self.config
        last = latest_checkpoint(checkpoint_dir) if checkpoint_dir else None
        if last is not None:
            kept = f"The last good checkpoint, {last}, is kept"
        elif checkpoint_dir and cfg.checkpoint_every:
            kept = f"No checkpoint had been written yet (one every {cfg.checkpoint_every} steps)"
        else:
            kept = "Checkpoints are off (checkpoint_every = 0), so there is nothing to resume from"
        return TrainingError(
            f"training diverged at step {step}: {what}. {kept}. Lower lr (now {lr:g}) or raise warmup_steps "
            f"(now {cfg.warmup_steps}), then run again (with --resume to start from the checkpoint)."
        )

    # -- the recipe: setup, resume, steps, checkpoints ------------------------
    @property
    def distills(self) -> bool:
        """Whether ``train`` needs ``teacher=`` (the float model), so the pipeline keeps a float copy."""
        return self.config.distill > 0

    @property
    def checkpoints_kept(self) -> int:
        """Checkpoints (model + optimizer state) on disk at most at once, for the free-disk check."""
        return self.config.keep_checkpoints if self.config.checkpoint_every else 0

    def train(self, model, data, *, checkpoint_dir=None, resume=False, on_step=None, teacher=None) -> TrainResult:
        from tqdm.auto import tqdm

        cfg = self.config
        run = self._setup(model, data, teacher)
        if resume and checkpoint_dir:
            self._resume(run, checkpoint_dir, on_step)
        bar = tqdm(total=cfg.max_steps, initial=run.start_step, desc="fine-tune", unit="step",
                   disable=not cfg.progress or run.rank != 0, dynamic_ncols=True)
        started = time.perf_counter()
        try:
            for step in range(run.start_step, cfg.max_steps):
                loss = self._step(run, data, step, checkpoint_dir)
                done = step + 1
                run.train_losses.append((done, loss))
                run.last_loss, run.steps_done = loss, run.steps_done + 1
                if on_step is not None:
                    on_step(done, model)
                rate = run.steps_done * run.tokens_per_step / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
                bar.update(1)
                if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.max_steps:
                    run.eval_losses.append((done, self.evaluate_loss(model, data.eval, run.device)))
                    if run.rank == 0:
                        bar.write(f"step {done}: held-out loss {run.eval_losses[-1][1]:.4f}")
                if checkpoint_dir and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.max_steps):
                    self._save_checkpoint(run, checkpoint_dir, done, loss, rate)
        finally:
            bar.close()
            if run.checkpointing:  # also when training stops early: the model leaves as it came
                set_activation_checkpointing(run.model, False)
        return self._finish(run, data, time.perf_counter() - started)

    def _setup(self, model, data, teacher) -> "_Run":
        """Checks that can refuse, device, DDP, optimizer and schedule, and the run's resume signature."""
        import torch

        from ftq_core.distributed import is_distributed
        from ftq_core.errors import DatasetError, UsageError

        from .chunked_loss import supports_chunked_loss

        cfg = self.config
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if is_distributed() else (0, 1)
        if len(data.train) < cfg.batch_size * world:
            raise DatasetError(
                f"the training split has {len(data.train)} blocks, fewer than the global batch of {cfg.batch_size * world} "
                f"(batch_size {cfg.batch_size} x {world} processes); lower batch_size or block_size, or add data"
            )
        if self.distills and teacher is None:
            raise UsageError(
                f"trainer option distill = {cfg.distill:g} needs the float model as a teacher, which only "
                "quantization-aware training has (quantizer qat or qat-int8); set distill = 0 for plain fine-tuning"
            )
        device = self._device()
        torch.manual_seed(cfg.seed)
        model.to(device)
        model.train()
        checkpointing = self.checkpoints_activations(model)
        if checkpointing:
            set_activation_checkpointing(model, True)
        if self.distills:
            teacher.to(device).eval().requires_grad_(False)
        # DDP averages gradients over ranks during backward; it also broadcasts
        # rank 0's weights once here so every rank starts from the same model.
        # ``model`` stays the plain module: evaluation, checkpoints and hooks use it.
        trained = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Under an adapter the buffers are the frozen int8 base (never changed by training): re-sending them
            # from rank 0 before every forward would cost more than the step.  Otherwise buffers may train
            # (torch.ao observers in QAT) and rank 0's are broadcast, as DDP does by default.
            trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=not trains_only_adapters(model))
        params = [p for p in model.parameters() if p.requires_grad]
        lr = self.learning_rate(model)
        # fused: one kernel over all parameters (CPU and CUDA), no per-step temporaries the size of the model
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, warmup=cfg.warmup_steps, total=cfg.max_steps, floor=cfg.min_lr_ratio)
        )
        signature = self._run_signature(data)
        signature["lr"] = lr
        from .checkpoints import frozen_fingerprint, has_frozen_parameters

        if has_frozen_parameters(model):
            # checkpoints then hold only what trains: resume only over the same frozen model
            signature["frozen"] = frozen_fingerprint(model)
        if world > 1:  # the global batch, hence the data order, depends on it
            signature["world_size"] = world
        if device.type == "cpu" and self.uses_bf16(device):
            # bf16 rounding changes the loss curve.  Recorded for the CPU only: CUDA always trained in bf16
            # by default, and its checkpoints from before this key existed must still resume.
            signature["bf16"] = True
        return _Run(
            model=model, trained=trained, teacher=teacher if self.distills else None, params=params,
            optimizer=optimizer, scheduler=scheduler, device=device, rank=rank, world=world, signature=signature,
            tokens_per_step=cfg.batch_size * world * cfg.grad_accum * data.block_size,  # all ranks together
            checkpointing=checkpointing,
            chunked_loss=checkpointing and not self.distills and supports_chunked_loss(model),
        )

    def _resume(self, run: "_Run", checkpoint_dir, on_step) -> None:
        """Continue from the newest checkpoint in ``checkpoint_dir``, if there is one written by the same settings."""
        from .checkpoints import latest_checkpoint, load_latest_checkpoint, read_checkpoint_state

        path = latest_checkpoint(checkpoint_dir)
        if path is None:
            log.warning("resume: no checkpoint in %s; starting from step 0", checkpoint_dir)
            return
        self._check_resumable(read_checkpoint_state(path), run.signature, path)
        state = load_latest_checkpoint(checkpoint_dir, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler)
        run.start_step = run.resumed_from = state["step"]
        run.eval_losses = [tuple(x) for x in state.get("eval_losses", [])]
        run.train_losses = [tuple(x) for x in state.get("train_losses", [])]
        run.resumed_loss, run.resumed_rate = state.get("train_loss"), state.get("tokens_per_second")
        log.info("resume: continuing from %s (step %d)", path, run.start_step)
        if on_step is not None:
            # Lets a quantizer re-derive step-dependent state (e.g. frozen
            # observers) that lives outside the model's state dict.
            on_step(run.start_step, run.model)

    def _loss(self, run: "_Run", batch):
        """The training loss of one micro-batch: next-token, distillation from the teacher, or a mix."""
        import torch

        cfg = self.config
        with self._autocast(run.device):
            if run.chunked_loss:  # the logits of one chunk of tokens at a time (see chunked_loss)
                from .chunked_loss import chunked_next_token_loss, hidden_states_instead_of_logits

                with hidden_states_instead_of_logits(run.model) as head:
                    hidden = run.trained(**batch.model_inputs()).logits
                return chunked_next_token_loss(head, hidden, batch.labels)
            # pure distillation needs no next-token loss: no labels, no cross-entropy over the vocabulary
            output = run.trained(**batch.model_inputs(), labels=batch.labels if cfg.distill < 1 else None)
            if not self.distills:
                return output.loss
            with torch.no_grad():
                target = run.teacher(**batch.model_inputs()).logits
            kl = distillation_loss(output.logits, target)
            return kl if cfg.distill == 1 else (1 - cfg.distill) * output.loss + cfg.distill * kl

    def _step(self, run: "_Run", data, step: int, checkpoint_dir) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; the mean loss over all ranks."""
        import torch

        from ftq_core.distributed import all_reduce_mean

        cfg = self.config
        total_on_device = torch.zeros((), device=run.device)
        for micro in range(cfg.grad_accum):
            indices = rank_batch_indices(step * cfg.grad_accum + micro, cfg.batch_size, len(data.train), cfg.seed, run.rank, run.world)
            batch = collate([data.train[i] for i in indices]).to(run.device)
            # under DDP, gradients are all-reduced only on the last micro-batch
            sync = run.world == 1 or micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if sync else run.trained.no_sync():
                loss = self._loss(run, batch)
                # scale so the accumulated gradient is the mean over micro-batches
                (loss / cfg.grad_accum).backward()
            total_on_device += loss.detach().float() / cfg.grad_accum
        # one host sync per step; every rank sees the same mean loss, so all
        # ranks stop together if it diverges
        total = all_reduce_mean(total_on_device.item(), run.device)
        if not math.isfinite(total):
            run.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(step + 1, f"the loss is {total}", checkpoint_dir, run.signature["lr"])
        # The norm is computed even with clipping off: a non-finite gradient
        # would put NaN into the weights, and the next checkpoint with them.
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        if not math.isfinite(float(grad_norm)):
            run.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(step + 1, f"the gradient norm is {float(grad_norm)} (loss {total:.4f})", checkpoint_dir,
                                 run.signature["lr"])
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        return total

    def _save_checkpoint(self, run: "_Run", checkpoint_dir, step: int, loss: float, rate: float) -> None:
        from ftq_core.distributed import barrier

        from .checkpoints import save_checkpoint

        if run.rank == 0:  # weights and optimizer state are the same on every rank
            save_checkpoint(
                checkpoint_dir, step=step, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                extra={"eval_losses": run.eval_losses, "train_loss": loss, "train_losses": run.train_losses,
                       "tokens_per_second": rate, "run": run.signature},
                keep=self.config.keep_checkpoints,
            )
        barrier()  # nobody runs ahead of a checkpoint that is still being written

    def _finish(self, run: "_Run", data, elapsed: float) -> TrainResult:
        cfg = self.config
        if run.start_step < cfg.max_steps or not run.eval_losses:
            run.eval_losses.append((cfg.max_steps, self.evaluate_loss(run.model, data.eval, run.device)))
        run.model.eval()
        return TrainResult(
            steps=cfg.max_steps,
            final_train_loss=run.last_loss if run.steps_done else run.resumed_loss,
            eval_losses=run.eval_losses,
            tokens_per_second=run.steps_done * run.tokens_per_step / elapsed if run.steps_done else run.resumed_rate,
            resumed_from=run.resumed_from,
            train_losses=run.train_losses,
        )


@dataclass
class _Run:
    """What one call of :meth:`CausalLMTrainer.train` works on, from setup to the result."""

    model: Any
    trained: Any  # the model, or its DDP wrapper
    teacher: Any
    params: list
    optimizer: Any
    scheduler: Any
    device: Any
    rank: int
    world: int
    signature: dict
    tokens_per_step: int
    checkpointing: bool = False
    chunked_loss: bool = False  # the loss by chunks of tokens (with activation checkpointing)
    start_step: int = 0
    resumed_from: int | None = None
    resumed_loss: float | None = None  # what the report needs if no step is left to run
    resumed_rate: float | None = None
    eval_losses: list = field(default_factory=list)
    train_losses: list = field(default_factory=list)
    last_loss: float | None = None
    steps_done: int = 0


@hookimpl
def register_trainers(register):
    register("causal-lm", CausalLMTrainer, CausalLMTrainerConfig, description="next-token fine-tuning: AdamW, warmup+cosine, checkpoints, resume")
