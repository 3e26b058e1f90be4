"""The ``gguf`` exporter: an artifact as one GGUF file for llama.cpp and the runtimes built on it (Ollama, LM Studio).

Llama-family models only (``general.architecture = llama``, what llama.cpp's
own converter writes for Llama, Mistral and SmolLM).  The weights are the
float weights the artifact's layers apply (:mod:`.float_modules`), stored as
``f32``, ``f16`` or ``q8_0`` (llama.cpp's 8-bit blocks: 32 weights, one f16
scale), norms always ``f32``; q/k projections are permuted into llama.cpp's
rotary layout as its converter does.  The tokenizer goes in as a GPT-2 style
BPE vocabulary (tokens, types, merges, special ids) with its chat template.
Written with the ``gguf`` package, then read back with transformers
(``from_pretrained(..., gguf_file=)``): the logits of the read-back model
must be within the format's rounding of the float weights', and its
tokenizer must encode like the artifact's.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from pathlib import Path

from ftq_core.api import ArtifactError, check, hookimpl

__all__ = ["GGUFType", "GGUFExportConfig", "GGUFExporter"]


class GGUFType(enum.Enum):
    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"


#: Largest relative L2 error of the read-back logits against the float weights' per storage type.
READ_BACK_TOLERANCE = {GGUFType.F32: 1e-5, GGUFType.F16: 5e-3, GGUFType.Q8_0: 5e-2}

#: A sentence the read-back tokenizer must encode exactly as the artifact's.
PROBE_TEXT = "ftq exports int8 models: 42 layers, café, naïve tokens and <|im_start|>user\n"


@dataclass(frozen=True, kw_only=True)
class GGUFExportConfig:
    """Options of the ``gguf`` exporter."""

    type: GGUFType = field(
        default=GGUFType.Q8_0,
        metadata={"help": "weight storage: q8_0 (8-bit blocks, ~27% of f32), f16 or f32; norms stay f32"},
    )
    verify: bool = field(default=True, metadata={"help": "read the file back with transformers and compare logits"})

    def __post_init__(self) -> None:
        check([(isinstance(self.type, GGUFType), f"type must be q8_0, f16 or f32, got {self.type!r}")])


class GGUFExporter:
    """See the module docstring."""

    def __init__(self, config: GGUFExportConfig):
        self.config = config

    def export(self, artifact, output_dir) -> str:
        from .float_modules import to_float_model

        model, tokenizer = artifact.model, artifact.tokenizer
        if getattr(model.config, "model_type", None) not in ("llama", "mistral"):
            raise ArtifactError(
                f"the gguf exporter writes Llama-family models, and this artifact is a "
                f"{getattr(model.config, 'model_type', type(model).__name__)!r} model; export it with --format hf"
            )
        if tokenizer is None:
            raise ArtifactError("the artifact holds no tokenizer, and a GGUF file needs one; export it with --format hf")
        replaced = to_float_model(model)
        model.float().eval()
        path = Path(output_dir) / f"model-{self.config.type.value}.gguf"
        _write(model, tokenizer, path, self.config.type, _source_pre_tokenizer(artifact.manifest))
        if not self.config.verify:
            return f"{path.name}: llama GGUF with {self.config.type.value} weights ({replaced} quantized layers as float)"
        error = _read_back_error(model, tokenizer, path)
        if error > READ_BACK_TOLERANCE[self.config.type]:
            raise ArtifactError(
                f"the GGUF file read back with logits {error:.2%} (relative L2) away from the float weights', more than "
                f"{self.config.type.value} rounding allows; the export was not kept"
            )
        return (
            f"{path.name}: llama GGUF with {self.config.type.value} weights ({replaced} quantized layers as float); "
            f"read back by transformers: logits within {error:.3%} (relative L2) of the float weights', tokenizer identical"
        )


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _source_pre_tokenizer(manifest: dict) -> str:
    """The pre-tokenizer name llama.cpp knows the vocabulary by: the source GGUF's when there is one, else GPT-2's.

    llama.cpp picks its text-splitting rules by this name (and refuses names
    it does not know); the model's source GGUF file, recorded in the manifest
    as ``... gguf:PATH ...``, has the right one.
    """
    import re

    from ftq_core.api import FtqError
    from ftq_core.gguf_header import read_gguf_header

    match = re.search(r"gguf:(.+?\.gguf)", str(manifest.get("source_model", "")))
    if match:
        try:
            # the bounded header walk, not gguf's reader: the manifest may name any file, damaged or hostile
            pre = read_gguf_header(match.group(1)).values.get("tokenizer.ggml.pre")
            if isinstance(pre, str):
                return pre
        except FtqError:
            pass  # the source moved or is damaged: GPT-2's rules are the generic byte-level BPE ones
    return "gpt-2"


def _permute_for_rope(weight, n_head: int):
    """HF's q/k rows (halves of each head's rotary pairs) in llama.cpp's interleaved order (its converter's permute)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write(model, tokenizer, path: Path, storage: GGUFType, pre_tokenizer: str) -> None:
    import gguf
    import numpy as np

    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    _refuse_what_llama_gguf_cannot_say(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(str(getattr(config, "_name_or_path", "") or "ftq export"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type({GGUFType.F32: 0, GGUFType.F16: 1, GGUFType.Q8_0: 7}[storage])
    if storage is GGUFType.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter records for quantized files
    _add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)  # False once a separately rounded lm_head was kept apart
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the output projection from token_embd when there is none
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ArtifactError(f"tensor {hf_name!r} has no llama GGUF name; export this model with --format hf")
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute_for_rope(data, heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute_for_rope(data, kv_heads)
        if data.ndim == 1 or storage is GGUFType.F32:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        elif storage is GGUFType.F16 or data.shape[-1] % 32:  # q8_0 blocks are 32 wide; llama.cpp's converter falls back too
            writer.add_tensor(name, data.astype(np.float16))
        else:
            blocks = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _refuse_what_llama_gguf_cannot_say(config) -> None:
    """Settings this exporter does not write (a file without them would load and compute something else)."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ArtifactError(f"the model scales its rotary embedding ({rope_type!r}), which the gguf exporter does not "
                            f"write; export it with --format hf")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ArtifactError("the model has attention or MLP biases, which the gguf exporter does not write; "
                            "export it with --format hf")


def _byte_level(tokenizer_json: dict) -> bool:
    """Whether the tokenizer splits text GPT-2 style (byte-level BPE), the vocabulary type written here."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps if step)


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre_tokenizer: str) -> None:
    """The tokenizer as llama.cpp's GPT-2 style BPE vocabulary: tokens in id order, types, merges, ids, template."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or not _byte_level(spec):
        raise ArtifactError(
            "the tokenizer is not a byte-level BPE (a SentencePiece-style vocabulary, as Llama 2 and Mistral have), "
            "and the gguf exporter writes byte-level vocabularies only; export it with --format hf"
        )
    special = set(tokenizer.all_special_ids)
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if not token.special}
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
        if token is None:  # ids the embedding has and the tokenizer does not use
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(token)
        if token_id in special:
            types.append(gguf.TokenType.CONTROL)
        elif token_id in added:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    # whether encoding starts with BOS, as the tokenizer does it (an attribute or its post-processor)
    bos = getattr(tokenizer, "bos_token_id", None)
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _read_back_error(model, tokenizer, path: Path) -> float:
    """Relative L2 error of the file's logits (as transformers reads it) against ``model``'s; refuses a tokenizer
    that encodes differently."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftq_core.library_noise import quiet_gguf_conversion

    with quiet_gguf_conversion():
        reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                        trust_remote_code=False)
        read_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    ids = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    for special_tokens in (False, True):
        if read_tokenizer(PROBE_TEXT, add_special_tokens=special_tokens)["input_ids"] != tokenizer(
                PROBE_TEXT, add_special_tokens=special_tokens)["input_ids"]:
            raise ArtifactError("the GGUF file's tokenizer reads back encoding text differently; the export was not kept")
    probe = torch.tensor([ids]) % model.config.vocab_size
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        got = reloaded(input_ids=probe).logits
    return float((got - expected).norm() / expected.norm())


@hookimpl
def register_exporters(register):
    register("gguf", GGUFExporter, GGUFExportConfig,
             description="one GGUF file (q8_0, f16 or f32) for llama.cpp, tokenizer and chat template included; "
                         "verified by reading it back")
