"""A model's config.json, tokenizer and context checked before transformers builds anything.

transformers trusts the config: it builds 200,000 layers if asked to (and
only then notices the weights have two), divides by zero attention heads,
reads ``"64"`` as a size, and loads a tokenizer whose ids run past the
embedding (an ``IndexError`` mid-training).  Each check here names the field
that is wrong and what to do about it, and reads only JSON and the
safetensors headers.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any, Callable

from .errors import FtqWarning, ModelNotFoundError, UsageError
from .untrusted_json import parse_untrusted_json

__all__ = [
    "check_block_size", "check_config_against_weights", "check_config_file", "check_tokenizer_fits",
    "guarded_tokenizer", "resolved_sizes",
]

#: Sizes that must be positive integers where config.json gives them (GPT-2 spells them n_*).
SIZE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions",
    "n_ctx", "n_inner",
)
#: Numbers that must be finite and positive where given.
POSITIVE_FLOAT_FIELDS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "rope_theta")
#: Where rotary scaling settings live (older and newer transformers).
ROPE_FIELDS = ("rope_scaling", "rope_parameters")
#: Names of transformer-block weights: ``model.layers.<index>.``, GPT-2's ``h.<index>.`` and kin.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")
#: How the input embedding's weight ends in the families ftq loads.
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
#: A model may build at most this many times the weights its files hold (float32 of bf16 files is 2x, and the
#: estimate over-counts grouped-query attention): beyond, the config is not the weights' config.
_SIZE_SLACK = 8
_FIX = "Fix config.json (it must describe the weights beside it) or copy the model again."


def _first(config: dict, *keys: str) -> Any:
    """The first of ``keys`` config.json sets (not null)."""
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field_problems(config: dict) -> list[str]:
    """Every size, epsilon and rotary setting of the wrong type or range."""
    problems = []
    for key in SIZE_FIELDS:
        value = config.get(key)
        if value is not None and not (_is_int(value) and value > 0):
            problems.append(f"{key} is {value!r}, not a positive integer")
    for key in POSITIVE_FLOAT_FIELDS:
        value = config.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            problems.append(f"{key} is {value!r}, not a positive finite number")
    for key in ROPE_FIELDS:
        rope = config.get(key)
        if rope is not None and not isinstance(rope, dict):
            problems.append(f"{key} is {rope!r}, not a mapping")
        elif rope is not None and "factor" in rope:
            factor = rope["factor"]
            if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and math.isfinite(factor)
                    and factor > 0):
                problems.append(f"{key}.factor is {factor!r}, not a positive finite number")
    return problems


def _head_problems(config: dict) -> list[str]:
    """Heads that do not divide the hidden size or each other (only once every size is a positive integer)."""
    hidden, heads = _first(config, "hidden_size", "n_embd"), _first(config, "num_attention_heads", "n_head")
    kv_heads = config.get("num_key_value_heads")
    problems = []
    if hidden and heads and config.get("head_dim") is None and hidden % heads:
        problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    if heads and kv_heads and heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return problems


def _refuse_prequantized(path: Path, config: dict) -> None:
    quantization = config.get("quantization_config")
    if quantization is None:
        return
    method = quantization.get("quant_method", "an unnamed method") if isinstance(quantization, dict) else "?"
    raise ModelNotFoundError(
        f"{path} is already quantized with {method} (quantization_config in config.json); ftq quantizes float "
        f"weights, so give it the float model this one came from."
    )


def check_config_file(path: Path) -> dict:
    """config.json of the model directory ``path`` as a mapping, refused where a field cannot describe a model."""
    config_path = Path(path) / "config.json"
    try:
        config = parse_untrusted_json(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelNotFoundError(f"{config_path} is not readable JSON ({exc}); copy the model again") from None
    if not isinstance(config, dict):
        raise ModelNotFoundError(f"{config_path} holds a JSON {type(config).__name__}, not an object; copy the "
                                 f"model again")
    _refuse_prequantized(path, config)
    problems = _field_problems(config)
    problems = problems or _head_problems(config)
    if problems:
        raise ModelNotFoundError(f"{config_path}: {'; '.join(problems)}. {_FIX}")
    return config


def _layer_indices(names) -> dict[int, int]:
    """``{layer index: how many weights it has}`` from the weight names."""
    counts: dict[int, int] = {}
    for name in names:
        if m := _LAYER.search(name):
            counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


def _refuse_other_layer_count(path: Path, layers: int | None, info: dict) -> None:
    """The config's layer count against the layers the weights hold (each config layer is built before loading)."""
    held = _layer_indices(info)
    if not layers or not held or layers == len(held):
        return
    per_layer = max(held.values())
    what = (f"{(layers - len(held)) * per_layer} weight(s) missing" if layers > len(held)
            else f"{(len(held) - layers) * per_layer} weight(s) unexpected")
    raise ModelNotFoundError(
        f"the weights in {path} do not fit the model's config: {what} (config.json says num_hidden_layers = {layers} "
        f"but the weights hold {len(held)} layers). {_FIX}")


def resolved_sizes(config: Any) -> dict:
    """The sizes a transformers config object resolves (defaults filled in, GPT-2's ``n_*`` names mapped)."""
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "n_inner", "tie_word_embeddings")
    return {key: getattr(config, key, None) for key in keys}


def _estimated_parameters(config: dict) -> int:
    """Parameters the config asks for: embeddings (and an untied head) plus 4 attention and 3 MLP matrices a layer."""
    hidden = _first(config, "hidden_size", "n_embd") or 0
    layers = _first(config, "num_hidden_layers", "n_layer") or 0
    ff = _first(config, "intermediate_size", "n_inner") or 4 * hidden
    vocab = config.get("vocab_size") or 0
    heads = 1 if config.get("tie_word_embeddings") is not False else 2
    return heads * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * ff)


def check_config_against_weights(path: Path, config: dict, info: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    """Refuse a config whose layers, vocabulary or size the weights (``{name: (dtype, shape)}``) contradict.

    ``config``: :func:`resolved_sizes` of the config transformers will build from.
    Runs before the model is built, which is when a wrong config costs memory.
    """
    _refuse_other_layer_count(path, _first(config, "num_hidden_layers", "n_layer"), info)
    embedding = next((name for name in info if name.endswith(_EMBEDDINGS)), None)
    vocab, hidden = config.get("vocab_size"), _first(config, "hidden_size", "n_embd")
    if embedding is not None and len(shape := info[embedding][1]) == 2:
        if vocab and shape[0] != vocab:
            raise ModelNotFoundError(f"{path}/config.json says vocab_size = {vocab} but {embedding} has {shape[0]} "
                                     f"rows; set vocab_size to {shape[0]} or copy the model again.")
        if hidden and shape[1] != hidden:
            raise ModelNotFoundError(f"{path}/config.json says hidden_size = {hidden} but {embedding} has {shape[1]} "
                                     f"columns; set hidden_size to {shape[1]} or copy the model again.")
    wanted, stored = _estimated_parameters(config), sum(math.prod(shape) for _, shape in info.values())
    if wanted > _SIZE_SLACK * stored + (1 << 20):
        raise ModelNotFoundError(
            f"{path}/config.json asks for a model of about {wanted / 1e9:.3g}B parameters "
            f"({4 * wanted / 2**30:.3g} GiB in float32) and the weights hold {stored / 1e9:.3g}B. {_FIX}")


def check_tokenizer_fits(where: str, tokenizer: Any, vocab_size: int | None) -> None:
    """Refuse a tokenizer whose vocabulary or special tokens have ids past the embedding (an IndexError in the
    middle of training); warn where only added tokens do (text containing them is the only text that fails)."""
    if not vocab_size:
        return
    base = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    specials = [getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")]
    beyond = [i for i in specials if isinstance(i, int) and i >= vocab_size]
    if base > vocab_size or beyond:
        what = f"has {base} tokens" if base > vocab_size else f"has special token id {beyond[0]}"
        raise ModelNotFoundError(
            f"the tokenizer of {where} {what} but the model's embedding has {vocab_size} rows, so some token ids "
            f"would index past it; use the tokenizer the model was trained with, or resize the embeddings "
            f"(model.resize_token_embeddings) and save the model again."
        )
    if len(tokenizer) > vocab_size:
        warnings.warn(
            f"the tokenizer of {where} adds {len(tokenizer) - vocab_size} token(s) with ids past the model's "
            f"{vocab_size} embedding rows; text that contains them will fail", FtqWarning, stacklevel=2)


def _is_native_failure(exc: BaseException) -> bool:
    """An error of the tokenizers library itself: a Rust panic (``pyo3_runtime.PanicException``, which derives
    from BaseException) or the plain ``Exception`` it raises for a tokenizer.json it cannot build (a bad regex)."""
    return type(exc).__name__ == "PanicException" or type(exc) is Exception


def guarded_tokenizer(where: str, load: Callable[[], Any]) -> Any:
    """``load()``'s tokenizer, also made to encode a sample; a failure of its native library becomes one line.

    The sample encodes at load time so that a pre-tokenizer that panics on
    text fails here, not in the middle of a run.  KeyboardInterrupt and
    every other exception go on up unchanged.
    """
    try:
        tokenizer = load()
        tokenizer("ftq checks this tokenizer: Hello, world! 123 café\n")
    except BaseException as exc:
        if not _is_native_failure(exc):
            raise
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelNotFoundError(
            f"the tokenizer of {where} fails in its native library ({detail}): its tokenizer.json (e.g. a "
            f"pre-tokenizer regex) is broken. Copy the tokenizer files from the source model again."
        ) from None
    return tokenizer


def check_block_size(config: Any, block_size: int | None) -> None:
    """Refuse blocks longer than learned positions reach; warn where rotary positions would extrapolate."""
    if not block_size:
        return
    learned = getattr(config, "n_positions", None) if getattr(config, "model_type", None) == "gpt2" else None
    if learned and block_size > learned:
        raise UsageError(
            f"block_size {block_size} is longer than this GPT-2 model's {learned} learned positions (n_positions), "
            f"which cannot go past them; set block_size to {learned} or less"
        )
    context = getattr(config, "max_position_embeddings", None)
    if not learned and isinstance(context, int) and block_size > context:
        warnings.warn(
            f"block_size {block_size} is longer than the model's context of {context} tokens "
            f"(max_position_embeddings): its rotary positions will be used past what it was trained on",
            FtqWarning, stacklevel=2,
        )
