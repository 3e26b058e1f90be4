"""Prefill speed of fp32, bf16 and int8 variants, interleaved in one process (SmolLM2-135M, 1x256).

Every variant runs one 1x256 prefill (last-token logits) in turn, many times
over, so load from other processes hits all of them alike; the report gives
the minimum and median ms and the speed-ups of the default int8 model.  The
int8 variants isolate the prefill changes: ``int8-base`` (float32 attention,
every layer quantizing its own input), ``int8-bf16-attn`` (bf16 attention
only), ``int8-shared`` (shared input codes only) and ``int8`` (both, the
``dynamic`` default on CPUs with native bf16).  Each runs through HF's
forward (what ``ftq eval`` times) and ftq's lean loop (``-lean``; what
``ftq generate`` prefills with).  ``--ppl N`` also reports held-out
perplexity over N blocks of 256 tokens of tinyshakespeare::

    python benchmarks/prefill_interleaved.py --threads 1 2 --turns 8 --ppl 16

The int8 model is quantized (``auto`` kernels tuned) at the largest thread
count asked for.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "tinyshakespeare.txt"


def int8_variants(int8) -> dict:
    """The default int8 model and copies with one or both prefill changes undone."""
    from ftq_core.attention import set_attention_dtype
    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

    def variant(bf16_attention: bool, shared: bool):
        model = copy.deepcopy(int8)
        set_attention_dtype(model, "bfloat16" if bf16_attention else None)
        for module in model.modules():
            if isinstance(module, Int8DynamicLinear):
                module.share_input = module.share_input and shared
        return model

    return {
        "int8-base": variant(False, False),
        "int8-bf16-attn": variant(True, False),
        "int8-shared": variant(False, True),
        "int8": variant(True, True),
    }


def prefill_calls(models: dict, prompt) -> dict:
    """``name -> callable`` running one prefill, through HF's forward and (``-lean``) the lean loop."""
    from ftq_core.evaluation import greedy_decoder

    calls = {}
    for name, model in models.items():
        calls[name] = lambda model=model: model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    for name, model in models.items():
        calls[f"{name}-lean"] = greedy_decoder(model, prompt, 1, loop="lean")[0]
    return calls


def measure(calls: dict, turns: int) -> dict[str, list[float]]:
    import torch

    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up: packing, first-call allocations
        for _ in range(turns):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def perplexities(models: dict, tokenizer, blocks: int) -> dict[str, float]:
    from ftq_core.evaluation import perplexity
    from ftq_core.plugins import get_plugins

    dataset = get_plugins().get("dataset", "text")
    splits = dataset.create(dataset.make_config({"path": str(SHAKESPEARE), "block_size": 256})).build(tokenizer)
    return {name: perplexity(model, splits.eval, max_blocks=blocks)[0] for name, model in models.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--ppl", type=int, default=0, help="held-out blocks of 256 tokens for perplexity (0: none)")
    args = parser.parse_args()

    import torch

    import ftq_core
    from ftq_core.evaluation import random_prompt
    from ftq_core.models import load_model

    loaded = load_model("smollm2")
    fp32 = loaded.model.eval()
    torch.set_num_threads(max(args.threads))
    int8 = ftq_core.quantize(copy.deepcopy(fp32), "dynamic", {}).model.eval()
    models = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16), **int8_variants(int8)}
    prompt = random_prompt(fp32, 256)
    print(f"torch {torch.__version__}; 1x256 prefill, {args.turns} interleaved turns; int8 default: "
          f"attention {getattr(int8.config, 'ftq_attention_dtype', None) or 'float32'}")
    if args.ppl and SHAKESPEARE.is_file():
        ppl = perplexities(models, loaded.tokenizer, args.ppl)
        print(f"perplexity ({args.ppl} held-out blocks of 256): " + ", ".join(
            f"{n} {p:.3f} ({p / ppl['fp32'] - 1:+.2%} vs fp32, {p / ppl['int8-base'] - 1:+.2%} vs int8-base)"
            for n, p in ppl.items()))
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = measure(prefill_calls(models, prompt), args.turns)
        low = {name: min(v) for name, v in times.items()}
        mid = {name: statistics.median(v) for name, v in times.items()}
        print(f"t={threads} ms (min / median): " + ", ".join(f"{n} {low[n]:.1f} / {mid[n]:.1f}" for n in times))
        for loop in ("", "-lean"):
            target = f"int8{loop}"
            ratios = ", ".join(
                f"vs {base}{loop} {low[base + loop] / low[target]:.2f}x / {mid[base + loop] / mid[target]:.2f}x"
                for base in ("fp32", "bf16", "int8-base")
            )
            print(f"t={threads} {target} (min / median): {ratios}")


if __name__ == "__main__":
    main()
