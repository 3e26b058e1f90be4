"""The ``gguf`` exporter: an artifact as one GGUF file for llama.cpp and the runtimes built on it (Ollama, LM Studio).

Every family llama.cpp reads and :mod:`ftq_core.model_families` gives a GGUF
architecture (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3), laid
out as llama.cpp's own converter writes it (:mod:`.gguf_layout`).  The
weights are the float weights the artifact's layers apply
(:mod:`.float_modules`), stored as ``f32``, ``f16`` or ``q8_0`` (llama.cpp's
8-bit blocks: 32 weights, one f16 scale), norms and biases always ``f32``.
The tokenizer goes in as a GPT-2 style BPE vocabulary with its chat template
(:mod:`.gguf_vocabulary`).

The file is streamed: tensor infos first, then one tensor at a time, each
dequantized from the artifact and rounded to its storage type on its own,
so memory holds the artifact and one float tensor (an 8B model exports in
about its artifact's memory, not the 32 GB of a float copy).  Then it is
read back (``read_back``):

* ``logits``: transformers loads the file (``from_pretrained(...,
  gguf_file=)``) and its logits must be within the storage type's rounding
  of the float weights' (this needs two float copies of the model);
* ``tensors``: every tensor is read back with the ``gguf`` package,
  dequantized and compared with what was meant to be written, one at a time;
* ``auto``: ``logits`` when two float copies fit in the available memory with
  room to spare, else ``tensors``.

Either way the file's tokenizer must encode as the artifact's does.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from ftq_core.api import ArtifactError, check, hookimpl

__all__ = ["GGUFType", "GGUFReadBack", "GGUFExportConfig", "GGUFExporter"]


class GGUFType(enum.Enum):
    F32 = "f32"
    F16 = "f16"
    Q8_0 = "q8_0"


class GGUFReadBack(enum.Enum):
    AUTO = "auto"
    LOGITS = "logits"
    TENSORS = "tensors"


#: Largest relative L2 error of the read-back logits against the float weights' per storage type.
READ_BACK_TOLERANCE = {GGUFType.F32: 1e-5, GGUFType.F16: 5e-3, GGUFType.Q8_0: 5e-2}

#: Largest relative L2 error of one read-back tensor against the values written, per storage type
#: (q8_0: 8-bit blocks of 32 with an f16 scale, about 0.5% on Gaussian weights; f16: 11-bit mantissas).
TENSOR_TOLERANCE = {GGUFType.F32: 0.0, GGUFType.F16: 1e-3, GGUFType.Q8_0: 2e-2}

#: ``auto`` reads logits back when two float32 copies of the model use at most this share of the available memory.
LOGITS_MEMORY_SHARE = 0.5

#: Rows quantized to q8_0 (and read back) at a time, so a [128k, 4096] embedding never needs its float32 copy twice.
Q8_0_ROWS_PER_CHUNK = 4096

#: A sentence the read-back tokenizer must encode exactly as the artifact's.
PROBE_TEXT = "ftq exports int8 models: 42 layers, café, naïve tokens and <|im_start|>user\n"

#: GGUF file types of the storage types (llama.cpp's ``llama_ftype``).
_FILE_TYPES = {GGUFType.F32: 0, GGUFType.F16: 1, GGUFType.Q8_0: 7}


@dataclass(frozen=True, kw_only=True)
class GGUFExportConfig:
    """Options of the ``gguf`` exporter."""

    type: GGUFType = field(
        default=GGUFType.Q8_0,
        metadata={"help": "weight storage: q8_0 (8-bit blocks, ~27% of f32), f16 or f32; norms and biases stay f32"},
    )
    verify: bool = field(default=True, metadata={"help": "read the file back and check it (see read_back)"})
    read_back: GGUFReadBack = field(
        default=GGUFReadBack.AUTO,
        metadata={"help": "how: logits (transformers loads the file; two float copies of the model), tensors "
                          "(each tensor against what was written, one at a time), or auto (logits when they fit)"},
    )

    def __post_init__(self) -> None:
        check([(isinstance(self.type, GGUFType), f"type must be q8_0, f16 or f32, got {self.type!r}"),
               (isinstance(self.read_back, GGUFReadBack), f"read_back must be auto, logits or tensors, got {self.read_back!r}")])


@dataclass(frozen=True)
class _Planned:
    """One tensor of the file: its GGUF and Hugging Face names, float shape and how it is stored."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    storage: GGUFType


class GGUFExporter:
    """See the module docstring."""

    def __init__(self, config: GGUFExportConfig):
        self.config = config

    def export(self, artifact, output_dir) -> str:
        from .gguf_layout import dropped_window, exportable_family
        from .gguf_vocabulary import pre_tokenizer_name

        model, tokenizer = artifact.model, artifact.tokenizer
        family = exportable_family(model.config)  # refusals before any work
        if tokenizer is None:
            raise ArtifactError("the artifact holds no tokenizer, and a GGUF file needs one; export it with --format hf")
        model.eval()
        storage = self.config.type
        path = Path(output_dir) / f"model-{storage.value}.gguf"
        pre_tokenizer = pre_tokenizer_name(tokenizer, artifact.manifest)  # refusals before any work
        tied = _tied_head(model, family)
        plan = _plan(model, family, storage, tied)
        _write(model, tokenizer, path, plan, family, storage, pre_tokenizer, tied)
        what = f"{path.name}: {family.gguf_arch} GGUF with {storage.value} weights"
        window = dropped_window(model.config, family)
        if window:
            what += (f" (llama.cpp runs {family.gguf_arch} without the model's {window}-token sliding window, as for "
                     f"its own conversion: contexts up to {window} tokens compute the same)")
        if not self.config.verify:
            return what
        import gguf

        reader = gguf.GGUFReader(str(path))  # its metadata and tensor table; tensor data is read one tensor at a time
        _check_tokenizer(tokenizer, reader, path, family, model.config.vocab_size)
        if self._read_back(plan) is GGUFReadBack.TENSORS:
            worst = _tensor_read_back_error(model, reader, path, plan, family, tied)
            return (f"{what}; read back tensor by tensor: each within {worst:.3%} (relative L2) of the values written, "
                    f"tokenizer identical")
        error = _logits_read_back_error(model, path, family)
        if error > READ_BACK_TOLERANCE[storage]:
            raise ArtifactError(
                f"the GGUF file read back with logits {error:.2%} (relative L2) away from the float weights', more than "
                f"{storage.value} rounding allows; the export was not kept")
        return (f"{what}; read back by transformers: logits within {error:.3%} (relative L2) of the float weights', "
                f"tokenizer identical")

    def _read_back(self, plan: list[_Planned]) -> GGUFReadBack:
        if self.config.read_back is not GGUFReadBack.AUTO:
            return self.config.read_back
        import math

        from ftq_core.memory_plan import available_bytes

        float_bytes = 4 * sum(math.prod(p.shape) for p in plan)
        fits = 2 * float_bytes <= LOGITS_MEMORY_SHARE * available_bytes()
        return GGUFReadBack.LOGITS if fits else GGUFReadBack.TENSORS


def _tied_head(model, family) -> bool:
    """Whether the file leaves the head out (tied to the embeddings); a head Gemma 2's file cannot hold is refused."""
    from .float_modules import head_is_embeddings

    tied = head_is_embeddings(model)
    if not tied and family.gguf_arch == "gemma2":
        raise ArtifactError("llama.cpp reads Gemma 2's output head from its embeddings, and this artifact rounded its "
                            "head on its own; quantize with the head tied to the embeddings, or export with --format hf")
    return tied


def _gguf_tensors(model, family, tied: bool, *, with_data: bool = True):
    """``(gguf_name, hf_name, float32 numpy tensor in the file's layout)`` for every tensor the file holds."""
    from .float_modules import float_tensors
    from .gguf_layout import gguf_tensor_name_map, to_gguf_layout

    config = model.config
    names = gguf_tensor_name_map(family, config.num_hidden_layers)
    # a tied head is not written: llama.cpp reads the output projection from token_embd when there is none
    for hf_name, tensor in float_tensors(model, shapes_only=not with_data, leave_out={"lm_head"} if tied else ()):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ArtifactError(f"tensor {hf_name!r} has no {family.gguf_arch} GGUF name; export this model with --format hf")
        data = tensor.detach().float().numpy() if with_data else tensor
        yield gguf_name, hf_name, to_gguf_layout(hf_name, data, config, family) if with_data else data


def _storage_of(shape: tuple[int, ...], storage: GGUFType) -> GGUFType:
    if len(shape) == 1 or storage is GGUFType.F32:
        return GGUFType.F32
    if storage is GGUFType.F16 or shape[-1] % 32:  # q8_0 blocks are 32 wide; llama.cpp's converter falls back too
        return GGUFType.F16
    return GGUFType.Q8_0


def _plan(model, family, storage: GGUFType, tied: bool) -> list[_Planned]:
    """Every tensor's name, shape and storage, before anything is written (a tensor with no name is refused here)."""
    return [_Planned(gguf_name, hf_name, tuple(tensor.shape), _storage_of(tuple(tensor.shape), storage))
            for gguf_name, hf_name, tensor in _gguf_tensors(model, family, tied, with_data=False)]


def _encoded(data, storage: GGUFType):
    """``data`` (float32, the file's layout) as the bytes-or-values array the file stores."""
    import gguf
    import numpy as np

    if storage is GGUFType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if storage is GGUFType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    rows = data.reshape(-1, data.shape[-1])
    out = np.empty((rows.shape[0], rows.shape[1] // 32 * 34), dtype=np.uint8)  # 32 int8 and one f16 scale a block
    for start in range(0, rows.shape[0], Q8_0_ROWS_PER_CHUNK):
        chunk = np.ascontiguousarray(rows[start:start + Q8_0_ROWS_PER_CHUNK], dtype=np.float32)
        out[start:start + len(chunk)] = gguf.quants.quantize(chunk, gguf.GGMLQuantizationType.Q8_0)
    return out.reshape(*data.shape[:-1], -1)


_RAW_TYPES = {GGUFType.F32: "F32", GGUFType.F16: "F16", GGUFType.Q8_0: "Q8_0"}


def _write(model, tokenizer, path: Path, plan: list[_Planned], family, storage: GGUFType, pre_tokenizer: str,
           tied: bool) -> None:
    import gguf
    import numpy as np
    from tqdm.auto import tqdm

    from .gguf_layout import add_hyperparameters
    from .gguf_vocabulary import add_tokenizer

    config = model.config
    writer = gguf.GGUFWriter(str(path), family.gguf_arch)
    # the model's name, as llama.cpp's converter writes it (the folder's name: never a local path)
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "ftq export")).name or "ftq export")
    add_hyperparameters(writer, config, family)
    writer.add_file_type(_FILE_TYPES[storage])
    if storage is GGUFType.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)  # as llama.cpp's converter records for quantized files
    add_tokenizer(writer, tokenizer, config.vocab_size, pre_tokenizer)
    for planned in plan:
        quant = getattr(gguf.GGMLQuantizationType, _RAW_TYPES[planned.storage])
        block, type_size = gguf.GGML_QUANT_SIZES[quant]
        elements = int(np.prod(planned.shape))
        writer.add_tensor_info(planned.gguf_name, planned.shape, np.dtype(np.float32), elements // block * type_size,
                               raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    tensors = _gguf_tensors(model, family, tied)
    with tqdm(total=len(plan), desc="write gguf", unit="tensor", disable=len(plan) < 64) as bar:
        for planned, (gguf_name, _, data) in zip(plan, tensors, strict=True):
            assert gguf_name == planned.gguf_name  # the same walk as the plan's
            writer.write_tensor_data(_encoded(data, planned.storage))
            bar.update(1)
    writer.close()


def _check_tokenizer(tokenizer, reader, path: Path, family, vocab_size: int) -> None:
    """Refuse a file whose vocabulary reads back other than the tokenizer's, or (Llama architecture) encodes the
    probe otherwise through transformers' GGUF tokenizer.

    transformers rebuilds other architectures' tokenizers with that family's
    own splitting rules (Qwen2's, Gemma's) whatever the file says, while
    llama.cpp follows the file's ``tokenizer.ggml.pre``: for those the
    vocabulary itself is compared, field by field.
    """
    from .gguf_vocabulary import check_vocabulary

    check_vocabulary(reader, tokenizer, vocab_size)
    if family.gguf_arch != "llama":
        return
    from transformers import AutoTokenizer

    from ftq_core.library_noise import quiet_gguf_conversion

    with quiet_gguf_conversion():
        read_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    for special_tokens in (False, True):
        if read_tokenizer(PROBE_TEXT, add_special_tokens=special_tokens)["input_ids"] != tokenizer(
                PROBE_TEXT, add_special_tokens=special_tokens)["input_ids"]:
            raise ArtifactError("the GGUF file's tokenizer reads back encoding text differently; the export was not kept")


def _tensor_read_back_error(model, reader, path: Path, plan: list[_Planned], family, tied: bool) -> float:
    """The largest relative L2 error of a tensor read back from the file against the values meant for it."""
    import numpy as np

    in_file = {tensor.name: tensor for tensor in reader.tensors}
    if sorted(in_file) != sorted(p.gguf_name for p in plan):
        raise ArtifactError("the GGUF file reads back with other tensors than were written; the export was not kept")
    worst = 0.0
    with open(path, "rb") as file:
        for planned, (gguf_name, _, expected) in zip(plan, _gguf_tensors(model, family, tied), strict=True):
            stored = in_file[gguf_name]
            # read, not the reader's memory map: mapped pages would count as this process's memory, the whole file
            file.seek(stored.data_offset)
            raw = np.fromfile(file, dtype=np.uint8, count=stored.n_bytes).view(stored.data.dtype)
            error = _read_back_error(raw.reshape(stored.data.shape), stored.tensor_type, expected)
            if error > TENSOR_TOLERANCE[planned.storage]:
                raise ArtifactError(f"tensor {gguf_name} reads back {error:.2%} (relative L2) away from the values "
                                    f"written, more than {planned.storage.value} rounding allows; the export was not kept")
            worst = max(worst, error)
    return worst


def _read_back_error(raw, tensor_type, expected) -> float:
    """Relative L2 error of a tensor's stored bytes, dequantized a block of rows at a time, against ``expected``."""
    import gguf
    import numpy as np

    rows = raw.reshape(-1, raw.shape[-1])
    wanted = expected.reshape(rows.shape[0], -1)
    error_sq = norm_sq = 0.0
    for start in range(0, rows.shape[0], Q8_0_ROWS_PER_CHUNK):
        got = gguf.quants.dequantize(rows[start:start + Q8_0_ROWS_PER_CHUNK], tensor_type)
        block = wanted[start:start + Q8_0_ROWS_PER_CHUNK]
        error_sq += float(np.square(got.astype(np.float64) - block).sum())
        norm_sq += float(np.square(block, dtype=np.float64).sum())
    return (error_sq / norm_sq) ** 0.5 if norm_sq else error_sq ** 0.5


#: Settings transformers' GGUF reader does not take from the file (it uses its defaults); the read-back gets the
#: artifact's own.  llama.cpp reads the soft-capping values from the file and scales Gemma's attention by head_dim.
_UNREAD_BY_TRANSFORMERS = {
    "qwen3": ("head_dim",),  # llama.cpp reads attention.key_length
    "gemma2": ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"),
    "gemma3": ("query_pre_attn_scalar", "final_logit_softcapping"),
}


def _logits_read_back_error(model, path: Path, family) -> float:
    """Relative L2 error of the file's logits (as transformers reads it) against the float weights'."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftq_core.library_noise import quiet_gguf_conversion

    from .float_modules import to_float_model

    to_float_model(model)
    model.float()
    overrides = {key: getattr(model.config, key) for key in _UNREAD_BY_TRANSFORMERS.get(family.gguf_arch, ())
                 if hasattr(model.config, key)}
    with quiet_gguf_conversion():
        reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                        trust_remote_code=False, **overrides)
    probe = torch.arange(48)[None] * 7 % model.config.vocab_size
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        got = reloaded(input_ids=probe).logits
    return float((got - expected).norm() / expected.norm())


@hookimpl
def register_exporters(register):
    register("gguf", GGUFExporter, GGUFExportConfig,
             description="one GGUF file (q8_0, f16 or f32) for llama.cpp: Llama, Mistral, Qwen2/3, Phi-3, Gemma 2/3; "
                         "tokenizer and chat template included; verified by reading it back")
