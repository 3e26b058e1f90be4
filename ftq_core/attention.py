"""Attention in bfloat16 for float32 models: a recorded choice of the model.

ftq's int8 models keep their non-linear parts (norms, rotary, attention) in
float32.  Attention there is ``scaled_dot_product_attention`` over float32
queries, keys and values; on CPUs with native bf16 arithmetic (AVX512-BF16,
AMX) the same call over bf16 tensors takes about half the time (SmolLM2-135M,
1x256 prompt: ~1.2 ms → ~0.5 ms per layer at 2 threads), and rounding q/k/v to
bf16 moves held-out perplexity by about 0.1% (see benchmarks/RESULTS.md).

The choice lives on the model's config as ``ftq_attention_dtype``
(``"bfloat16"``, or absent for the model's own dtype), so it is saved in the
artifact's ``config.json`` and a reload behaves the same
(:func:`restore_attention_dtype`).  Two paths honour it:

* Hugging Face's forward: the model's attention implementation becomes
  :data:`BF16_SDPA`, registered with transformers' ``AttentionInterface``
  (and its mask interface, so padding masks are built exactly as for
  ``sdpa``): q/k/v are cast to bf16, SDPA runs, the output comes back in the
  query's dtype;
* ftq's lean decode loop (:mod:`ftq_core.generation`), which keeps its KV
  cache in bf16 and casts the queries (:func:`attention_dtype`).
"""

from __future__ import annotations

from typing import Any

from .errors import UsageError

__all__ = [
    "BF16_SDPA",
    "CONFIG_KEY",
    "attention_dtype",
    "bf16_sdpa_attention",
    "set_attention_dtype",
    "restore_attention_dtype",
]

#: Name of the bf16 attention in transformers' attention registry.
BF16_SDPA = "ftq_sdpa_bf16"

#: Config attribute recording the attention dtype (saved in ``config.json``).
CONFIG_KEY = "ftq_attention_dtype"

#: Attention dtypes a model can record; ``None`` (nothing recorded) is the model's own.
_DTYPES = ("bfloat16",)


def bf16_sdpa_attention(module, query, key, value, attention_mask, **kwargs) -> tuple[Any, None]:
    """transformers' ``sdpa`` attention over bf16 copies of q/k/v; the output in the query's dtype.

    The signature is that of transformers' attention functions
    (``AttentionInterface``).  A floating-point additive mask is cast too
    (SDPA wants it in the query's dtype); boolean masks stay as they are.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(torch.bfloat16)
    out, weights = sdpa_attention_forward(
        module, query.to(torch.bfloat16), key.to(torch.bfloat16), value.to(torch.bfloat16), attention_mask, **kwargs
    )
    return out.to(dtype), weights


def _register() -> None:
    """Make :data:`BF16_SDPA` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if BF16_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(BF16_SDPA, bf16_sdpa_attention)
        AttentionMaskInterface.register(BF16_SDPA, sdpa_mask)


def attention_dtype(model):
    """The torch dtype ``model`` runs attention in, if recorded (else ``None``: its own dtype)."""
    import torch

    recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return torch.bfloat16 if recorded == "bfloat16" else None


def _implementation(model) -> str | None:
    return getattr(model.config, "_attn_implementation", None)


def set_attention_dtype(model, dtype: str | None) -> None:
    """Run ``model``'s attention in ``dtype`` (``"bfloat16"``), or in its own dtype again (``None``).

    Needs a model on transformers' ``sdpa`` attention (the CPU default), since
    the bf16 path is that same function on bf16 inputs; other implementations
    (``eager``, flash kernels) are refused with the fix.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise UsageError(f"unknown attention dtype {dtype!r}; choose one of {', '.join(_DTYPES)} (or None)")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        if dtype is None:
            return  # nothing was ever changed
        raise UsageError(f"{type(model).__name__} is not a Hugging Face model; its attention dtype cannot be set")
    current = _implementation(model)
    if dtype is None:
        if current == BF16_SDPA:
            model.set_attn_implementation("sdpa")
        if hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)
        return
    if current not in ("sdpa", BF16_SDPA):
        raise UsageError(
            f"bf16 attention runs transformers' 'sdpa' attention, and this model uses {current!r}; load it with "
            f"attn_implementation='sdpa', or keep attention in the model's dtype"
        )
    _register()
    model.set_attn_implementation(BF16_SDPA)
    setattr(config, CONFIG_KEY, dtype)


def restore_attention_dtype(model) -> None:
    """Apply the attention dtype recorded on ``model.config`` (after loading a saved model)."""
    recorded = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if recorded is None:
        return
    if recorded not in _DTYPES:
        from .errors import ArtifactError

        raise ArtifactError(
            f"the model's config records attention dtype {recorded!r}, which this ftq does not know "
            f"(known: {', '.join(_DTYPES)}); upgrade ftq, or remove {CONFIG_KEY} from config.json"
        )
    set_attention_dtype(model, recorded)
