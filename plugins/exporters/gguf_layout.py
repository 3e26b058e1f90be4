"""How a model family is written as GGUF: llama.cpp's architecture, its metadata keys and the tensors' changes.

What llama.cpp's own ``convert_hf_to_gguf.py`` writes for each architecture,
for the families whose entry in :mod:`ftq_core.model_families` names a
``gguf_arch``: the hyperparameters under ``<arch>.*``, tensor names from the
``gguf`` package's map for the architecture, q/k rows permuted into the
interleaved rotary order where llama.cpp's rope for the architecture wants
it (Llama, Mistral), and Gemma's norm offset added to its norm weights.
Settings the file cannot say, and a llama.cpp would silently compute
otherwise, are refused before anything is written.
"""

from __future__ import annotations

from ftq_core.api import ArtifactError
from ftq_core.model_families import Family, family_of

__all__ = ["exportable_family", "add_hyperparameters", "gguf_tensor_name_map", "to_gguf_layout", "from_gguf_layout"]


def _rope_parameters(config, attention: str = "full_attention") -> dict:
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return parameters.get(attention, parameters) if isinstance(parameters.get(attention), dict) else parameters


def _rope_theta(config, attention: str = "full_attention") -> float:
    return float(_rope_parameters(config, attention).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def exportable_family(config) -> Family:
    """The family entry of ``config``, or an :class:`ArtifactError` saying why a GGUF file cannot carry it."""
    family = family_of(config)
    if family is None or family.gguf_arch is None:
        reason = family.reason("gguf") if family else (
            f"the gguf exporter writes Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 2/3 models, and this artifact is "
            f"a {getattr(config, 'model_type', None)!r} model")
        raise ArtifactError(f"{reason}; export it with --format hf")
    for attention in ("full_attention", "sliding_attention"):
        parameters = _rope_parameters(config, attention)
        rope_type = parameters.get("rope_type", parameters.get("type", "default"))
        if rope_type not in (None, "default"):
            raise ArtifactError(f"the model scales its rotary embedding ({rope_type!r}), which the gguf exporter does "
                                f"not write; export it with --format hf")
    if family.gguf_arch == "llama" and (getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)):
        raise ArtifactError("the model has attention or MLP biases, which the gguf exporter does not write for Llama; "
                            "export it with --format hf")
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if family.gguf_arch.startswith("gemma") and scalar is not None and scalar != _head_dim(config):
        raise ArtifactError(f"the model scales attention by query_pre_attn_scalar = {scalar}, and llama.cpp scales "
                            f"Gemma's attention by head_dim = {_head_dim(config)}; export it with --format hf")
    return family


def add_hyperparameters(writer, config, family: Family) -> None:
    """The ``<arch>.*`` keys llama.cpp's converter writes for ``family``."""
    heads = config.num_attention_heads
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads or family.gguf_arch.startswith("gemma"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if family.gguf_arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    elif family.gguf_arch == "phi3":
        rotary = float(_rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
        writer.add_rope_dimension_count(int(rotary * config.hidden_size) // heads)
        writer.add_rope_scaling_orig_ctx_len(getattr(config, "original_max_position_embeddings", None)
                                             or config.max_position_embeddings)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
    elif family.gguf_arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    elif family.gguf_arch == "gemma3":
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
        writer.add_rope_freq_base_swa(_rope_theta(config, "sliding_attention"))


def gguf_tensor_name_map(family: Family, block_count: int):
    """The ``gguf`` package's Hugging Face → GGUF tensor-name map for the family's architecture."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == family.gguf_arch)
    return gguf.get_tensor_name_map(arch, block_count)


def _permute_for_rope(weight, n_head: int):
    """HF's q/k rows (halves of each head's rotary pairs) in llama.cpp's interleaved order (its converter's permute)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unpermute_for_rope(weight, n_head: int):
    """The inverse of :func:`_permute_for_rope`."""
    return weight.reshape(n_head, weight.shape[0] // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_heads(hf_name: str, config, family: Family) -> int | None:
    if not family.gguf_interleaved_rope:
        return None
    if hf_name.endswith("q_proj.weight"):
        return config.num_attention_heads
    if hf_name.endswith("k_proj.weight"):
        return config.num_key_value_heads
    return None


def to_gguf_layout(hf_name: str, data, config, family: Family):
    """A float32 numpy tensor of the Hugging Face model as the family's GGUF file holds it."""
    heads = _rope_heads(hf_name, config, family)
    if heads is not None:
        data = _permute_for_rope(data, heads)
    if family.norm_offset and hf_name.endswith("norm.weight"):
        data = data + family.norm_offset
    return data


def from_gguf_layout(hf_name: str, data, config, family: Family):
    """The inverse of :func:`to_gguf_layout`."""
    heads = _rope_heads(hf_name, config, family)
    if heads is not None:
        data = _unpermute_for_rope(data, heads)
    if family.norm_offset and hf_name.endswith("norm.weight"):
        data = data - family.norm_offset
    return data
