"""What ftq knows about each model family: one declared entry per family that every consumer reads.

The lean and fused decoders, the residual rotation, the chunked training loss
and the GGUF exporter each need to know whether a family's layout is theirs
to handle.  Each used to keep its own tuple of model types; now each reads
:func:`family_of` and the one field that answers its question, and says the
entry's reason when the answer is no.  A new family is one entry here plus
the tests of the family matrix (``tests/test_model_families.py``).

The fields describe the Hugging Face implementation of the family (the
``model_type`` in ``config.json``), checked against the model's own forward
by the tests, and llama.cpp's reading of it (``convert_hf_to_gguf.py``'s
class for that architecture).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "family_of", "model_types_where"]


@dataclass(frozen=True, kw_only=True)
class Family:
    """One model family as ftq's components see it.

    ``fused_decode``: the lean and fused decode loops implement the family's
    decoder layer: Llama's (pre-RMSNorm, rotary q/k from ``rotary_emb``,
    gated SiLU MLP, nothing after the head) with the variations they know:
    q/k/v biases (Qwen2), per-head q/k RMSNorms before rope (Qwen3), fused
    ``qkv_proj`` and ``gate_up_proj`` projections (Phi-3); ``rotatable``: a rotation of the residual stream
    folds into the layers exactly (pre-norms only, no norm of a layer's
    output); ``plain_head``: the causal-LM forward applies the output head and
    nothing else (no soft-capping), so training may run the head outside the
    model in chunks.  ``gguf_arch``: llama.cpp's architecture name
    (``None``: llama.cpp has none that ftq writes); ``gguf_interleaved_rope``:
    llama.cpp's "normal" rope for this architecture reads q/k rows with each
    head's rotary pairs interleaved, so the converter permutes them;
    ``norm_offset``: the family's RMSNorm multiplies by ``offset + w`` (Gemma),
    and llama.cpp stores the sum.  ``why_not``: the reason shown for each
    ``False`` (``"fused_decode"``, ``"rotatable"``, ``"gguf"``).
    """

    name: str
    model_types: tuple[str, ...]
    fused_decode: bool = False
    rotatable: bool = False
    plain_head: bool = True
    gguf_arch: str | None = None
    gguf_interleaved_rope: bool = False
    norm_offset: float = 0.0
    why_not: tuple[tuple[str, str], ...] = ()

    def reason(self, feature: str) -> str:
        """Why this family lacks ``feature`` (one of the keys of ``why_not``)."""
        return dict(self.why_not).get(feature, f"the {self.name} layout is not covered")


FAMILIES: tuple[Family, ...] = (
    Family(name="Llama", model_types=("llama",), fused_decode=True, rotatable=True,
           gguf_arch="llama", gguf_interleaved_rope=True),
    # llama.cpp's converter writes Mistral as "llama"; the sliding window is a config
    # setting the lean loop refuses per model (generation.unsupported_reason)
    Family(name="Mistral", model_types=("mistral",), fused_decode=True, rotatable=True,
           gguf_arch="llama", gguf_interleaved_rope=True),
    Family(name="Qwen2", model_types=("qwen2",), fused_decode=True, rotatable=True, gguf_arch="qwen2"),
    Family(name="Qwen3", model_types=("qwen3",), fused_decode=True, rotatable=True, gguf_arch="qwen3"),
    Family(name="Phi-3", model_types=("phi3",), fused_decode=True, gguf_arch="phi3",
           why_not=(("rotatable", "Phi-3's fused qkv_proj and gate_up_proj are not among the projections the rotation "
                                  "folds"),)),
    Family(name="Gemma 2", model_types=("gemma2",), plain_head=False, gguf_arch="gemma2", norm_offset=1.0,
           why_not=(("fused_decode", "Gemma 2 normalises each sub-layer's output too, scales the embeddings and "
                                    "soft-caps attention and logits"),
                    ("rotatable", "Gemma 2 normalises each sub-layer's output, and a norm's weights do not commute "
                                  "with a rotation of its input"))),
    Family(name="Gemma 3", model_types=("gemma3_text",), plain_head=False, gguf_arch="gemma3", norm_offset=1.0,
           why_not=(("fused_decode", "Gemma 3 normalises each sub-layer's output and q/k, scales the embeddings and "
                                    "alternates local and global attention"),
                    ("rotatable", "Gemma 3 normalises each sub-layer's output, and a norm's weights do not commute "
                                  "with a rotation of its input"))),
    Family(name="GPT-2", model_types=("gpt2",),
           why_not=(("fused_decode", "GPT-2 uses LayerNorm, learned positions and Conv1D projections"),
                    ("rotatable", "a LayerNorm with a mean and bias, as in GPT-2, does not commute with a rotation"),
                    ("gguf", "the gguf exporter writes Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 2/3 models; "
                             "GPT-2's fused Conv1D layout is not among them"))),
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


def family_of(config_or_model) -> Family | None:
    """The entry for a model or its config (``None`` for a model type no entry names)."""
    config = getattr(config_or_model, "config", config_or_model)
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None))


def model_types_where(feature: str) -> tuple[str, ...]:
    """Every model type whose entry has ``feature`` true (``"fused_decode"``, ``"rotatable"``, ``"plain_head"``)."""
    return tuple(t for family in FAMILIES if getattr(family, feature) for t in family.model_types)
