"""Measuring a model: held-out perplexity, size, prefill latency, decode speed.

All measurements run on the CPU, where int8 inference happens, in float32
inputs, with the thread count torch has (``torch.get_num_threads()``).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "EvalSettings", "Evaluation", "perplexity", "prefill_ms", "decode_tokens_per_second", "greedy_decoder",
    "random_prompt", "prefill_runner", "state_bytes", "evaluate", "latency_in_turns", "decode_loop_name", "NOISY_SPREAD",
]

#: Turns whose slowest is this much slower than their fastest make a latency "noisy" in reports.
NOISY_SPREAD = 1.2


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """How much to measure: more blocks and repeats are steadier but slower."""

    max_blocks: int = field(default=8, metadata={"help": "held-out blocks for perplexity"})
    batch_size: int = field(default=1, metadata={"help": "blocks per forward pass"})
    prefill_tokens: int = field(default=256, metadata={"help": "prompt length for prefill latency"})
    decode_tokens: int = field(default=32, metadata={"help": "greedy tokens for decode speed"})
    repeats: int = field(default=3, metadata={"help": "latency repeats (median reported)"})
    latency: bool = field(default=True, metadata={"help": "measure prefill and decode speed"})
    compile: bool = field(default=True, metadata={"help": "time int8 Llama-family models on the fused int8 decoder (false: eager loops)"})

    def __post_init__(self) -> None:
        from .configs import check

        check(
            [
                (self.max_blocks >= 1, f"max_blocks must be >= 1, got {self.max_blocks}"),
                (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
                (self.prefill_tokens >= 1, f"prefill_tokens must be >= 1, got {self.prefill_tokens}"),
                (self.decode_tokens >= 1, f"decode_tokens must be >= 1, got {self.decode_tokens}"),
                (self.repeats >= 1, f"repeats must be >= 1, got {self.repeats}"),
            ],
            where="eval options",
        )


@dataclass
class Evaluation:
    """One row of the report."""

    label: str
    perplexity: float | None
    size_bytes: int
    prefill_ms: float | None = None
    decode_tokens_per_s: float | None = None
    eval_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _no_grad():
    import torch

    return torch.inference_mode()


def perplexity(model, blocks, *, max_blocks: int = 8, batch_size: int = 1) -> tuple[float, int]:
    """``exp`` of the mean next-token loss over the first ``max_blocks`` blocks; also the token count."""
    from tqdm.auto import tqdm

    count = min(len(blocks), max_blocks)
    if count == 0:
        raise ValueError("no held-out blocks to evaluate on")
    from .data import IGNORE_INDEX, collate

    total_loss, total_tokens = 0.0, 0
    with _no_grad():
        for start in tqdm(range(0, count, batch_size), desc="perplexity", unit="batch", leave=False, disable=count < 4):
            batch = collate([blocks[i] for i in range(start, min(start + batch_size, count))])
            logits = model(**batch.model_inputs()).logits
            total_loss += _next_token_loss_sum(logits, batch.labels, IGNORE_INDEX)
            total_tokens += batch.loss_tokens
    if total_tokens == 0:
        raise ValueError("the held-out blocks have no target tokens (every label is masked)")
    return math.exp(total_loss / total_tokens), total_tokens


#: Positions whose log-probabilities are computed at once: a vocabulary-wide float32 row is 0.5 MB at 128k tokens.
LOSS_CHUNK_POSITIONS = 64


def _next_token_loss_sum(logits, labels, ignore_index: int) -> float:
    """Summed next-token cross-entropy of ``logits [batch, positions, vocab]``, a chunk of positions at a time.

    A whole block's float32 log-softmax (and the copy its reshape makes) would
    double or triple the logits' memory, 0.5 GB a block at Llama-3's
    vocabulary, on top of the model; chunks keep that to a few MB.
    """
    import torch

    total = 0.0
    positions = logits.shape[1] - 1
    for start in range(0, positions, LOSS_CHUNK_POSITIONS):
        end = min(start + LOSS_CHUNK_POSITIONS, positions)
        chunk = logits[:, start:end].float()
        total += torch.nn.functional.cross_entropy(
            chunk.reshape(-1, chunk.shape[-1]), labels[:, start + 1:end + 1].reshape(-1), reduction="sum",
            ignore_index=ignore_index,
        ).item()
    return total


def random_prompt(model, length: int):
    """A fixed (seeded) prompt of ``length`` random token ids for speed measurements."""
    import torch

    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(3, vocab, (1, length), generator=generator)


#: Prompt tokens before the timed decode steps.
DECODE_PROMPT_TOKENS = 16


def prefill_runner(model, prompt, *, compile: bool = True):
    """A callable running ``prompt`` once (last-token logits): the fused decoder's prefill where
    :func:`ftq_core.generation.choose_loop` picks it, else the model's forward with a cache."""
    from .generation import DecodeLoop, choose_loop, make_decoder

    if choose_loop(model, compile=compile, max_length=prompt.shape[-1]) is DecodeLoop.FUSED:
        decoder = make_decoder(model, DecodeLoop.FUSED, max_length=prompt.shape[-1])
        return lambda: decoder.prefill(prompt)
    return lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1)


def prefill_ms(model, *, tokens: int = 256, repeats: int = 3, compile: bool = True) -> float:
    """Median wall time of one prefill over a ``1 × tokens`` prompt (last-token logits; see :func:`prefill_runner`)."""
    run = prefill_runner(model, random_prompt(model, tokens), compile=compile)
    times = []
    with _no_grad():
        run()  # warm-up: kernels, caches
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cache_argument(model) -> str:
    """Name of the KV-cache argument: ``cache`` in transformers 5, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def decode_tokens_per_second(
    model, *, new_tokens: int = 32, prompt_tokens: int = DECODE_PROMPT_TOKENS, repeats: int = 3, loop: str = "auto",
    compile: bool = True,
) -> float:
    """Greedy decoding speed with a KV cache, prefill excluded (median of ``repeats``).

    ``loop``: ``fused`` (ftq's fused int8 decoder), ``lean``
    (:class:`ftq_core.generation.LeanDecoder`), ``hf`` (the model's own
    forward with HF's cache) or ``auto`` (the first that runs the model, what
    ``ftq generate`` runs); see :func:`ftq_core.generation.choose_loop`.
    """
    prefill, decode = greedy_decoder(model, random_prompt(model, prompt_tokens), new_tokens, loop=loop, compile=compile)
    rates = []
    with _no_grad():
        for attempt in range(repeats + 1):
            state = prefill()
            start = time.perf_counter()
            decode(state)
            if attempt:  # the first pass only warms up
                rates.append(new_tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def greedy_decoder(model, prompt, new_tokens: int, *, loop: str = "auto", compile: bool = True):
    """``(prefill, decode)`` for timing greedy decoding through ``loop`` (see :func:`decode_tokens_per_second`).

    ``prefill()`` runs ``prompt`` and returns the decoding state (KV cache and
    first token); ``decode(state)`` generates ``new_tokens`` tokens from it and
    returns the last.  Timing ``decode`` alone measures decode speed.
    """
    from .generation import DecodeLoop, choose_loop, make_decoder

    chosen = choose_loop(model, loop, compile=compile, max_length=prompt.shape[-1] + new_tokens)
    if chosen is not DecodeLoop.HF:
        decoder = make_decoder(model, chosen, max_length=prompt.shape[-1] + new_tokens)

        def step_prefill():
            return decoder.prefill(prompt).argmax(-1)

        def step_decode(token):
            for _ in range(new_tokens):
                token = decoder.step(token).argmax(-1)
            return token

        return step_prefill, step_decode
    cache_arg = _cache_argument(model)

    def hf_prefill():
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        return _returned_cache(out), out.logits[:, -1:].argmax(-1)

    def hf_decode(state):
        past, token = state
        for _ in range(new_tokens):
            out = model(input_ids=token, use_cache=True, **{cache_arg: past})
            past, token = _returned_cache(out), out.logits[:, -1:].argmax(-1)
        return token

    return hf_prefill, hf_decode


def state_bytes(model) -> int:
    """Bytes of the model's tensors, tied tensors counted once (≈ size on disk)."""
    seen, total = set(), 0
    for tensor in list(model.state_dict().values()):
        if not hasattr(tensor, "untyped_storage"):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    for module in model.modules():  # torch.ao quantized modules hide packed weights
        packed = getattr(module, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            weight, bias = packed._weight_bias()
            total += weight.numel() * weight.element_size() + (bias.numel() * bias.element_size() if bias is not None else 0)
    return total


def decode_loop_name(model, *, compile: bool = True, new_tokens: int | None = None) -> str:
    """Which decode loop the decode timing of ``new_tokens`` runs for ``model`` (``ftq generate`` likewise):
    ``fused``, ``lean`` or ``hf``."""
    from .generation import choose_loop

    max_length = None if new_tokens is None else DECODE_PROMPT_TOKENS + new_tokens
    return choose_loop(model, compile=compile, max_length=max_length).value


def evaluate(model, label: str, eval_blocks, settings: EvalSettings, *, size_bytes: int | None = None) -> Evaluation:
    """Measure ``model`` on CPU: perplexity on ``eval_blocks``, size, and (optionally) speed."""
    model.eval()
    ppl, tokens = perplexity(model, eval_blocks, max_blocks=settings.max_blocks, batch_size=settings.batch_size)
    result = Evaluation(label=label, perplexity=ppl, size_bytes=size_bytes or state_bytes(model), eval_tokens=tokens)
    if settings.latency:
        result.prefill_ms = prefill_ms(model, tokens=settings.prefill_tokens, repeats=settings.repeats,
                                       compile=settings.compile)
        result.decode_tokens_per_s = decode_tokens_per_second(model, new_tokens=settings.decode_tokens,
                                                              repeats=settings.repeats, compile=settings.compile)
        result.extra["decode_loop"] = decode_loop_name(model, compile=settings.compile, new_tokens=settings.decode_tokens)
    return result


def latency_in_turns(models: dict[str, Any], settings: EvalSettings) -> dict[str, dict[str, float]]:
    """Prefill and decode speed of the models to be compared, measured in turns; the best turn of each.

    Each turn runs every model once, so a machine whose speed drifts (other
    load, clock changes) weighs on all of them alike, and the minimum resists
    such noise best.  ``*_spread`` is slowest / fastest turn: how steady it was.
    """
    import torch
    from tqdm.auto import tqdm

    prefills = {
        label: prefill_runner(model, random_prompt(model, settings.prefill_tokens), compile=settings.compile)
        for label, model in models.items()
    }
    decoders = {
        label: greedy_decoder(model, random_prompt(model, DECODE_PROMPT_TOKENS), settings.decode_tokens,
                              compile=settings.compile)
        for label, model in models.items()
    }
    prefill_times: dict[str, list[float]] = {label: [] for label in models}
    decode_times: dict[str, list[float]] = {label: [] for label in models}
    with torch.inference_mode():
        for label in models:  # warm-up: kernels, caches, packed weights
            prefills[label]()
            start_decode, decode = decoders[label]
            decode(start_decode())
        for _ in tqdm(range(settings.repeats), desc="latency", unit="turn", leave=False):
            for label in models:
                start = time.perf_counter()
                prefills[label]()
                prefill_times[label].append(time.perf_counter() - start)
                start_decode, decode = decoders[label]
                state = start_decode()
                start = time.perf_counter()
                decode(state)
                decode_times[label].append(time.perf_counter() - start)
    return {
        label: {
            "prefill_ms": 1e3 * min(prefill_times[label]),
            "decode_tokens_per_s": settings.decode_tokens / min(decode_times[label]),
            "prefill_spread": max(prefill_times[label]) / min(prefill_times[label]),
            "decode_spread": max(decode_times[label]) / min(decode_times[label]),
            "turns": settings.repeats,
        }
        for label in models
    }
