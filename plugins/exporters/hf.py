"""The ``hf`` exporter: an artifact as a float Hugging Face directory (``save_pretrained`` layout).

For runtimes that read Hugging Face checkpoints (transformers, vLLM, TGI):
every quantized layer is written as the float weights it applies (its int8
values times their scales, SmoothQuant's scaling folded back,
:mod:`.float_modules`), ftq's own attention setting is dropped, tied weights
stay tied, and the tokenizer (chat template included) is saved beside it.
The directory is read back with ``AutoModelForCausalLM.from_pretrained``
before it is handed over, and every tensor must come back bit for bit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ftq_core.api import ArtifactError, check, hookimpl

__all__ = ["ExportDType", "HFExportConfig", "HFExporter"]


class ExportDType(enum.Enum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


@dataclass(frozen=True, kw_only=True)
class HFExportConfig:
    """Options of the ``hf`` exporter."""

    dtype: ExportDType = field(
        default=ExportDType.FLOAT32,
        metadata={"help": "weight dtype of the export: float32 (exact int8 x scale values) or bfloat16 (half the size)"},
    )
    verify: bool = field(default=True, metadata={"help": "read the export back and compare every tensor (seconds)"})

    def __post_init__(self) -> None:
        check([(isinstance(self.dtype, ExportDType), f"dtype must be float32 or bfloat16, got {self.dtype!r}")])


class HFExporter:
    """See the module docstring."""

    def __init__(self, config: HFExportConfig):
        self.config = config

    def export(self, artifact, output_dir) -> str:
        import torch

        from .float_modules import to_float_model

        model = artifact.model
        replaced = to_float_model(model)
        dtype = getattr(torch, self.config.dtype.value)
        model.to(dtype)
        model.config.dtype = dtype  # config.json records the dtype the weights are stored in
        model.save_pretrained(str(output_dir), safe_serialization=True)
        if artifact.tokenizer is not None:
            artifact.tokenizer.save_pretrained(str(output_dir))
        if self.config.verify:
            _verify(model, output_dir, dtype)
        checked = ", read back bit for bit" if self.config.verify else ""
        return (
            f"a {self.config.dtype.value} Hugging Face directory ({replaced} quantized layers written as float{checked}); "
            f"load it with AutoModelForCausalLM.from_pretrained"
        )


def _verify(model, output_dir, dtype) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(output_dir), dtype=dtype, trust_remote_code=False)
    written, read = model.state_dict(), reloaded.state_dict()
    differ = sorted(k for k in written if k not in read or not torch.equal(written[k], read[k]))
    if differ or set(read) - set(written):
        raise ArtifactError(
            f"the exported directory does not read back as written ({len(differ)} tensor(s) differ, e.g. "
            f"{differ[:3]}); the export was not kept"
        )


@hookimpl
def register_exporters(register):
    register("hf", HFExporter, HFExportConfig,
             description="a float Hugging Face directory (int8 layers dequantized), verified by reading it back")
