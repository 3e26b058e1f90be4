"""Model level: prefill (1x256, last-token logits) and greedy decode of the bundled SmolLM2-135M.

Variants: ``fp32``, ``bf16`` (the whole model cast), and ftq's ``dynamic``
quantizer results: the default (``auto`` kernel, int8 embeddings, bf16
attention on CPUs with native bf16, rotated residual stream), the default with float32 attention
(``int8-attn-fp32``), the default without rotation (``int8-unrotated``), each fixed kernel, and torch.ao's per-tensor engines.
Prefill runs through HF's forward and the lean loop
(``<variant>-lean``).  Decode is 32 greedy tokens after a 16-token prompt,
through HF's forward with its KV cache (variants named as above) and through
ftq's lean loop (``<variant>-lean``; see ``ftq_core.generation``), the two
loops of ``ftq_core.evaluation.decode_tokens_per_second``.  The note gives
tokens/s and, for every lean row, the speed-ups over ``fp32-lean`` and
``bf16-lean``.  ``decode
overhead`` runs both loops on a Llama of SmolLM2's depth with hidden size 64,
where the time per token is the loop's own overhead, not weight traffic.
"""

from __future__ import annotations

import pytest
from conftest import QUICK, pedantic, thread_counts

from ftq_core.evaluation import greedy_decoder, random_prompt
from ftq_core.generation import DecodeLoop
from ftq_plugins.int8.kernels import quantized_engine

if QUICK:
    VARIANTS = {"fp32": None, "bf16": None, "int8-auto": {}}
else:
    VARIANTS = {
        "fp32": None,
        "bf16": None,
        "int8-auto": {},
        "int8-attn-fp32": None,  # int8-auto with float32 attention (same kernels: see get_model)
        "int8-unrotated": {"rotate": False},  # the default without its residual rotation: what the rotation costs
        "int8-onednn": {"kernel": "onednn"},
        "int8-int-mm": {"kernel": "int-mm"},
        "int8-weight-only": {"kernel": "weight-only"},
        "int8-ao-x86": {"activation": "per-tensor", "engine": "x86"},
        "int8-ao-onednn": {"activation": "per-tensor", "engine": "onednn"},
    }
THREADS = thread_counts()  # the model targets are stated at 2 threads; 1 thread is steadier on a shared machine
PREFILL_TOKENS = 256
DECODE_TOKENS = 8 if QUICK else 32
PROMPT_TOKENS = 16
#: Decode loops: HF's forward with its cache, ftq's lean loop (ftq_core.generation), and
#: the fused int8 decoder (ftq_plugins.fused; int8 variants of per-token numerics only).
LOOPS = ["hf", "lean", "fused"]
BATCH = 8

_MODELS: dict[str, object] = {}


@pytest.fixture(scope="module")
def float_model():
    from ftq_core.errors import ModelNotFoundError
    from ftq_core.models import bundled_gguf_path, load_model

    try:
        bundled_gguf_path("smollm2")
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    return load_model("smollm2").model.eval()


def get_model(variant: str, float_model):
    """Build (once per run) the model of ``variant`` from the float model."""
    import copy

    import torch

    if variant not in _MODELS:
        options = VARIANTS[variant]
        if variant == "fp32":
            model = float_model
        elif variant == "bf16":
            model = copy.deepcopy(float_model).to(torch.bfloat16)
        elif variant == "int8-attn-fp32":
            # a copy made with int8-auto, so that the two differ in attention only, not in kernels tuned apart
            get_model("int8-auto", float_model)
            return _MODELS[variant]
        else:
            import ftq_core

            # auto times its kernels at torch's thread count: use the one the targets are stated at
            before = torch.get_num_threads()
            torch.set_num_threads(max(THREADS))
            try:
                model = ftq_core.quantize(copy.deepcopy(float_model), "dynamic", options).model
            finally:
                torch.set_num_threads(before)
            if variant == "int8-auto" and "int8-attn-fp32" in VARIANTS:
                from ftq_core.attention import set_attention_dtype

                twin = copy.deepcopy(model)  # before any forward: packed weights cannot be copied
                set_attention_dtype(twin, None)
                _MODELS["int8-attn-fp32"] = twin.eval()
        _MODELS[variant] = model.eval()
    return _MODELS[variant]


def _engine_for(variant: str):
    options = VARIANTS[variant] or {}
    return options.get("engine") if options.get("activation") == "per-tensor" else None


@pytest.mark.parametrize("threads", THREADS, indirect=True, ids=lambda t: f"t{t}")
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill(benchmark, variant, loop, threads, float_model):
    """A 1x256 prompt's last-token logits, through HF's forward (``ftq eval``) or the lean loop (``ftq generate``)."""
    import torch

    with quantized_engine(_engine_for(variant)):
        model = _model_for(variant, loop, float_model)
        prompt = random_prompt(model, PREFILL_TOKENS)
        if loop == "hf":
            run, name = (lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1)), variant
        else:
            run, name = greedy_decoder(model, prompt, 1, loop=loop)[0], f"{variant}-{loop}"
        benchmark.group = f"model prefill 1x{PREFILL_TOKENS} t={threads}"
        benchmark.extra_info.update(variant=name, threads=threads, **({"loop": loop} if loop != "hf" else {}))
        with torch.inference_mode():
            pedantic(benchmark, run, budget_s=3.0, max_rounds=10)


@pytest.mark.parametrize("threads", THREADS, indirect=True, ids=lambda t: f"t{t}")
@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode(benchmark, variant, loop, threads, float_model):
    import torch

    with quantized_engine(_engine_for(variant)):
        model = _model_for(variant, loop, float_model)
        prompt = random_prompt(model, PROMPT_TOKENS)
        setup, decode = _decode_benchmark(model, prompt, loop)
        benchmark.group = f"model decode {DECODE_TOKENS} tokens t={threads}"
        name = variant if loop == "hf" else f"{variant}-{loop}"
        benchmark.extra_info.update(variant=name, loop=loop, threads=threads, new_tokens=DECODE_TOKENS)
        with torch.inference_mode():
            pedantic(benchmark, decode, setup=setup, budget_s=4.0, max_rounds=7)


@pytest.mark.parametrize("threads", THREADS, indirect=True, ids=lambda t: f"t{t}")
@pytest.mark.parametrize("loop", ["lean", "fused"])
@pytest.mark.parametrize("variant", ["fp32", "bf16", "int8-auto"])
def test_batch_decode(benchmark, variant, loop, threads, float_model):
    """Greedy decode of BATCH prompts at once (16 tokens each, then DECODE_TOKENS steps)."""
    import torch

    model = _model_for(variant, loop, float_model)
    prompt = random_prompt(model, PROMPT_TOKENS).repeat(BATCH, 1)
    prompt[:, 0] = torch.arange(BATCH)  # distinct sequences
    setup, decode = _decode_benchmark(model, prompt, loop)
    benchmark.group = f"model batch-{BATCH} decode {DECODE_TOKENS} tokens t={threads}"
    benchmark.extra_info.update(variant=f"{variant}-{loop}", loop=loop, threads=threads, new_tokens=DECODE_TOKENS * BATCH)
    with torch.inference_mode():
        pedantic(benchmark, decode, setup=setup, budget_s=4.0, max_rounds=5)


def _model_for(variant: str, loop: str, float_model):
    """The variant's model; the fused loop runs ftq's per-token int8 models only (others skip, with the reason)."""
    from ftq_core.generation import loop_reasons

    model = get_model(variant, float_model)
    if loop == "fused":
        reason = loop_reasons(model)[DecodeLoop.FUSED]
        if reason is not None:
            pytest.skip(f"fused: {reason}")
    return model


def _decode_benchmark(model, prompt, loop):
    """``(setup, decode)`` for ``pedantic``: the prompt's prefill is setup, only decoding is timed."""
    if prompt.shape[0] > 1:  # a batch: greedy_decoder's loops are for one sequence
        from ftq_core.generation import choose_loop, make_decoder

        decoder = make_decoder(model, choose_loop(model, loop), max_length=prompt.shape[1] + DECODE_TOKENS,
                               batch_size=prompt.shape[0])

        def decode_batch(token):
            for _ in range(DECODE_TOKENS):
                token = decoder.step(token).argmax(-1)
            return token

        return (lambda: ((decoder.prefill(prompt).argmax(-1),), {})), decode_batch
    prefill, decode = greedy_decoder(model, prompt, DECODE_TOKENS, loop=loop)
    return (lambda: ((prefill(),), {})), decode


@pytest.fixture(scope="module")
def overhead_model():
    """SmolLM2's depth and head layout with almost no weights: decode time is the loop's own overhead."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=30,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("loop", ["hf", "lean"])  # a float model: no fused loop
def test_decode_overhead(benchmark, loop, overhead_model):
    """Per-token cost of each loop on a 30-layer Llama of hidden size 64 (1 thread): framework overhead alone."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prompt = random_prompt(overhead_model, PROMPT_TOKENS)
        setup, decode = _decode_benchmark(overhead_model, prompt, loop)
        benchmark.group = f"decode overhead {DECODE_TOKENS} tokens, 30-layer tiny Llama t=1"
        variant = "fp32" if loop == "hf" else "fp32-lean"
        benchmark.extra_info.update(variant=variant, loop=loop, threads=1, new_tokens=DECODE_TOKENS)
        with torch.inference_mode():
            pedantic(benchmark, decode, setup=setup, budget_s=2.0, max_rounds=15)
    finally:
        torch.set_num_threads(before)
