"""How a model family is written as GGUF: llama.cpp's architecture, its metadata keys and the tensors' changes.

What llama.cpp's own ``convert_hf_to_gguf.py`` writes for each architecture,
for the families whose entry in :mod:`ftq_core.model_families` names a
``gguf_arch``: the hyperparameters under ``<arch>.*``, tensor names from the
``gguf`` package's map for the architecture, q/k rows permuted into the
interleaved rotary order where llama.cpp's rope for the architecture wants
it (Llama, Mistral), and Gemma's norm offset added to its norm weights.
Settings the file cannot say, and a llama.cpp would silently compute
otherwise, are refused before anything is written; the one exception is a
sliding window on an architecture llama.cpp runs without one (Llama for
Mistral, Qwen2, Phi-3), which its own converter drops too: the export says
so (:func:`dropped_window`).
"""

from __future__ import annotations

from ftq_core.api import ArtifactError
from ftq_core.model_families import Family, family_of

__all__ = ["exportable_family", "add_hyperparameters", "gguf_tensor_name_map", "to_gguf_layout", "dropped_window"]


def _rope_parameters(config, attention: str = "full_attention") -> dict:
    """The rope settings of one attention type where the config keeps them per type (Gemma 3), else the only ones."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_type = parameters.get(attention)
    return per_type if isinstance(per_type, dict) else parameters


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
    if family.gguf_arch.startswith("gemma") and scalar is not None:
        used, by = _llama_cpp_gemma_attention_scalar(config, family)
        if scalar != used:
            raise ArtifactError(f"the model scales attention by query_pre_attn_scalar = {scalar}, and llama.cpp scales "
                                f"this Gemma's attention by {by} = {used}; export it with --format hf")
    return family


#: Layer counts llama.cpp takes for the 27B Gemma, whose attention it scales by hidden_size / heads.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}


def _llama_cpp_gemma_attention_scalar(config, family: Family) -> tuple[int, str]:
    """``(the scalar llama.cpp divides Gemma's queries by the root of, what it is)``, as its model code decides."""
    if config.num_hidden_layers == _GEMMA_27B_LAYERS.get(family.gguf_arch):
        return config.hidden_size // config.num_attention_heads, "hidden_size / heads (its 27B layout)"
    return _head_dim(config), "head_dim"


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


#: Architectures llama.cpp runs without a sliding window (it ignores or turns off the model's).
_NO_WINDOW_ARCHS = ("llama", "qwen2", "phi3")


def dropped_window(config, family: Family) -> int | None:
    """The model's sliding window where the family's llama.cpp architecture runs without one, else ``None``."""
    window = getattr(config, "sliding_window", None)
    if family.gguf_arch in _NO_WINDOW_ARCHS and window and getattr(config, "use_sliding_window", True):
        return int(window)
    return None
