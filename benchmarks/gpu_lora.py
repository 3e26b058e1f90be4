"""LoRA over the int8 model on a GPU, next to a full bf16 fine-tune: the user path (``ftq_core.run``) on CUDA.

    python benchmarks/gpu_lora.py --out lora.json      # on a machine with a CUDA GPU
    python benchmarks/gpu_lora.py --tiny               # a CPU smoke test of the script itself

A SmolLM2-135M-shaped Llama built from its config (random init: speed does
not depend on the weights) learns blocks of a repeated random motif (so the
loss has something to fall to).  Two runs through ``ftq_core.run`` with the
``causal-lm`` trainer on ``device = auto`` (CUDA, bf16 autocast): ``full``
fine-tunes every weight, then ``dynamic`` quantizes; ``lora`` quantizes with
``dynamic`` first and trains the ``lora`` adapter over the int8 model on the
GPU (the int8 layers run ``torch._int_mm`` there).  Reported per run: the
trainer's tokens/s, the held-out loss before and after, the peak GPU memory of
training (``torch.cuda.max_memory_allocated``, reset when training starts),
and for ``lora`` whether the saved artifact reloads on the CPU to the same
logits.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def motif_splits(vocab: int, block: int, blocks: int, seed: int = 0):
    """Blocks of a random 16-token motif repeated, each block its own motif: train and held-out ``DataSplits``."""
    from ftq_core.protocols import DataSplits

    generator = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, vocab, (16,), generator=generator).repeat(block // 16) for _ in range(blocks)]
    held = max(2, blocks // 10)
    return DataSplits(data[held:], data[:held], block, f"motif-{vocab}-{block}-{blocks}-{seed}", "repeated motifs")


def run_variant(name: str, args, out: Path) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import ftq_core
    from ftq_core.models import LoadedModel
    from ftq_plugins.trainers import causal_lm

    sizes = TINY if args.tiny else SMOLLM2_135M
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**sizes)).eval()
    splits = motif_splits(sizes["vocab_size"], args.block, args.blocks)
    measured: dict = {}
    original = causal_lm.CausalLMTrainer.train

    def train(self, model, data, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        result = original(self, model, data, **kwargs)
        if torch.cuda.is_available():
            measured["train_peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return result

    causal_lm.CausalLMTrainer.train = train
    try:
        options = {
            "output_dir": str(out / name), "evaluate_pretrained": False,
            "trainer": {"name": "causal-lm", "max_steps": args.steps, "batch_size": args.batch, "checkpoint_every": 0,
                        "progress": False, "eval_every": 0, "warmup_steps": 2},
            "eval": {"latency": False, "max_blocks": 4},
        }
        if name == "lora":
            options["adapter"] = {"name": "lora"}
        result = ftq_core.run(options, data=splits, model=LoadedModel(model, None, "random SmolLM2-135M shape"))
    finally:
        causal_lm.CausalLMTrainer.train = original
    measured |= {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "tokens_per_second": result.train.tokens_per_second,
        "held_out_loss": result.train.eval_losses,
        "rows": [(row.label, row.perplexity) for row in result.rows],
    }
    if name == "lora":
        ids = splits.eval[0][None, :64]
        with torch.no_grad():
            reloaded = ftq_core.load(result.artifact_dir).model(input_ids=ids).logits
            in_memory = result.model(input_ids=ids).logits
        measured["reload_max_abs_diff"] = (reloaded - in_memory).abs().max().item()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and data: a CPU smoke test")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--blocks", type=int, default=400)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.batch, args.block, args.blocks = min(args.steps, 4), 2, 64, 40
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for name in ("full", "lora"):
            results[name] = run_variant(name, args, Path(out))
            print(name, json.dumps(results[name]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
