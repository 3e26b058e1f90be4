"""Prefill and decode of an int8 Llama-family model through the fused native library.

:class:`FusedDecoder` has the interface of :class:`ftq_core.generation.LeanDecoder`
(``prefill``, ``step``, ``position``) and runs the same arithmetic: ftq's
per-token int8 numerics for every projection and the head (those of
:class:`~ftq_plugins.int8.dynamic_linear.Int8DynamicLinear`'s ``int-mm``
and ``onednn`` kernels), float32 norms, rope from the model's own tables, and
attention in bf16 where the model records it.  It reads the layers' int8
weights where they are (no copy).  The embedding runs as the model's module.

:func:`unsupported_reason` says up front why a model cannot take this path,
so the caller picks the eager loop before generating.
"""

from __future__ import annotations

from ftq_core.generation import rope_tables
from ftq_core.generation import unsupported_reason as lean_reason

from . import build

__all__ = ["FusedDecoder", "unsupported_reason", "model_reason"]

#: Kernels whose numerics the fused path reproduces (``auto`` prefills with them;
#: its one-row choices are other kernels of the same per-channel weights).
_PER_TOKEN_KERNELS = ("auto", "onednn", "int-mm")

#: torch._int_mm (the prompt GEMM) takes widths in multiples of 8.
_WIDTH_MULTIPLE = 8


def _int8_linear_reason(name: str, module) -> str | None:
    from ftq_plugins.int8.dynamic_linear import Int8DynamicLinear

    if type(module) is not Int8DynamicLinear:
        return f"{name} is a {type(module).__name__}, not ftq's per-token int8 Linear"
    if module.kernel not in _PER_TOKEN_KERNELS:
        return f"{name} runs the {module.kernel!r} kernel, whose numerics the fused path does not reproduce"
    if module.in_features % _WIDTH_MULTIPLE or module.out_features % _WIDTH_MULTIPLE:
        return f"{name} is {module.in_features}x{module.out_features}; the fused path needs multiples of 8"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{name} has forward hooks, which the fused path would skip"
    return None


def _norm_reason(name: str, module) -> str | None:
    from ftq_plugins.transforms.rotated_norm import RotatedRMSNorm

    if name == "model.norm" and type(module) is RotatedRMSNorm and not (module._forward_hooks or module._forward_pre_hooks):
        return None  # a rotated model's final norm: the library takes its matrix
    if not type(module).__name__.endswith("RMSNorm") or getattr(module, "weight", None) is None:
        return f"{name} is a {type(module).__name__}, not an RMSNorm with a weight"
    if not hasattr(module, "variance_epsilon") or module._forward_hooks or module._forward_pre_hooks:
        return f"{name} is not a plain Llama RMSNorm (x * rsqrt(mean(x^2) + eps) * weight)"
    return None


def model_reason(model, *, max_length: int | None = None) -> str | None:
    """Why ``model``'s layout or layers keep it off the fused path (``None``: they don't) for sequences of up to
    ``max_length`` tokens (where known)."""
    import torch

    reason = lean_reason(model, max_length=max_length)
    if reason is not None:
        return reason
    config = model.config  # the family was checked by the lean loop's reason above
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    body = model.model
    embed = body.embed_tokens
    weight = getattr(embed, "weight", None)
    if not (hasattr(embed, "weight_int8") or (weight is not None and weight.dtype == torch.float32)):
        return "the embeddings are not float32 or int8 (the fused path keeps hidden states in float32)"
    for name, norm in [("model.norm", body.norm)] + [
        (f"model.layers.{i}.{part}", getattr(layer, part))
        for i, layer in enumerate(body.layers) for part in ("input_layernorm", "post_attention_layernorm")
    ]:
        reason = _norm_reason(name, norm)
        if reason is not None:
            return reason
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        gated = ("gate_proj", "up_proj", "down_proj"), ("gate_up_proj", "down_proj")
        if mlp._forward_hooks or mlp._forward_pre_hooks or not any(all(hasattr(mlp, p) for p in g) for g in gated):
            return f"model.layers.{i}.mlp is not a gated MLP (gate/up/down, or gate_up/down) without hooks"
        for norm_name in ("q_norm", "k_norm"):
            norm = getattr(attn, norm_name, None)
            if norm is not None:
                reason = _norm_reason(f"model.layers.{i}.self_attn.{norm_name}", norm)
                if reason is None and float(norm.variance_epsilon) != float(body.norm.variance_epsilon):
                    reason = f"model.layers.{i}.self_attn.{norm_name} has another epsilon than the layer norms"
                if reason is not None:
                    return reason
        attention_parts = ("qkv_proj", "o_proj") if hasattr(attn, "qkv_proj") else ("q_proj", "k_proj", "v_proj", "o_proj")
        mlp_parts = ("gate_up_proj", "down_proj") if hasattr(mlp, "gate_up_proj") else ("gate_proj", "up_proj", "down_proj")
        parts = [(f"self_attn.{p}", getattr(attn, p)) for p in attention_parts]
        parts += [(f"mlp.{p}", getattr(mlp, p)) for p in mlp_parts]
        blocks = [size for sizes in _fused_blocks(layer, model.config) if sizes for size in sizes]
        if any(size % _WIDTH_MULTIPLE for size in blocks):
            return f"model.layers.{i}'s fused projections split into widths {blocks}; the fused path needs multiples of 8"
        for part, module in parts:
            reason = _int8_linear_reason(f"model.layers.{i}.{part}", module)
            if reason is not None:
                return reason
            if part.startswith(("self_attn.o_", "mlp.")) and module.bias is not None:
                return f"model.layers.{i}.{part} has a bias, which Llama's layout has not"
            if part != "mlp.down_proj" and module.input_rotation_block:
                return f"model.layers.{i}.{part} rotates its input, which the fused path does only for down_proj"
    head = model.lm_head
    if not isinstance(head, torch.nn.Linear):
        reason = _int8_linear_reason("lm_head", head)
        if reason is not None:
            return reason
    if getattr(head, "input_rotation_block", 0):
        return "lm_head rotates its input, which the fused path does only for down_proj"
    if next(iter(model.buffers()), torch.empty(0)).device.type != "cpu":
        return "the model is not on the CPU"
    return None


def _rows(module, sizes: list[int]) -> list[tuple]:
    """``(int8 weight, scale, bias)`` of consecutive row blocks of one int8 projection: views, no copies.

    A fused projection (Phi-3's ``qkv_proj``, ``gate_up_proj``) applies its
    rows to one quantized input, so each block computes exactly what a
    separate projection of those rows would.
    """
    blocks, start = [], 0
    for size in sizes:
        bias = None if module.bias is None else module.bias.narrow(0, start, size)
        blocks.append((module.weight_int8.narrow(0, start, size), module.weight_scale.narrow(0, start, size), bias))
        start += size
    return blocks


def _fused_blocks(layer, config) -> tuple[list[int] | None, list[int] | None]:
    """The row blocks of a layer's fused projections: q, k and v of ``qkv_proj``; gate and up of
    ``gate_up_proj`` (gate rows first, as the model's ``chunk(2)`` takes them); ``None`` where not fused."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = gate_up = None
    if hasattr(attn, "qkv_proj"):
        kv_rows = config.num_key_value_heads * attn.head_dim
        qkv = [config.num_attention_heads * attn.head_dim, kv_rows, kv_rows]
    if hasattr(mlp, "gate_up_proj"):
        half = mlp.gate_up_proj.out_features // 2
        gate_up = [mlp.gate_up_proj.out_features - half, half]
    return qkv, gate_up


def _projections(layer, config) -> list[tuple]:
    """``(int8 weight, scale, bias)`` of q, k, v, o, gate, up and down, fused projections split into their rows."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv_blocks, gate_up_blocks = _fused_blocks(layer, config)
    if qkv_blocks:
        q, k, v = _rows(attn.qkv_proj, qkv_blocks)
    else:
        q, k, v = ((p.weight_int8, p.weight_scale, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    if gate_up_blocks:
        gate, up = _rows(mlp.gate_up_proj, gate_up_blocks)
    else:
        gate, up = ((p.weight_int8, p.weight_scale, None) for p in (mlp.gate_proj, mlp.up_proj))
    o, down = ((p.weight_int8, p.weight_scale, None) for p in (attn.o_proj, mlp.down_proj))
    return [q, k, v, o, gate, up, down]


def unsupported_reason(model, *, max_length: int | None = None) -> str | None:
    """Why the fused path cannot run ``model`` here (``None`` when it can): the model, then the machine.

    Where both allow it, the library is built (or loaded from the cache) here,
    so that a failed build is known before anything decodes.
    """
    reason = model_reason(model, max_length=max_length) or build.unavailable_reason()
    if reason is None and build.load_library() is None:
        reason = build.unavailable_reason()
    return reason


class FusedDecoder:
    """:class:`ftq_core.generation.LeanDecoder`'s interface over the fused native library.

    Check :func:`unsupported_reason` first; building needs the library
    (:func:`ftq_plugins.fused.build.load_library`), compiled once per machine.
    """

    def __init__(self, model, *, max_length: int, batch_size: int = 1):
        import torch

        from ftq_core.attention import attention_dtype
        from ftq_core.errors import UsageError

        reason = unsupported_reason(model, max_length=max_length)
        library = build.load_library() if reason is None else None
        if library is None:
            reason = reason or build.unavailable_reason()
            raise UsageError(f"the fused int8 decoder cannot run this model: {reason}. Use the lean loop (--no-compile).")
        body, config = model.model, model.config
        layers, biases, qk_norms = [], [], []
        for layer in body.layers[: config.num_hidden_layers]:
            attn = layer.self_attn
            tensors = [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
            projections = _projections(layer, config)
            for weight, scale, _ in projections:
                tensors += [weight, scale]
            layers.append(tensors)
            biases += [bias for _, _, bias in projections[:3]]
            qk_norms += [getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)]
        qk_norms = [None if norm is None else norm.weight.detach() for norm in qk_norms]
        head = model.lm_head
        self._float_head = None if hasattr(head, "weight_int8") else head
        first = body.layers[0].self_attn
        final_matrix = getattr(body.norm, "matrix", None)  # RotatedRMSNorm: unit weight, then the matrix
        final_weight = torch.ones(config.hidden_size) if final_matrix is not None else body.norm.weight.detach()
        cos, sin = rope_tables(model, max_length, dtype=torch.float32, device=torch.device("cpu"))
        self.model = model
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        self.embed = body.embed_tokens
        self._engine = library.FusedLlama(
            layers, biases, final_weight,
            None if self._float_head is not None else head.weight_int8,
            None if self._float_head is not None else head.weight_scale,
            cos[:, 0], sin[:, 0], config.num_attention_heads, config.num_key_value_heads, first.head_dim,
            float(body.norm.variance_epsilon), float(first.scaling), attention_dtype(model) == torch.bfloat16,
            self.batch_size, self.max_length,
            [layer.mlp.down_proj.input_rotation_block for layer in body.layers[: config.num_hidden_layers]],
            final_matrix, qk_norms,
        )
        #: The instruction set of the int8 GEMM (``avx512-vnni`` or ``generic``).
        self.isa = self._engine.isa

    @property
    def position(self) -> int:
        return self._engine.position

    def set_profiling(self, on: bool = True) -> None:
        """Turn the stage clock on (zeroed) or off: wall time per stage of every step run meanwhile."""
        self._engine.set_profiling(bool(on))

    def stage_seconds(self) -> dict[str, float]:
        """Wall seconds per stage (norms, each projection group, rope, attention, ...) since
        :meth:`set_profiling`; with several threads a stage lasts until its slowest thread is done."""
        return dict(self._engine.stage_seconds())

    def _forward(self, ids):
        batch, tokens = ids.shape
        if batch != self.batch_size:
            raise ValueError(f"FusedDecoder got a batch of {batch}, built for {self.batch_size}")
        hidden = self.embed(ids).reshape(batch * tokens, -1)
        out = self._engine.forward(hidden, tokens)
        if self._float_head is not None:
            out = self._float_head(out)
        return out.float()

    def prefill(self, input_ids):
        """Start over with the prompt ``input_ids [batch, tokens]``; logits of its last position."""
        self._engine.reset()
        return self._forward(input_ids)

    def step(self, token_ids):
        """Append one token per sequence (``[batch]`` or ``[batch, 1]``); logits of the new position."""
        return self._forward(token_ids.reshape(self.batch_size, 1))
