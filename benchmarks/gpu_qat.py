"""GPU fine-tuning speed: plain bf16 vs ftq ``qat-int8``, eager and compiled; 1 vs N GPUs; fake-quant vs int8 agreement.

One script, one call on a GPU machine (results in benchmarks/RESULTS.md):

    python benchmarks/gpu_qat.py single --out results.json       # one GPU: speed + agreement
    torchrun --standalone --nproc-per-node=2 benchmarks/gpu_qat.py ddp --out ddp.json

The model is a SmolLM2-135M-shaped Llama built from its config (random
init: speed does not depend on the weights), batch 8 x 1024 tokens, AdamW,
bf16 autocast, the same loop for every variant.  ``tokens/s`` is the median
over timing windows after warm-up (compilation happens in warm-up), all
ranks' tokens together for DDP; the variants of one mode (plain and QAT) are
built side by side and their windows taken in turns, so a GPU or host that
changes speed during the call weighs on both alike.  ``--profile N`` adds
host and device time per step and the ops that cost the most.  ``--tiny`` shrinks everything for a CPU
smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
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


def build_model(args, device, *, qat: bool, seed: int = 0, **qat_options):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**(TINY if args.tiny else SMOLLM2_135M))
    model = LlamaForCausalLM(config)
    if qat:
        from ftq_plugins.quantizers.qat_int8 import QATInt8Config, QATInt8Quantizer

        model = QATInt8Quantizer(QATInt8Config(**qat_options)).prepare(model)
    return model.to(device).train()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One training setup (model, optimizer, batches, step) that can be timed window by window.

    Variants are timed in turns (plain, QAT, plain, QAT, ...) so that a GPU or
    host that slows down during the run weighs on both alike.
    """

    def __init__(self, args, device, *, qat: bool, compiled: bool, ddp: bool = False, label: str = "", **qat_options):
        self.args, self.device = args, device
        self.name = ("qat-int8" if qat else "plain bf16") + (" compiled" if compiled else " eager") + label
        self.model = build_model(args, device, qat=qat, **qat_options)
        self.trained = self.model
        self.ddp_module = None
        if ddp:
            from torch.nn.parallel import DistributedDataParallel

            # gradients live in the all-reduce buckets: no copy in and out of them every step
            self.trained = self.ddp_module = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
                bucket_cap_mb=args.bucket_mb, static_graph=args.static_graph,
            )
            if args.bf16_grads:  # halve the bytes each all-reduce moves
                from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

                self.ddp_module.register_comm_hook(None, default_hooks.bf16_compress_hook)
        if compiled:
            self.trained = torch.compile(self.trained)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(1 + int(os.environ.get("RANK", "0")))
        self.batches = [torch.randint(0, self.model.config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
                        for _ in range(4)]
        self.rates: list[float] = []
        self.steps_done = 0
        self.loss = None
        self.warmup_s = None
        self.graph_breaks = 0

    def step(self) -> None:
        args = self.args
        for micro in range(args.grad_accum):
            ids = self.batches[(self.steps_done * args.grad_accum + micro) % len(self.batches)]
            # with accumulation, gradients are all-reduced on the last micro-batch only
            sync = self.ddp_module is None or micro == args.grad_accum - 1
            with contextlib.nullcontext() if sync else self.ddp_module.no_sync():
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    loss = self.trained(input_ids=ids, labels=ids).loss
                (loss / args.grad_accum).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self.loss = loss.detach()

    def warm_up(self) -> None:
        from torch._dynamo.utils import counters

        breaks_before = sum(counters["graph_break"].values())
        started = time.perf_counter()
        for _ in range(self.args.warmup):
            self.step()
        synchronize(self.device)
        self.warmup_s = time.perf_counter() - started
        self.graph_breaks = sum(counters["graph_break"].values()) - breaks_before

    def time_window(self) -> None:
        args = self.args
        synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            self.step()
        synchronize(self.device)
        self.rates.append(args.steps * args.grad_accum * args.batch * args.seq * args.world / (time.perf_counter() - t0))

    def profile(self, steps: int) -> dict:
        """Host and device time per step from ``torch.profiler``, and the ops that take the most of each."""
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        synchronize(self.device)
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                self.step()
            synchronize(self.device)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events)
        cpu_us = sum(e.self_cpu_time_total for e in events)

        def top(key: str) -> list:
            rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:12]
            return [[e.key[:60], e.count // steps, round(getattr(e, key) / steps / 1e3, 2)] for e in rows]

        return {"wall_ms_per_step (profiled)": 1e3 * wall / steps, "host_self_ms_per_step": cpu_us / steps / 1e3,
                "device_busy_ms_per_step": device_us / steps / 1e3,
                "top_host_ops [op, calls/step, ms/step]": top("self_cpu_time_total"),
                "top_device_ops [op, calls/step, ms/step]": top("self_device_time_total")}

    def result(self) -> dict:
        return {
            "variant": self.name, "tokens_per_s": statistics.median(self.rates), "windows": self.rates,
            "warmup_s": self.warmup_s, "final_loss": self.loss.float().item(), "graph_breaks": self.graph_breaks,
            "peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None,
        }


def measure_together(args, device, specs: list[dict], log) -> list[dict]:
    """Build every variant, warm each up, then time them in turns; one result (or error) per variant."""
    variants, results = [], []
    for spec in specs:
        try:
            variant = Variant(args, device, **spec)
            variant.warm_up()
            variants.append(variant)
        except Exception as exc:  # one failing variant must not lose the others' numbers
            import traceback

            traceback.print_exc()
            results.append({"variant": str(spec), "error": repr(exc)[:500]})
    for _ in range(args.windows):
        for variant in variants:
            variant.time_window()
    for variant in variants:
        row = variant.result()
        if args.profile:
            row["profile"] = variant.profile(args.profile)
        results.append(row)
        log(row)
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return results


def allreduce_bandwidth(device, numel: int, repeats: int = 5) -> dict:
    """Time an all-reduce of ``numel`` float32 values (a model's gradients); bus bandwidth as NCCL's tests define it."""
    import torch.distributed as dist

    buffer = torch.ones(numel, device=device)
    dist.all_reduce(buffer)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        dist.all_reduce(buffer)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    world = dist.get_world_size()
    seconds = statistics.median(times)
    return {"mib": numel * 4 / 2**20, "ms": seconds * 1e3, "bus_gb_per_s": numel * 4 * 2 * (world - 1) / world / seconds / 1e9}


def agreement(args, device) -> dict:
    """Fake-quant numerics on the GPU vs the int8 kernel (on the GPU and, after conversion, on the CPU)."""
    from ftq_core.layers import set_submodule
    from ftq_plugins.qat.fake_quant import Int8QATLinear, fake_quant_rows, load_fused_kernel
    from ftq_plugins.quantizers.qat_int8 import QATInt8Config, QATInt8Quantizer

    out = {}
    if device.type == "cuda" and load_fused_kernel():
        from ftq_plugins.qat.triton_kernels import fake_quant_rows_cuda

        checks, cuda_checks = [], []
        for shape in ((4096, 1536), (3, 333, 576), (49152, 576)):
            x = torch.randn(shape, device=device) * torch.rand(*shape[:-1], 1, device=device) * 3
            x.view(-1, shape[-1])[0] = 0.0
            inputs = [x.to(dtype) for dtype in (torch.float32, torch.bfloat16)]
            inputs.append(x.reshape(-1, shape[-1]).t())  # a strided (transposed) view, as for GPT-2's Conv1D weights
            for xi in inputs:
                for out_dtype in (torch.float32, torch.bfloat16):
                    mine = fake_quant_rows_cuda(xi, out_dtype)
                    # the truth is the CPU int8 kernel's arithmetic
                    checks.append(torch.equal(mine.cpu(), fake_quant_rows(xi.cpu(), out_dtype)))
                    cuda_checks.append(torch.equal(mine, fake_quant_rows(xi, out_dtype)))
        out["triton_kernel_equals_cpu_reference"] = f"{sum(checks)}/{len(checks)}"
        out["triton_kernel_equals_torch_cuda_reference"] = f"{sum(cuda_checks)}/{len(cuda_checks)}"
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
        plain = copy.deepcopy(model)  # the same weights without fake-quant: what int8 rounding changes
        for name, module in list(plain.named_modules()):
            if isinstance(module, Int8QATLinear):
                linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=device)
                linear.weight = module.weight
                set_submodule(plain, name, linear)
        float_logits = plain(input_ids=ids.to(device)).logits.float().cpu()
        # The same two models run on the CPU: how far float32 alone drifts between devices,
        # and how far that drift moves once fake-quant rounds every activation.
        float_cpu = copy.deepcopy(plain).cpu()(input_ids=ids).logits.float()
        fake_quant_cpu = copy.deepcopy(model).cpu()(input_ids=ids).logits.float()
        converted = quantizer.convert(copy.deepcopy(model))
        int8_cpu = converted(input_ids=ids).logits

    def compare(a, b):
        return {"rel_l2": ((a - b).norm() / b.norm()).item(), "max_abs": (a - b).abs().max().item(),
                "argmax_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item()}

    out["fp32_fake_quant_gpu_vs_int8_cpu"] = compare(fp32, int8_cpu)
    out["bf16_fake_quant_gpu_vs_int8_cpu"] = compare(bf16, int8_cpu)
    out["reference_float_vs_int8_cpu (what int8 rounding changes)"] = compare(float_logits, int8_cpu)
    out["fp32_fake_quant_cpu_vs_int8_cpu"] = compare(fake_quant_cpu, int8_cpu)
    out["fp32_fake_quant_gpu_vs_fp32_fake_quant_cpu"] = compare(fp32, fake_quant_cpu)
    out["float_gpu_vs_float_cpu (no quantization)"] = compare(float_logits, float_cpu)
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
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (DDP syncs on the last)")
    parser.add_argument("--bf16-grads", action="store_true", help="DDP: all-reduce gradients in bf16 (comm hook)")
    parser.add_argument("--unfused", action="store_true", help="also time compiled QAT with the plain-expression fake-quant")
    parser.add_argument("--ungrouped", action="store_true", help="also time eager QAT with every layer on its own (no sibling groups)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS", help="also profile STEPS steps of each variant")
    parser.add_argument("--bucket-mb", type=float, default=25.0, help="DDP gradient bucket size")
    parser.add_argument("--static-graph", action="store_true", help="DDP static_graph=True")
    parser.add_argument("--no-optimize-ddp", action="store_true", help="compiled DDP: one graph, no split at bucket boundaries")
    parser.add_argument("--allreduce-probe", action="store_true", help="DDP: first time an all-reduce of the model's gradient size")
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU: a smoke test of this script")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 agreement check wants true float32
    if args.no_optimize_ddp:
        torch._dynamo.config.optimize_ddp = False
    results: dict = {"torch": torch.__version__, "what": args.what, "batch": args.batch, "seq": args.seq,
                     "grad_accum": args.grad_accum, "bf16_grads": args.bf16_grads, "bucket_mb": args.bucket_mb,
                     "static_graph": args.static_graph, "optimize_ddp": not args.no_optimize_ddp}
    if torch.cuda.is_available() and not args.tiny:
        results["card"] = torch.cuda.get_device_name()
    modes = [m for m in args.modes.split(",") if m]

    def log(row):
        print(json.dumps(row), flush=True)

    def save():
        if args.out and int(os.environ.get("RANK", "0")) == 0:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)

    if args.what == "single":
        args.world = 1
        device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
        if not args.skip_agreement:
            results["agreement"] = agreement(args, device)
            print(json.dumps(results["agreement"], indent=1), flush=True)
            save()
        for mode in modes:
            specs = [dict(qat=False, compiled=mode == "compiled"), dict(qat=True, compiled=mode == "compiled")]
            if mode == "compiled" and args.unfused:
                specs.append(dict(qat=True, compiled=True, fused=False, label=" (unfused fake-quant)"))
            if mode == "eager" and args.ungrouped:
                specs.append(dict(qat=True, compiled=False, group_siblings=False, label=" (layers on their own)"))
            results.setdefault("runs", []).extend(measure_together(args, device, specs, log))
            save()
    else:
        from ftq_core.distributed import process_group

        with process_group(use_cuda=not args.tiny) as rank:
            args.world = rank.world_size
            device = torch.device("cuda", rank.local_rank) if torch.cuda.is_available() and not args.tiny else torch.device("cpu")
            results["world_size"] = rank.world_size
            if rank.world_size > 1 and args.allreduce_probe:
                numel = sum(p.numel() for p in build_model(args, torch.device("meta"), qat=False).parameters())
                results["allreduce"] = allreduce_bandwidth(device, numel)
                log(results["allreduce"])
            for mode in modes:
                specs = [dict(qat=qat, compiled=mode == "compiled", ddp=rank.world_size > 1) for qat in (False, True)]
                results.setdefault("runs", []).extend(measure_together(args, device, specs, log if rank.is_main else lambda row: None))
                save()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
