"""int8 against float on this CPU: the rows of the int8-on-every-CPU table, measured in one process, in turns.

    python benchmarks/int8_every_cpu.py [--threads 2] [--turns 5] [--json FILE]

On the bundled SmolLM2-135M (``dynamic`` defaults) and at its layer shapes:

* ``gemm``: one 256-row int8 product through each exact implementation of
  :mod:`ftq_plugins.int8.exact_matmul` (``torch._int_mm``, ftq's native GEMM,
  the float GEMM on the codes) against the float32 product of the same shape;
* ``prefill``: a 1x256 prompt, fp32 against int8, through the loop
  ``greedy_generate`` and ``ftq eval`` use (the fused decoder's prefill where
  it runs) and through the model's own forward (eager int8 layers);
* ``perplexity``: tokens per second of perplexity evaluation (batches of
  4 x 256 tokens through the model's forward), int8 against fp32;
* ``decode``: greedy tokens per second at batch 1, int8 (fused decoder)
  against fp32;
* ``train step``: one optimizer step of LoRA over the int8 model against one
  full fp32 fine-tuning step, both at the trainer's default batch (2 x 256)
  in float32 (what CPUs without native bf16 train in).

Every variant of a row runs once per turn, in turn with the others; each
figure is the minimum over turns.  To stand in for an AVX2-only CPU on a
wider one, run with ``FTQ_FUSED_ISA=avx2 ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2`` (and
``FTQ_INT8_MATMUL=ftq``: a wider CPU's oneDNN does not fall to the reference
code a real AVX2 CPU runs for ``torch._int_mm``, so the process would
otherwise measure and pick it).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time


def _min_in_turns(fns: dict, turns: int) -> dict[str, float]:
    """Seconds: minimum over ``turns`` of each callable, run in turns after one warm-up each."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(turns):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def gemm_rows(turns: int) -> list[dict]:
    import torch

    from ftq_plugins.int8.exact_matmul import BACKENDS, run_backend

    rows = []
    gen = torch.Generator().manual_seed(0)
    for m, k, n in ((256, 576, 1536), (256, 1536, 576)):
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        xf, wf = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        fns = {"fp32": lambda: xf @ wf.t()}
        fns.update({f"int8 {b}": (lambda b=b: run_backend(b, x, w)) for b in BACKENDS})
        best = _min_in_turns(fns, turns)
        rows += [{"row": f"gemm {m}x{k}x{n}", "variant": name, "ms": s * 1e3, "vs fp32": best["fp32"] / s}
                 for name, s in best.items()]
    return rows


def model_rows(turns: int) -> list[dict]:
    import torch

    import ftq_core
    from ftq_core.evaluation import decode_tokens_per_second, perplexity, prefill_runner, random_prompt
    from ftq_core.generation import choose_loop
    from ftq_core.models import load_model
    from ftq_core.plugins import get_plugins

    loaded = load_model("smollm2")
    fp32 = loaded.model.eval()
    int8 = ftq_core.quantize(copy.deepcopy(fp32), "dynamic").model.eval()
    rows = []
    prompt = random_prompt(fp32, 256)
    with torch.inference_mode():
        fns = {
            "fp32": prefill_runner(fp32, prompt),
            f"int8 ({choose_loop(int8).value} loop)": prefill_runner(int8, prompt),
            "int8 (model forward)": lambda: int8(input_ids=prompt, use_cache=True, logits_to_keep=1),
        }
        best = _min_in_turns(fns, turns)
    rows += [{"row": "prefill 1x256", "variant": name, "ms": s * 1e3, "vs fp32": best["fp32"] / s} for name, s in best.items()]

    dataset = get_plugins().get("dataset", "text")
    blocks = dataset.create(dataset.make_config({"block_size": 256})).build(loaded.tokenizer).train
    best = _min_in_turns({"fp32": lambda: perplexity(fp32, blocks, max_blocks=8, batch_size=4),
                          "int8": lambda: perplexity(int8, blocks, max_blocks=8, batch_size=4)}, max(1, turns // 2))
    rows += [{"row": "perplexity (8 x 256 tokens)", "variant": name, "tok/s": 8 * 255 / s, "vs fp32": best["fp32"] / s}
             for name, s in best.items()]

    speeds = {name: max(decode_tokens_per_second(model, new_tokens=32) for _ in range(max(1, turns // 2)))
              for name, model in (("fp32", fp32), ("int8", int8))}
    rows += [{"row": "decode batch 1", "variant": name, "tok/s": v, "vs fp32": v / speeds["fp32"]} for name, v in speeds.items()]
    rows += train_rows(fp32, int8, loaded.tokenizer, turns)
    return rows


def train_rows(fp32, int8, tokenizer, turns: int) -> list[dict]:
    """One optimizer step each, float32: the full fine-tune against LoRA over int8 (trainer defaults otherwise)."""
    import torch

    from ftq_plugins.adapters.lora import LoraAdapter, LoraOptions
    from ftq_plugins.trainers.causal_lm import ADAPTER_LR, FULL_LR

    full = copy.deepcopy(fp32).train()
    lora = LoraAdapter(LoraOptions()).attach(copy.deepcopy(int8)).train()
    ids = torch.randint(0, len(tokenizer), (2, 256), generator=torch.Generator().manual_seed(0))
    fns = {}
    for name, model, lr in (("fp32 full fine-tune", full, FULL_LR), ("LoRA over int8", lora, ADAPTER_LR)):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)

        def step(model=model, optimizer=optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        fns[name] = step
    best = _min_in_turns(fns, max(1, turns // 2))
    base = best["fp32 full fine-tune"]
    return [{"row": "train step 2x256", "variant": name, "ms": s * 1e3, "vs fp32": base / s} for name, s in best.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--only", choices=["gemm", "model"], help="one part of the table")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    import torch

    from ftq_core.cpu_features import cpu_model_name, narrowed_to_avx2
    from ftq_plugins.fused import build
    from ftq_plugins.int8.exact_matmul import backend

    torch.set_num_threads(args.threads)
    library = build.load_library()
    rows = [] if args.only == "model" else gemm_rows(args.turns)
    rows += [] if args.only == "gemm" else model_rows(args.turns)
    machine = (f"{cpu_model_name()}, {args.threads} threads, native build {library.isa() if library else 'none'}, "
               f"exact int8 product: {backend(True)} (many rows) / {backend(False)} (one row)"
               + (", ATEN_CPU_CAPABILITY narrowed to AVX2" if narrowed_to_avx2() else ""))
    print(f"\n{machine}\n\n| row | variant | ms | tok/s | vs fp32 |\n|---|---|---:|---:|---:|")
    for r in rows:
        ms = f"{r['ms']:.2f}" if "ms" in r else ""
        tps = f"{r['tok/s']:.1f}" if "tok/s" in r else ""
        print(f"| {r['row']} | {r['variant']} | {ms} | {tps} | {r['vs fp32']:.2f}x |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": machine, "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
