"""Random-init models of real shapes, written as bf16 safetensors shards, for time and memory benchmarks.

Time and memory do not depend on the weights' values, so a model of
Llama-3.1-8B's shape with random weights stands in for the real one.  Each
model is written one tensor at a time into shards of at most ``--shard-gb``
with a ``model.safetensors.index.json``, as ``save_pretrained`` writes big
models, so making an 8B model never holds more than one shard in memory.

The tokenizer is the bundled SmolLM2's (49,152 tokens); a shape whose own
vocabulary is smaller (TinyLlama's 32,000) takes 49,152 rows instead, so
every token id has an embedding (stated in RESULTS beside each figure).

    python benchmarks/shaped_models.py --shape llama-3.1-8b --out /tmp/shapes
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

#: name -> config fields of the real model (vocabulary raised to the tokenizer's where smaller)
SHAPES = {
    "tinyllama-1.1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
        rope_theta=10000.0, rms_norm_eps=1e-5,
    ),
    "llama-3.2-3b": dict(
        model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5, head_dim=128,
    ),
    "llama-3.1-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=131072,
        rope_theta=500000.0, rms_norm_eps=1e-5,
    ),
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6,
    ),
}


def shaped_config(shape: str, *, vocab_at_least: int = 0, layers: int | None = None):
    """The transformers config of ``shape`` (optionally with fewer layers, for tests)."""
    from transformers import AutoConfig

    fields = dict(SHAPES[shape])
    fields["vocab_size"] = max(fields["vocab_size"], vocab_at_least)
    if layers is not None:
        fields["num_hidden_layers"] = layers
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, torch_dtype="bfloat16", **fields)


def write_random_model(config, out: Path, *, shard_bytes: int = 2 << 30, seed: int = 0, tokenizer=None) -> Path:
    """Write a random-init model of ``config`` to ``out`` as bf16 safetensors shards plus an index."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    skeleton.tie_weights()  # a tied head is not stored, as save_pretrained does
    names = [(name, tuple(p.shape)) for name, p in skeleton.named_parameters()]  # tied weights listed once
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    std = 0.02
    shards: list[dict] = [{}]
    sizes = [0]
    for name, shape in names:
        numel = 1
        for dim in shape:
            numel *= dim
        if sizes[-1] and sizes[-1] + 2 * numel > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = shape
        sizes[-1] += 2 * numel
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator) * std).to(torch.bfloat16)
            weight_map[name] = file
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
        print(f"wrote {file} ({sizes[index - 1] / 2**30:.2f} GiB)", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def bundled_tokenizer():
    from transformers import AutoTokenizer

    from ftq_core.models import bundled_gguf_path, model_cache_dir

    cached = sorted(model_cache_dir().glob(bundled_gguf_path("smollm2").stem + "-*"))
    if cached and (cached[-1] / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached[-1]))
    from ftq_core.models import load_model

    return load_model("smollm2").tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="parent folder; the model goes to OUT/SHAPE")
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the real shape")
    args = parser.parse_args()
    tokenizer = bundled_tokenizer()
    config = shaped_config(args.shape, vocab_at_least=len(tokenizer), layers=args.layers)
    target = args.out / (args.shape + (f"-{args.layers}l" if args.layers else ""))
    write_random_model(config, target, shard_bytes=int(args.shard_gb * 2**30), tokenizer=tokenizer)
    print(target)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
