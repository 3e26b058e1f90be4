"""The fused int8 decoder against the eager loops, thread by thread, variants in turns (SmolLM2-135M's shape).

For each thread count: greedy decode (batch 1: 32 tokens after a 16-token
prompt; batch 8), and prefill 1x256, of fp32 (lean loop), bf16 (prefill),
ftq int8 ``dynamic`` on the eager lean loop and on the fused decoder.  Every
variant runs once per turn; the best of the turns is reported.  Also the
fused library's first build and a cached reload, in fresh processes.  With
``--profile``, where the fused decoder's prefill and decode time goes, stage by
stage (its stage clock, best of the turns)::

    python benchmarks/fused_decode.py --threads 2            # the bundled model
    python benchmarks/fused_decode.py --random --threads 2 8 16 --profile --json out.json   # its shape, random weights
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time

DECODE_TOKENS, PROMPT_TOKENS, PREFILL_TOKENS, BATCH = 32, 16, 256, 8


def smollm2_shape():
    """A random-init model of SmolLM2-135M's configuration (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def build_seconds() -> dict:
    """Seconds for the fused library's first build (empty cache) and a cached load, each in a fresh process."""
    import tempfile

    code = ("import time; t = time.perf_counter(); from ftq_plugins.fused import build; "
            "assert build.load_library(verbose=False) is not None, build.unavailable_reason(); "
            "print(time.perf_counter() - t)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "FTQ_CACHE_DIR": cache}
        first = float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout)
        again = float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout)
    return {"first_build_s": first, "cached_load_s": again}


_MEMORY_CODE = """
import resource, sys, torch
import ftq_core
from ftq_core.generation import greedy_generate
def rss_mb():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) / 1024
torch.set_num_threads(2)
# What both processes import (plugins, transformers, the fused library's code) is not the model's memory
from ftq_core.plugins import get_plugins
from ftq_plugins.fused import build
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
from accelerate import init_empty_weights
from transformers import AutoConfig
get_plugins()
build.load_library(verbose=False)
with init_empty_weights(include_buffers=False):  # transformers' one-time model set-up, on the meta device
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama"))
before = rss_mb()
kind, source = sys.argv[1], sys.argv[2]
if kind == 'int8':
    model = ftq_core.load(source).model
else:
    from ftq_core.models import load_model
    model = load_model(source).model.eval()
ids = torch.randint(0, model.config.vocab_size, (1, 16))
greedy_generate(model, ids, max_new_tokens=32, eos_token_id=[])
print(rss_mb() - before)
"""


def resident_mb(model_source: str) -> dict:
    """Resident memory a process gains by loading and decoding 32 tokens: fp32 (lean loop) vs the int8
    artifact (``ftq_core.load``, fused decoder); each in a fresh process, after the same imports
    (ftq's plugins, transformers and its one-time model set-up, the fused library), so that only the model,
    its tokenizer and its decoding count."""
    import tempfile

    from ftq_core.pipeline import quantize_to_artifact

    with tempfile.TemporaryDirectory() as tmp:
        artifact, _ = quantize_to_artifact(model_source, f"{tmp}/int8")
        out = {}
        for kind, source in (("fp32", model_source), ("int8", str(artifact))):
            done = subprocess.run([sys.executable, "-c", _MEMORY_CODE, kind, source], check=True, capture_output=True, text=True)
            out[f"rss_{kind}_mb"] = float(done.stdout.strip().splitlines()[-1])
    out["rss_int8_over_fp32"] = out["rss_int8_mb"] / out["rss_fp32_mb"]
    return out


def measure(models: dict, threads: int, turns: int) -> dict:
    import torch

    from ftq_core.generation import DecodeLoop, LeanDecoder, make_decoder

    torch.set_num_threads(threads)
    vocab = models["fp32"].config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt1 = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=gen)
    prompt8 = torch.randint(0, vocab, (BATCH, PROMPT_TOKENS), generator=gen)
    long_prompt = torch.randint(0, vocab, (1, PREFILL_TOKENS), generator=gen)
    length = PROMPT_TOKENS + DECODE_TOKENS + 1

    def decoder(name, batch):
        model_name, _, loop = name.rpartition("-") if name != "fp32" else ("fp32", "", "lean")
        if loop == "fused":
            return make_decoder(models[model_name], DecodeLoop.FUSED, max_length=max(length, PREFILL_TOKENS),
                                batch_size=batch)
        return LeanDecoder(models[model_name], max_length=max(length, PREFILL_TOKENS), batch_size=batch)

    int8_names = [f"{m}-{loop}" for m in models if m.startswith("int8") for loop in ("lean", "fused")]
    decode = {(name, batch): decoder(name, batch) for name in ["fp32", *int8_names] for batch in (1, BATCH)}
    prefill = {
        "fp32": lambda: models["fp32"](long_prompt, logits_to_keep=1),
        "bf16": lambda: models["bf16"](long_prompt, logits_to_keep=1),
        **{name: (lambda name=name: decode[(name, 1)].prefill(long_prompt)) for name in int8_names},
    }
    best: dict[str, float] = {}

    def timed(key, fn):
        start = time.perf_counter()
        fn()
        best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)

    def run_decode(dec, batch):
        token = dec.prefill(prompt1 if batch == 1 else prompt8).argmax(-1)

        def steps():
            nonlocal token
            for _ in range(DECODE_TOKENS):
                token = dec.step(token).argmax(-1)
        return steps

    with torch.inference_mode():
        for turn in range(turns + 1):  # turn 0 warms up
            for (name, batch), dec in decode.items():
                steps = run_decode(dec, batch)
                timed(f"decode{batch}:{name}", steps)
            for name, fn in prefill.items():
                timed(f"prefill:{name}", fn)
            if turn == 0:
                best.clear()
    out = {"threads": threads}
    for (name, batch) in decode:
        out[f"decode_b{batch}_{name}_tok_s"] = batch * DECODE_TOKENS / best[f"decode{batch}:{name}"]
    for name in prefill:
        out[f"prefill_{name}_ms"] = 1e3 * best[f"prefill:{name}"]
    return out


def stage_profile(int8_model, threads: int, turns: int) -> dict:
    """The fused decoder's stage clock: prefill 1x256 and a token (32 after a 16-token prompt), best turn of each."""
    import torch

    from ftq_core.generation import DecodeLoop, make_decoder

    torch.set_num_threads(threads)
    decoder = make_decoder(int8_model, DecodeLoop.FUSED, max_length=PREFILL_TOKENS + 1)
    vocab = int8_model.config.vocab_size
    long_prompt = torch.randint(0, vocab, (1, PREFILL_TOKENS), generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.inference_mode():
        for phase in ("prefill", "decode"):
            best = (float("inf"), {})
            for turn in range(turns + 1):  # turn 0 warms up
                token = None if phase == "prefill" else decoder.prefill(long_prompt[:, :PROMPT_TOKENS]).argmax(-1)
                decoder.set_profiling(True)
                start = time.perf_counter()
                if phase == "prefill":
                    decoder.prefill(long_prompt)
                else:
                    for _ in range(DECODE_TOKENS):
                        token = decoder.step(token).argmax(-1)
                wall = (time.perf_counter() - start) / (1 if phase == "prefill" else DECODE_TOKENS)
                if turn and wall < best[0]:
                    scale = 1 if phase == "prefill" else DECODE_TOKENS
                    best = (wall, {name: s / scale for name, s in decoder.stage_seconds().items()})
            out[phase] = {"wall_ms": 1e3 * best[0], "stages_ms": {k: 1e3 * v for k, v in best[1].items()}}
        decoder.set_profiling(False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--random", action="store_true", help="SmolLM2-135M's shape with random weights (no files)")
    parser.add_argument("--no-build-timing", action="store_true")
    parser.add_argument("--rotate", action="store_true",
                        help="also dynamic rotate=true, the default (int8rot-* rows; int8-* rows are rotate=false)")
    parser.add_argument("--profile", action="store_true", help="also the fused decoder's time per stage")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    import torch

    import ftq_core

    if args.random:
        fp32 = smollm2_shape()
    else:
        from ftq_core.models import load_model

        fp32 = load_model("smollm2").model.eval()
    torch.set_num_threads(max(args.threads))  # auto kernels are tuned at the largest thread count asked for
    int8 = ftq_core.quantize(copy.deepcopy(fp32), "dynamic", {"rotate": False}).model.eval()
    models = {"fp32": fp32, "bf16": copy.deepcopy(fp32).to(torch.bfloat16), "int8": int8}
    if args.rotate:  # the default, rotated, beside the unrotated model: what the rotation costs
        models["int8rot"] = ftq_core.quantize(copy.deepcopy(fp32), "dynamic", {"rotate": True}).model.eval()
    from ftq_core.cpu_features import cpu_model_name
    from ftq_plugins.fused import build

    result = {"cpu": cpu_model_name(), "torch": torch.__version__,
              "isa": build.load_library().isa() if build.load_library() else None, "rows": []}
    if not args.no_build_timing:
        result.update(build_seconds())
    if not args.random:
        result.update(resident_mb("smollm2"))
    for threads in args.threads:
        row = measure(models, threads, args.turns)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    print("| threads | fp32 decode | int8 lean decode | int8 fused decode | fused / fp32 | fused b8 / fp32 b8 | "
          "prefill fp32 / bf16 / int8 lean / int8 fused ms | fused prefill vs bf16, fp32 |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for r in result["rows"]:
        print(f"| {r['threads']} | {r['decode_b1_fp32_tok_s']:.1f} | {r['decode_b1_int8-lean_tok_s']:.1f} | "
              f"{r['decode_b1_int8-fused_tok_s']:.1f} | {r['decode_b1_int8-fused_tok_s'] / r['decode_b1_fp32_tok_s']:.2f}x | "
              f"{r[f'decode_b{BATCH}_int8-fused_tok_s'] / r[f'decode_b{BATCH}_fp32_tok_s']:.2f}x | "
              f"{r['prefill_fp32_ms']:.0f} / {r['prefill_bf16_ms']:.0f} / {r['prefill_int8-lean_ms']:.0f} / "
              f"{r['prefill_int8-fused_ms']:.0f} | {r['prefill_bf16_ms'] / r['prefill_int8-fused_ms']:.2f}x, "
              f"{r['prefill_fp32_ms'] / r['prefill_int8-fused_ms']:.2f}x |")
    if "int8rot" in models:
        for r in result["rows"]:
            print(f"rotate=true, {r['threads']} threads: decode fused {r['decode_b1_int8rot-fused_tok_s']:.1f} vs "
                  f"{r['decode_b1_int8-fused_tok_s']:.1f} tok/s, lean {r['decode_b1_int8rot-lean_tok_s']:.1f} vs "
                  f"{r['decode_b1_int8-lean_tok_s']:.1f}; prefill fused {r['prefill_int8rot-fused_ms']:.0f} vs "
                  f"{r['prefill_int8-fused_ms']:.0f} ms, lean {r['prefill_int8rot-lean_ms']:.0f} vs {r['prefill_int8-lean_ms']:.0f}")
    if args.profile:
        for row in result["rows"]:
            for name in ("int8", "int8rot") if "int8rot" in models else ("int8",):
                key = "profile" if name == "int8" else "profile_rotate"
                row[key] = stage_profile(models[name], row["threads"], args.turns)
                for phase, prof in row[key].items():
                    stages = sorted(prof["stages_ms"].items(), key=lambda kv: -kv[1])
                    print(f"{row['threads']} threads, {name} fused {phase} ({prof['wall_ms']:.2f} ms"
                          f"{'' if phase == 'prefill' else ' a token'}): "
                          + ", ".join(f"{stage} {ms:.2f} ms" for stage, ms in stages))
    if "rss_int8_mb" in result:
        print(f"resident memory gained (load + 32 tokens): fp32 {result['rss_fp32_mb']:.0f} MB, "
              f"int8 artifact on the fused decoder {result['rss_int8_mb']:.0f} MB ({result['rss_int8_over_fp32']:.0%})")
    if "first_build_s" in result:
        print(f"fused library: first build {result['first_build_s']:.0f} s, cached load {result['cached_load_s']:.2f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
