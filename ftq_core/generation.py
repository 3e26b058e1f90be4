"""Greedy generation, with a lean decode loop for Llama-family models.

Decoding one token through Hugging Face's eager Llama spends ~9 ms (30
layers, one CPU core) on Python and dispatcher work around the arithmetic:
cache objects, mask building, output classes, decorators.  For a small int8
model that is a third of the token.  :class:`LeanDecoder` runs the same model
in ~5 ms of such work:

* the KV cache is two preallocated tensors ``[layers, batch, kv_heads,
  max_length, head_dim]``, written in place;
* rotary cos/sin come from the model's own ``rotary_emb`` once, for every
  position (so any static rope scaling is applied exactly as HF does);
* attention is one ``scaled_dot_product_attention`` call (grouped-query heads
  via ``enable_gqa``), causal for the prompt, maskless for one new token; in
  bf16 (cache included) where the model records bf16 attention
  (:mod:`ftq_core.attention`), as its Hugging Face forward then does.

Every weight-carrying module is called as a module (embeddings, norms,
projections, the MLP, ``lm_head``), so quantized replacements, int8
embeddings and SmoothQuant-folded norms run unchanged.  What the loop does not
cover is refused up front by :func:`unsupported_reason` and
:func:`greedy_generate` then falls back to ``model.generate``: the decision is
made before generating, never by catching errors half-way.
"""

from __future__ import annotations

import enum
from typing import Any

from .errors import UsageError
from .model_families import family_of, model_types_where

__all__ = [
    "DecodeLoop", "LeanDecoder", "supports", "unsupported_reason", "layer_layout_reason", "rope_tables", "choose_loop", "loop_reasons",
    "make_decoder", "greedy_generate",
]


class DecodeLoop(str, enum.Enum):
    """Which loop generates.

    ``fused``: ftq's fused int8 decoder, every layer in one native call per
    step (:mod:`ftq_plugins.fused`; int8 Llama-family models, compiled once per
    machine); ``lean``: :class:`LeanDecoder`; ``hf``: Hugging Face's
    ``generate``; ``auto``: the first of these that runs the model.
    """

    AUTO = "auto"
    FUSED = "fused"
    LEAN = "lean"
    HF = "hf"


#: Model types whose decoder layer is exactly Llama's (see :mod:`.model_families`); checked by tests against HF.
SUPPORTED_MODEL_TYPES = model_types_where("fused_decode")

#: Rope types whose frequencies do not depend on the sequence length, so one
#: table computed up front equals what HF computes step by step.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

#: Generation-config settings that change greedy decoding; with any of them
#: set, :func:`greedy_generate` leaves the work to HF ``generate``.
_PROCESSOR_SETTINGS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "min_length": 0,
    "min_new_tokens": None,
    "sequence_bias": None,
}


def _rope_parameters(config) -> dict:
    """The rope settings, in transformers' 5 layout (``rope_parameters``) or its 4 one (``rope_scaling``)."""
    return getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}


def _rope_type(config) -> str:
    params = _rope_parameters(config)
    return params.get("rope_type", params.get("type", "default"))


def _has_hooks(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def layer_layout_reason(config) -> str | None:
    """Why the family of ``config`` does not have Llama's decoder layer (``None`` when it does)."""
    family = family_of(config)
    if family is None:
        model_type = getattr(config, "model_type", None)
        return f"model type {model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    return None if family.fused_decode else f"model type {config.model_type!r}: {family.reason('fused_decode')}"


def _window_binds(window, max_length: int | None) -> bool:
    """Whether a sliding window of ``window`` tokens masks anything in sequences of up to ``max_length`` tokens
    (unknown length: it may)."""
    return window is not None and (max_length is None or max_length > int(window))


def unsupported_reason(model, *, attention_mask=None, max_length: int | None = None) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (``None`` when it can).

    Checks the architecture, module layout, rope type, sliding windows,
    training mode, padding, and forward hooks on the containers the lean loop
    bypasses (hooks on the modules it calls still run).
    """
    config = getattr(model, "config", None)
    reason = layer_layout_reason(config)
    if reason:
        return reason
    body = getattr(model, "model", None)
    names = ("embed_tokens", "layers", "norm", "rotary_emb")
    if body is None or not all(hasattr(body, n) for n in names) or not hasattr(model, "lm_head"):
        return "the model lacks the Llama module layout (model.embed_tokens/layers/norm/rotary_emb, lm_head)"
    for i, layer in enumerate(body.layers):
        attn = getattr(layer, "self_attn", None)
        parts = ("input_layernorm", "post_attention_layernorm", "mlp")
        if attn is None or not all(hasattr(layer, p) for p in parts):
            return f"layer {i} lacks the Llama layout (input_layernorm, self_attn, post_attention_layernorm, mlp)"
        separate, fused = ("q_proj", "k_proj", "v_proj", "o_proj"), ("qkv_proj", "o_proj")
        if not (all(hasattr(attn, p) for p in separate) or all(hasattr(attn, p) for p in fused)):
            return f"layer {i}'s attention lacks q/k/v/o projections (or a fused qkv_proj and o_proj)"
        norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
        if any(n is not None and _has_hooks(n) for n in norms):
            return f"layer {i}'s q/k norms have forward hooks, which the lean loop would skip"
        if _has_hooks(layer) or _has_hooks(attn):
            return f"layer {i} has forward hooks, which the lean loop would skip"
        if _window_binds(getattr(attn, "sliding_window", None), max_length):
            return (f"layer {i} uses sliding-window attention over {attn.sliding_window} tokens, and the sequence may "
                    f"be longer (the lean loop runs sequences that fit the window)")
    if _has_hooks(model) or _has_hooks(body):
        return "the model has forward hooks, which the lean loop would skip"
    if getattr(config, "use_sliding_window", True) and _window_binds(getattr(config, "sliding_window", None), max_length):
        return (f"the model uses sliding-window attention over {config.sliding_window} tokens, and the sequence may be "
                f"longer (the lean loop runs sequences that fit the window)")
    if getattr(config, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1 splits the projections"
    if float(_rope_parameters(config).get("partial_rotary_factor", None)
             or getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        return "the rotary embedding covers only part of each head (partial_rotary_factor)"
    if _rope_type(config) not in STATIC_ROPE_TYPES:
        return f"rope type {_rope_type(config)!r} recomputes its frequencies with the sequence length"
    if model.training:
        return "the model is in training mode (dropout); call model.eval()"
    if attention_mask is not None and not bool(attention_mask.all()):
        return "the batch is padded (attention_mask has zeros)"
    return None


def rope_tables(model, max_length: int, *, dtype, device):
    """``(cos, signed_sin)`` ``[max_length, 1, head_dim]`` for every position, from the model's own ``rotary_emb``.

    HF's ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x2, x1)``
    equals ``x * cos + roll(x, half) * cat(-sin1, sin2)``: the same products (a
    sign flip is exact), one op fewer per use.  In ``dtype``, as HF casts
    cos/sin to the hidden states' dtype.
    """
    import torch

    probe = torch.zeros(1, 1, model.config.hidden_size, dtype=dtype, device=device)
    positions = torch.arange(max_length, device=device)[None]
    cos, sin = model.model.rotary_emb(probe, position_ids=positions)  # [1, max_length, head_dim]
    half = cos.shape[-1] // 2
    signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    return cos[0][:, None, :].contiguous(), signed[0][:, None, :].contiguous()


def supports(model, **kwargs) -> bool:
    """Whether :class:`LeanDecoder` runs ``model`` (see :func:`unsupported_reason`)."""
    return unsupported_reason(model, **kwargs) is None


class LeanDecoder:
    """Prefill and one-token steps of a Llama-family model with a preallocated KV cache.

    ``prefill(ids)`` takes the prompt ``[batch, tokens]`` (it resets the cache);
    ``step(ids)`` takes one new token per sequence ``[batch]`` or
    ``[batch, 1]``; both return float logits of the last position
    ``[batch, vocab]``.  Sequences may grow to ``max_length`` tokens.
    Inference only: call under ``torch.inference_mode()`` (or ``no_grad``).
    """

    def __init__(self, model, *, max_length: int, batch_size: int = 1):
        reason = unsupported_reason(model, max_length=max_length)
        if reason is not None:
            raise UsageError(f"the lean decode loop cannot run this model: {reason}. Use loop='hf' (HF generate).")
        import torch

        self.model = model
        body = model.model
        config = model.config
        first = body.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scale = first.scaling
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.embed, self.norm, self.lm_head = body.embed_tokens, body.norm, model.lm_head
        self.layers = [
            (
                layer.input_layernorm,
                self._qkv(layer.self_attn),
                getattr(layer.self_attn, "q_norm", None),  # Qwen3's per-head norms of q and k, before rope
                getattr(layer.self_attn, "k_norm", None),
                layer.self_attn.o_proj,
                layer.post_attention_layernorm,
                layer.mlp,
            )
            for layer in body.layers[: config.num_hidden_layers]
        ]
        self.position = 0
        self._dtype = None  # the hidden-state dtype, known after the first embedding
        from .attention import attention_dtype

        self.attention_dtype = attention_dtype(model)  # None: attention in the hidden-state dtype
        self._torch = torch

    def _qkv(self, attn):
        """``x -> (q, k, v)`` through the layer's projections: three, or one fused ``qkv_proj`` (Phi-3) split."""
        if not hasattr(attn, "qkv_proj"):
            q_proj, k_proj, v_proj = attn.q_proj, attn.k_proj, attn.v_proj
            return lambda x: (q_proj(x), k_proj(x), v_proj(x))
        qkv_proj = attn.qkv_proj
        sizes = [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim]
        return lambda x: qkv_proj(x).split(sizes, dim=-1)

    # -- set-up once per dtype -----------------------------------------------------
    def _build(self, hidden) -> None:
        """Rope tables in the dtype the embeddings produce (HF casts cos/sin to it too); the
        cache in the attention dtype (keys and values are rounded to it once, when written)."""
        torch = self._torch
        shape = (len(self.layers), self.batch_size, self.kv_heads, self.max_length, self.head_dim)
        cache_dtype = self.attention_dtype or hidden.dtype
        self.keys = torch.zeros(shape, dtype=cache_dtype, device=hidden.device)
        self.values = torch.zeros(shape, dtype=cache_dtype, device=hidden.device)
        # [max_length, 1, head_dim]: broadcasts over heads
        self.cos, self.sin = rope_tables(self.model, self.max_length, dtype=hidden.dtype, device=hidden.device)
        self._dtype = hidden.dtype

    def _rope(self, x, cos, sin):
        return x * cos + x.roll(self.head_dim // 2, dims=-1) * sin

    # -- forward ----------------------------------------------------------------
    def _forward(self, ids):
        """Run ``ids [batch, tokens]`` at the current position; returns last-position logits."""
        torch = self._torch
        sdpa = torch.nn.functional.scaled_dot_product_attention
        batch, tokens = ids.shape
        start, end = self.position, self.position + tokens
        if batch != self.batch_size or end > self.max_length or (tokens > 1 and start != 0):
            raise ValueError(
                f"LeanDecoder got {batch}x{tokens} tokens at position {start} (batch {self.batch_size}, "
                f"max_length {self.max_length}; several tokens only as the prompt)"
            )
        hidden = self.embed(ids)
        if self._dtype != hidden.dtype:
            self._build(hidden)
        cos, sin = self.cos[start:end], self.sin[start:end]
        # One op each for all layers' cache views (instead of two per layer).
        write_k = self.keys[:, :, :, start:end].unbind(0)
        write_v = self.values[:, :, :, start:end].unbind(0)
        read_k = self.keys[:, :, :, :end].unbind(0)
        read_v = self.values[:, :, :, :end].unbind(0)
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        causal = tokens > 1  # one new token attends to every cached position: no mask at all
        cast = self.attention_dtype if self.attention_dtype not in (None, hidden.dtype) else None
        for i, (norm1, qkv, q_norm, k_norm, o_proj, norm2, mlp) in enumerate(self.layers):
            x = norm1(hidden)
            q, k, v = qkv(x)
            q, k = q.view(batch, tokens, heads, head_dim), k.view(batch, tokens, kv_heads, head_dim)
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            write_k[i].copy_(k.transpose(1, 2))  # copy_ rounds to the cache's dtype
            write_v[i].copy_(v.view(batch, tokens, kv_heads, head_dim).transpose(1, 2))
            if cast is not None:
                q = q.to(cast)
            attn = sdpa(q.transpose(1, 2), read_k[i], read_v[i], is_causal=causal, scale=self.scale, enable_gqa=True)
            attn = attn.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
            hidden = hidden + o_proj(attn if cast is None else attn.to(hidden.dtype))
            hidden = hidden + mlp(norm2(hidden))
        self.position = end
        return self.lm_head(self.norm(hidden[:, -1:]))[:, 0].float()

    def prefill(self, input_ids):
        """Start over with the prompt ``input_ids [batch, tokens]``; logits of its last position."""
        self.position = 0
        return self._forward(input_ids)

    def step(self, token_ids):
        """Append one token per sequence (``[batch]`` or ``[batch, 1]``); logits of the new position."""
        return self._forward(token_ids.reshape(self.batch_size, 1))


def _generation_settings_block_lean(model) -> str | None:
    """Generation-config settings that alter greedy picks (the lean loop applies none of them)."""
    gen = getattr(model, "generation_config", None)
    for name, neutral in _PROCESSOR_SETTINGS.items():
        value = getattr(gen, name, neutral) if gen is not None else neutral
        if value is not None and value != neutral and not (neutral is None and value in (0, [], {})):
            return f"generation_config.{name} = {value!r} changes greedy decoding"
    return None


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def _fused_reason(model, max_length: int | None) -> str | None:
    # The fused decoder is ftq's built-in int8 engine (ftq_plugins.fused); it imports torch
    # and the int8 layers, so it is imported only when a loop is chosen.
    from ftq_plugins.fused.decoder import unsupported_reason as fused_reason

    return fused_reason(model, max_length=max_length)


def loop_reasons(model, *, attention_mask=None, compile: bool = True,
                 max_length: int | None = None) -> dict[DecodeLoop, str | None]:
    """Why each loop cannot run ``model`` (``None`` where it can), in :data:`DecodeLoop` order.

    ``compile=False`` (``--no-compile``) keeps the fused loop out; ``max_length``: the longest sequence
    (prompt and new tokens) the loop will see, where known (a sliding window that never binds is no reason).
    """
    lean = (unsupported_reason(model, attention_mask=attention_mask, max_length=max_length)
            or _generation_settings_block_lean(model))
    if not compile:
        fused = "turned off (--no-compile)"
    else:
        fused = lean or _fused_reason(model, max_length)
    return {DecodeLoop.FUSED: fused, DecodeLoop.LEAN: lean, DecodeLoop.HF: None}


def choose_loop(model, loop: DecodeLoop | str = DecodeLoop.AUTO, *, attention_mask=None, compile: bool = True,
                max_length: int | None = None) -> DecodeLoop:
    """The concrete loop (``fused``, ``lean`` or ``hf``) for ``model``, decided before generating.

    ``auto`` takes the first loop that runs the model; asking for one that
    cannot is an error naming the reason.  ``compile=False`` keeps ``auto``
    off the fused loop.
    """
    try:
        loop = DecodeLoop(loop)
    except ValueError:
        raise UsageError(f"unknown decode loop {loop!r}; choose one of {', '.join(d.value for d in DecodeLoop)}") from None
    if loop is DecodeLoop.HF:
        return loop
    reasons = loop_reasons(model, attention_mask=attention_mask, compile=compile and loop is not DecodeLoop.LEAN,
                           max_length=max_length)
    if loop is not DecodeLoop.AUTO:
        if reasons[loop] is not None:
            raise UsageError(f"the {loop.value} decode loop cannot run this model: {reasons[loop]}. Use loop='auto'.")
        return loop
    return next(choice for choice, reason in reasons.items() if reason is None)


def make_decoder(model, loop: DecodeLoop, *, max_length: int, batch_size: int = 1):
    """A decoder with ``prefill``/``step``/``position`` for a loop :func:`choose_loop` returned (``fused`` or ``lean``)."""
    if loop is DecodeLoop.FUSED:
        from ftq_plugins.fused.decoder import FusedDecoder

        return FusedDecoder(model, max_length=max_length, batch_size=batch_size)
    if loop is DecodeLoop.LEAN:
        return LeanDecoder(model, max_length=max_length, batch_size=batch_size)
    raise ValueError(f"no step decoder for loop {loop.value!r}")


def greedy_generate(
    model,
    input_ids,
    *,
    max_new_tokens: int,
    attention_mask=None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    loop: DecodeLoop | str = DecodeLoop.AUTO,
    compile: bool = True,
) -> Any:
    """Greedy continuation: ``[batch, prompt + new]`` token ids, as ``model.generate(do_sample=False)`` returns.

    Generation stops once every sequence has produced an end-of-sequence token
    (``eos_token_id``, default the model's generation config); finished
    sequences are filled with ``pad_token_id`` (default: the first eos id).
    ``loop``: see :class:`DecodeLoop`; ``compile=False`` keeps ``auto`` off
    the fused loop.
    """
    import torch

    chosen = choose_loop(model, loop, attention_mask=attention_mask, compile=compile,
                         max_length=input_ids.shape[1] + max_new_tokens)
    eos = _eos_ids(model, eos_token_id)
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    with torch.inference_mode():
        if chosen is not DecodeLoop.HF:
            return _stepwise_greedy(model, chosen, input_ids, max_new_tokens, eos, pad_token_id)
        import copy

        config = copy.deepcopy(model.generation_config)
        config.eos_token_id = eos or None  # None here means no eos at all, as in the lean loop
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
            generation_config=config,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id,
        )


def _stepwise_greedy(model, loop: DecodeLoop, input_ids, max_new_tokens: int, eos: list[int], pad_token_id: int):
    """:func:`greedy_generate` through the fused or lean decoder (HF's stopping and padding rules)."""
    import torch

    batch = input_ids.shape[0]
    decoder = make_decoder(model, loop, max_length=input_ids.shape[1] + max_new_tokens, batch_size=batch)
    logits = decoder.prefill(input_ids)
    eos_tensor = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    pieces = [input_ids]
    for n in range(max_new_tokens):
        token = logits.argmax(-1)
        if eos:
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, eos_tensor)
        pieces.append(token[:, None])
        if (eos and bool(finished.all())) or n == max_new_tokens - 1:
            break
        logits = decoder.step(token)
    return torch.cat(pieces, dim=1)
