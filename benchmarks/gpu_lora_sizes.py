"""LoRA over ftq's int8 model against peft's LoRA over the bf16 model, on one GPU, for models of real sizes.

    python benchmarks/gpu_lora_sizes.py --shapes tinyllama-1.1b,llama-3.2-3b --out lora-sizes.json
    python benchmarks/gpu_lora_sizes.py --tiny          # a CPU smoke test of the script itself

Both sides train the same LoRA (rank 16, alpha 32, every Linear but the
head) on the same random token blocks with the same loop: AdamW on the
adapters, bf16 autocast, one optimizer step per batch.  ``peft-bf16`` is
``peft.get_peft_model`` over transformers' model held in bf16 (the usual
LoRA recipe when the model fits); ``ftq-int8`` is ftq's ``dynamic``
quantization with its defaults (run on the CPU, as ``ftq quantize`` does)
with ftq's ``lora`` adapter, moved to the GPU, where its int8 layers run
``torch._int_mm``.  The weights are random: time and memory do not depend on
their values.  Reported per side: tokens/s over the timed steps (after
warm-up steps) and the peak GPU memory of training, model included
(``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=256)
WARMUP_STEPS = 3


def _config(shape: str, tiny: bool):
    from shaped_models import shaped_config
    from transformers import AutoConfig

    if not tiny:
        return shaped_config(shape)
    fields = dict(TINY)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _random_model(config, dtype: torch.dtype):
    """A model of ``config`` with small random weights in ``dtype``, built without a float32 copy."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if "rotary" in name:
                continue
            if tensor.ndim == 1:
                tensor.fill_(1.0)
            else:
                tensor.normal_(0, 0.02)
    model.model.rotary_emb.__init__(config=config)  # its inverse frequencies, lost to the meta build
    model.tie_weights()
    return model.eval()


def peft_bf16(config, device: str):
    from peft import LoraConfig, get_peft_model

    model = _random_model(config, torch.bfloat16).to(device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def ftq_int8(config, device: str):
    import ftq_core
    from ftq_plugins.adapters.lora import LoraAdapter, LoraOptions

    start = time.perf_counter()
    model = _random_model(config, torch.float32)
    quantized = ftq_core.quantize(model, "dynamic").model
    del model
    print(f"  quantized on the CPU in {time.perf_counter() - start:.0f} s", flush=True)
    return LoraAdapter(LoraOptions()).attach(quantized).to(device)


def train(model, config, *, device: str, steps: int, batch: int, block: int) -> dict:
    """Tokens/s over ``steps`` timed steps after the warm-up, and peak GPU memory of the whole training."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    losses, start = [], None
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        ids = torch.randint(0, config.vocab_size, (batch, block), generator=generator).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "tokens_per_second": steps * batch * block / seconds,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "first_loss": losses[0], "last_loss": losses[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tinyllama-1.1b,llama-3.2-3b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: a smoke test of the script")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    if args.tiny:
        args.shapes, args.steps, args.batch, args.block = "tiny", 2, 2, 32
    results = []
    for shape in args.shapes.split(","):
        config = _config(shape, args.tiny)
        for side, build in (("peft-bf16", peft_bf16), ("ftq-int8", ftq_int8)):
            model = build(config, device)
            row = {"shape": shape, "side": side, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   "batch": args.batch, "block": args.block,
                   **train(model, config, device=device, steps=args.steps, batch=args.batch, block=args.block)}
            print(json.dumps(row), flush=True)
            results.append(row)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
        bf16, int8 = results[-2], results[-1]
        speed = int8["tokens_per_second"] / bf16["tokens_per_second"]
        memory = int8["peak_gpu_gib"] / bf16["peak_gpu_gib"] if int8["peak_gpu_gib"] else float("nan")
        print(f"{shape}: ftq int8 LoRA at {speed:.2f}x peft bf16 LoRA's tokens/s, {memory:.0%} of its peak memory",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
