"""LoRA over the int8 model vs a full fp32 fine-tune then ``dynamic``: accuracy, training memory, step time.

    python benchmarks/lora_int8.py [--steps 30] [--dataset text|chat] [--turns 4]

Both variants fine-tune the bundled SmolLM2-135M on the same data (the
dataset's defaults: the bundled sample, or the chat sample with ``--dataset
chat``), the same steps, batch and seed, through ``ftq_core.run``:

* ``full``: the ``causal-lm`` trainer fine-tunes every fp32 weight, then
  ``dynamic`` quantizes (ftq's README recipe);
* ``lora``: ``dynamic`` quantizes first, then the ``lora`` adapter trains over
  the frozen int8 model (``--adapter lora``, defaults).

Each runs in a process of its own, so its memory is its own: the peak RSS
reported is the high-water mark of training alone (``/proc/self/clear_refs``
resets it once the model is set up, and ``VmHWM`` is read when training
returns), next to the process's peak overall.  Held-out perplexity is the
dataset's held-out split, never trained on (deterministic).  Step time is
measured afterwards in one process, the two training steps in turns (min of
``--turns``), under the trainer's precision (bf16 autocast on CPUs with
native bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _vm(field: str) -> float:
    """A ``/proc/self/status`` field (kB) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _variant(name: str, steps: int, dataset: str, out: Path, checkpointing: bool) -> dict:
    """One variant's run (in this process): rows, training peak RSS, the trainer's throughput."""
    import ftq_core
    from ftq_plugins.trainers import causal_lm

    measured: dict = {}
    original = causal_lm.CausalLMTrainer.train

    def train(self, model, data, **kwargs):
        import gc

        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is training's
        measured["rss_before_mb"] = _vm("VmRSS")
        result = original(self, model, data, **kwargs)
        measured["train_peak_mb"] = _vm("VmHWM")
        return result

    causal_lm.CausalLMTrainer.train = train
    options = {
        "output_dir": str(out / name), "evaluate_pretrained": name == "full",
        "dataset": {"name": dataset},
        "trainer": {"name": "causal-lm", "max_steps": steps, "checkpoint_every": 0, "progress": False, "eval_every": 0},
        "eval": {"latency": False},
    }
    if name == "lora":
        options["adapter"] = {"name": "lora"}
        if not checkpointing:
            options["trainer"]["activation_checkpointing"] = False
    result = ftq_core.run(options)
    measured["rows"] = [(row.label, row.perplexity) for row in result.rows]
    measured["tokens_per_second"] = result.train.tokens_per_second
    return measured


def _step_times(turns: int, checkpointing: bool) -> dict[str, float]:
    """Seconds per optimizer step of the two variants' training, in turns in this process (min of turns)."""
    import copy

    import torch

    import ftq_core
    from ftq_core.models import load_model
    from ftq_plugins.adapters.lora import LoraAdapter, LoraOptions
    from ftq_plugins.trainers.causal_lm import (
        ADAPTER_LR,
        FULL_LR,
        CausalLMTrainer,
        CausalLMTrainerConfig,
        set_activation_checkpointing,
    )
    from ftq_plugins.trainers.chunked_loss import (
        chunked_next_token_loss,
        hidden_states_instead_of_logits,
        supports_chunked_loss,
    )

    loaded = load_model("smollm2")
    full = loaded.model
    lora = LoraAdapter(LoraOptions()).attach(ftq_core.quantize(copy.deepcopy(full), "dynamic").model)
    trainer = CausalLMTrainer(CausalLMTrainerConfig())
    for model in (full, lora):  # as the trainer sets each up (by default, or as asked)
        if trainer.checkpoints_activations(model) and (model is full or checkpointing):
            set_activation_checkpointing(model, True)
    precision = trainer._autocast(torch.device("cpu"))
    ids = torch.randint(0, len(loaded.tokenizer), (2, 256))  # the trainer's default batch of 2 x 256-token blocks
    models, chunked = {}, {}
    for name, model, lr in (("full", full, FULL_LR), ("lora", lora, ADAPTER_LR)):
        params = [p for p in model.parameters() if p.requires_grad]
        models[name] = (model.train(), torch.optim.AdamW(params, lr=lr, fused=True))
        # the trainer takes the loss by chunks of tokens when it checkpoints activations
        checkpointed = any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
        chunked[name] = checkpointed and supports_chunked_loss(model)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(turns + 1):  # the first turn warms up
        for name, (model, optimizer) in models.items():
            start = time.perf_counter()
            with precision:
                if chunked[name]:
                    with hidden_states_instead_of_logits(model) as head:
                        hidden = model(input_ids=ids).logits
                    loss = chunked_next_token_loss(head, hidden, ids)
                else:
                    loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - start)
    return {name: min(values[1:]) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dataset", default="text", choices=["text", "chat"])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--no-activation-checkpointing", action="store_true",
                        help="train the adapter with trainer.activation_checkpointing = false (faster, more memory)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        checkpointing = not args.no_activation_checkpointing
        print("RESULT " + json.dumps(_variant(args.variant, args.steps, args.dataset, Path(args.out), checkpointing)))
        return

    import torch

    results = {}
    with tempfile.TemporaryDirectory() as out:
        for name in ("full", "lora"):
            command = [sys.executable, __file__, "--variant", name, "--steps", str(args.steps), "--dataset", args.dataset,
                       "--out", out] + (["--no-activation-checkpointing"] if args.no_activation_checkpointing else [])
            done = subprocess.run(command, capture_output=True, text=True, env=os.environ)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"variant {name} failed:\n{done.stderr[-3000:]}")
            results[name] = json.loads(lines[-1][len("RESULT "):])
    steps = _step_times(args.turns, not args.no_activation_checkpointing)
    full, lora = results["full"], results["lora"]
    full_rows, lora_rows = dict(full["rows"]), dict(lora["rows"])
    reference = full_rows["int8 dynamic"]
    print(f"bundled SmolLM2-135M, dataset {args.dataset}, {args.steps} steps, batch 2, "
          f"{torch.get_num_threads()} threads; held-out perplexity on the dataset's held-out split\n")
    print("| run | held-out perplexity | vs fp32 fine-tune → dynamic | RSS when training starts | training peak RSS "
          "| step time |")
    print("|---|---:|---:|---:|---:|---:|")
    for variant, rows, trained in ((full, full_rows, "fp32 fine-tuned"), (lora, lora_rows, "int8 dynamic + lora")):
        name = "full" if variant is full else "lora"
        for label, value in rows.items():
            extra = (f"{variant['rss_before_mb']:.0f} MB | {variant['train_peak_mb']:.0f} MB | {steps[name]:.2f} s"
                     if label == trained else "— | — | —")
            print(f"| {label} | {value:.3f} | {100 * (value / reference - 1):+.1f}% | {extra} |")
    print(f"\nLoRA / full: training peak RSS {lora['train_peak_mb'] / full['train_peak_mb']:.0%}, "
          f"step time {steps['lora'] / steps['full']:.2f}x")


if __name__ == "__main__":
    main()
