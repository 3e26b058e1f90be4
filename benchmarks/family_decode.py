"""Decode speed of an int8 model of each family: ftq's chosen loop against Hugging Face's ``generate``, in turns.

    python benchmarks/family_decode.py [--threads 2] [--turns 3] [--families qwen2,qwen3,...] [--json out.json]

For each family a random-init model of a small real shape (Qwen2.5-0.5B,
Qwen3-0.6B, Gemma-3-270M; Mistral and Phi-3 at proportions scaled to a
SmolLM2-sized model; SmolLM2-135M's Llama shape as the reference) is
quantized with ``dynamic`` defaults, then greedy decoding of 32 tokens after
a 16-token prompt (batch 1) is timed on the loop ``ftq generate`` picks
(``auto``: fused where the family has it) and on HF ``generate`` with the
same int8 model, one after the other in each turn; the best turn counts.
Also whether the two loops' greedy tokens are equal.  Weights' values do not
change the time.
"""

from __future__ import annotations

import argparse
import json
import time

#: Configurations of the shapes (``model_type`` → config keywords).
SHAPES = {
    "llama": ("SmolLM2-135M", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                                   tie_word_embeddings=True)),
    "qwen2": ("Qwen2.5-0.5B", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, rope_theta=1000000.0,
                                   tie_word_embeddings=True)),
    "qwen3": ("Qwen3-0.6B", dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
                                 tie_word_embeddings=True)),
    "mistral": ("Mistral-7B proportions at 0.2B", dict(vocab_size=32768, hidden_size=1024, intermediate_size=3584,
                                                       num_hidden_layers=16, num_attention_heads=16,
                                                       num_key_value_heads=4, sliding_window=4096,
                                                       tie_word_embeddings=False)),
    "phi3": ("Phi-3-mini proportions at 0.2B", dict(vocab_size=32064, hidden_size=1024, intermediate_size=2816,
                                                    num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                                                    original_max_position_embeddings=4096, sliding_window=2047,
                                                    tie_word_embeddings=False, pad_token_id=0)),
    "gemma3_text": ("Gemma-3-270M", dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                         num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                         query_pre_attn_scalar=256, sliding_window=512, tie_word_embeddings=True)),
}

PROMPT_TOKENS, DECODE_TOKENS = 16, 32


def shaped_model(model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    _, settings = SHAPES[model_type]
    config = AutoConfig.for_model(model_type, max_position_embeddings=4096, **settings)
    return AutoModelForCausalLM.from_config(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--families", default=",".join(SHAPES))
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()

    import torch

    import ftq_core
    from ftq_core.evaluation import greedy_decoder
    from ftq_core.generation import choose_loop, greedy_generate
    from ftq_core.model_families import family_of

    torch.set_num_threads(args.threads)
    rows = []
    for model_type in args.families.split(","):
        shape, _ = SHAPES[model_type]
        model = ftq_core.quantize(shaped_model(model_type), "dynamic").model
        prompt = torch.randint(3, model.config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
        chosen = choose_loop(model, max_length=PROMPT_TOKENS + DECODE_TOKENS)
        loops = {"hf": greedy_decoder(model, prompt, DECODE_TOKENS, loop="hf"),
                 chosen.value: greedy_decoder(model, prompt, DECODE_TOKENS, loop=chosen.value)}
        best = {name: float("inf") for name in loops}
        with torch.inference_mode():
            for _ in range(args.turns):
                for name, (prefill, decode) in loops.items():
                    state = prefill()
                    start = time.perf_counter()
                    decode(state)
                    best[name] = min(best[name], time.perf_counter() - start)
        tokens = {name: greedy_generate(model, prompt, max_new_tokens=DECODE_TOKENS, loop=name) for name in loops}
        row = {"family": family_of(model).name, "shape": shape,
               "parameters": sum(p.numel() for p in shaped_model(model_type).parameters()),
               "loop": chosen.value, "hf_tok_s": DECODE_TOKENS / best["hf"],
               "loop_tok_s": DECODE_TOKENS / best[chosen.value],
               "same_tokens": bool(torch.equal(tokens["hf"], tokens[chosen.value]))}
        row["speedup"] = row["loop_tok_s"] / row["hf_tok_s"]
        rows.append(row)
        print(f"| {row['family']} | {shape} | {row['loop']} | {row['loop_tok_s']:.1f} | {row['hf_tok_s']:.1f} | "
              f"{row['speedup']:.2f}x | {'yes' if row['same_tokens'] else 'no'} |", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
