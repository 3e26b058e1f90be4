"""GPU fine-tuning speed: plain bf16 vs ftq ``qat-int8``, eager and compiled; 1 vs N GPUs; fake-quant vs int8 agreement.

One script, one call on a GPU machine (results in benchmarks/RESULTS.md):

    python benchmarks/gpu_qat.py single --out results.json       # one GPU: speed + agreement
    torchrun --standalone --nproc-per-node=2 benchmarks/gpu_qat.py ddp --out ddp.json

The model is a SmolLM2-135M-shaped Llama built from its config (random
init: speed does not depend on the weights), batch 8 x 1024 tokens, AdamW,
bf16 autocast, the same loop for every variant.  ``tokens/s`` is the median
over timing windows after warm-up (compilation happens in warm-up), all
ranks' tokens together for DDP.  ``--tiny`` shrinks everything for a CPU
smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, rope_theta=100000.0, tie_word_embeddings=True,
)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def build_model(args, device, *, qat: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**(TINY if args.tiny else SMOLLM2_135M))
    model = LlamaForCausalLM(config)
    if qat:
        from ftq_plugins.qat_int8 import QATInt8Config, QATInt8Quantizer

        model = QATInt8Quantizer(QATInt8Config()).prepare(model)
    return model.to(device).train()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(args, device, *, qat: bool, compiled: bool, ddp: bool = False) -> dict:
    """Train the same steps with one variant; tokens/s as the median of timing windows."""
    model = build_model(args, device, qat=qat)
    trained = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compiled:
        trained = torch.compile(trained)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(1 + int(os.environ.get("RANK", "0")))
    batches = [torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator).to(device) for _ in range(4)]

    def step(i: int) -> torch.Tensor:
        ids = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = trained(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    from torch._dynamo.utils import counters

    breaks_before = sum(counters["graph_break"].values())
    started = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    synchronize(device)
    warmup_s = time.perf_counter() - started
    rates = []
    for _ in range(args.windows):
        synchronize(device)
        t0 = time.perf_counter()
        for i in range(args.steps):
            loss = step(i)
        synchronize(device)
        rates.append(args.steps * args.batch * args.seq * args.world / (time.perf_counter() - t0))
    result = {
        "variant": ("qat-int8" if qat else "plain bf16") + (" compiled" if compiled else " eager"),
        "tokens_per_s": statistics.median(rates), "windows": rates, "warmup_s": warmup_s,
        "final_loss": loss.float().item(),
        "graph_breaks": sum(counters["graph_break"].values()) - breaks_before,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    del trained, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def agreement(args, device) -> dict:
    """Logits of the fake-quant model (bf16 autocast and float32, on the GPU) vs the converted int8 model on the CPU."""
    from ftq_plugins.fake_quant import _fused_kernel, fake_quant_rows
    from ftq_plugins.qat_int8 import QATInt8Config, QATInt8Quantizer

    out = {}
    x = torch.randn(4096, 1536, device=device) * torch.rand(4096, 1, device=device) * 3
    if device.type == "cuda":
        for dtype in (torch.float32, torch.bfloat16):
            xi = x.to(dtype)
            out[f"fused_kernel_equals_reference_{str(dtype)[6:]}"] = bool(
                torch.equal(_fused_kernel()(xi, torch.bfloat16), fake_quant_rows(xi, torch.bfloat16)))
    quantizer = QATInt8Quantizer(QATInt8Config())
    model = quantizer.prepare(build_model(args, torch.device("cpu"), qat=False, seed=5)).to(device)
    # a few training steps so the weights are not the initial ones
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        ids = torch.randint(0, model.config.vocab_size, (2, args.seq), generator=generator).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 256), generator=generator)
    with torch.no_grad():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = model(input_ids=ids.to(device)).logits.float().cpu()
        fp32 = model(input_ids=ids.to(device)).logits.float().cpu()
        converted = quantizer.convert(copy.deepcopy(model))
        int8 = converted(input_ids=ids).logits

    def compare(a, b):
        return {"rel_l2": ((a - b).norm() / b.norm()).item(), "max_abs": (a - b).abs().max().item(),
                "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}

    out["fp32_fake_quant_vs_cpu_int8"] = compare(fp32, int8)
    out["bf16_fake_quant_vs_cpu_int8"] = compare(bf16, int8)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["single", "ddp"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke test of this script")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 agreement check wants true float32
    results: dict = {"torch": torch.__version__, "what": args.what, "batch": args.batch, "seq": args.seq}
    if torch.cuda.is_available() and not args.tiny:
        results["card"] = torch.cuda.get_device_name()
    modes = [m for m in args.modes.split(",") if m]

    def save():
        if args.out and int(os.environ.get("RANK", "0")) == 0:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    if args.what == "single":
        args.world = 1
        device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        results["agreement"] = agreement(args, device)
        save()
        for mode in modes:
            for qat in (False, True):
                row = measure(args, device, qat=qat, compiled=mode == "compiled")
                results.setdefault("runs", []).append(row)
                print(json.dumps(row), flush=True)
                save()
    else:
        from ftq_core.distributed import process_group

        with process_group(use_cuda=not args.tiny) as rank:
            args.world = rank.world_size
            device = torch.device("cuda", rank.local_rank) if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
            results["world_size"] = rank.world_size
            for mode in modes:
                for qat in (False, True):
                    row = measure(args, device, qat=qat, compiled=mode == "compiled", ddp=rank.world_size > 1)
                    results.setdefault("runs", []).append(row)
                    if rank.is_main:
                        print(json.dumps(row), flush=True)
                    save()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
