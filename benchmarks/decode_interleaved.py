"""Decode speed of both loops, fp32 and int8, interleaved in one process (SmolLM2-135M).

On a shared machine a benchmark group that runs one variant after another can
catch another process in some variants' rounds only.  Here every variant
decodes a block of a few tokens in turn, many times over, so load hits all of
them alike; the report gives the minimum and median ms/token and the int8
speed-ups::

    python benchmarks/decode_interleaved.py --threads 1 2 --blocks 10

The int8 model is the ``dynamic`` quantizer's default (``auto`` kernels,
tuned at the largest thread count asked for).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


class _HfLoop:
    """HF's forward with its own KV cache, one token at a time (``loop="hf"``)."""

    def __init__(self, model):
        from ftq_core.evaluation import _cache_argument

        self.model, self.cache_arg, self.position = model, _cache_argument(model), 0

    def prefill(self, ids):
        from ftq_core.evaluation import _returned_cache

        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.past, self.position = _returned_cache(out), ids.shape[1]
        return out.logits[:, -1]

    def step(self, token):
        from ftq_core.evaluation import _returned_cache

        out = self.model(input_ids=token.reshape(-1, 1), use_cache=True, **{self.cache_arg: self.past})
        self.past, self.position = _returned_cache(out), self.position + 1
        return out.logits[:, -1]


def measure(loops: dict, prompt, *, blocks: int, block_tokens: int, max_length: int) -> dict[str, list[float]]:
    """ms/token of each loop over ``blocks`` turns of ``block_tokens`` greedy tokens."""
    import torch

    times: dict[str, list[float]] = {name: [] for name in loops}
    with torch.inference_mode():
        tokens = {name: loop.prefill(prompt).argmax(-1) for name, loop in loops.items()}
        for _ in range(blocks):
            for name, loop in loops.items():
                if loop.position + block_tokens > max_length:  # start over before the cache is full
                    tokens[name] = loop.prefill(prompt).argmax(-1)
                token = tokens[name]
                start = time.perf_counter()
                for _ in range(block_tokens):
                    token = loop.step(token).argmax(-1)
                times[name].append((time.perf_counter() - start) / block_tokens * 1e3)
                tokens[name] = token
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--block-tokens", type=int, default=4)
    args = parser.parse_args()

    import torch

    import ftq_core
    from ftq_core.generation import LeanDecoder
    from ftq_core.models import load_model

    fp32 = load_model("smollm2").model.eval()
    torch.set_num_threads(max(args.threads))
    int8 = ftq_core.quantize(copy.deepcopy(fp32), "dynamic", {}).model.eval()
    prompt = torch.randint(3, fp32.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1234))
    max_length = 64
    print(f"torch {torch.__version__}; blocks of {args.block_tokens} tokens x {args.blocks}, interleaved")
    for threads in args.threads:
        torch.set_num_threads(threads)
        loops = {
            "fp32-hf": _HfLoop(fp32), "fp32-lean": LeanDecoder(fp32, max_length=max_length),
            "int8-hf": _HfLoop(int8), "int8-lean": LeanDecoder(int8, max_length=max_length),
        }
        times = measure(loops, prompt, blocks=args.blocks, block_tokens=args.block_tokens, max_length=max_length)
        low = {name: min(v) for name, v in times.items()}
        mid = {name: statistics.median(v) for name, v in times.items()}
        print(f"t={threads} ms/token (min / median): " + ", ".join(f"{n} {low[n]:.1f} / {mid[n]:.1f}" for n in times))
        for base in ("fp32-hf", "fp32-lean", "int8-hf"):
            ratios = f"{low[base] / low['int8-lean']:.2f}x (min), {mid[base] / mid['int8-lean']:.2f}x (median)"
            print(f"t={threads} int8-lean vs {base}: {ratios}")


if __name__ == "__main__":
    main()
