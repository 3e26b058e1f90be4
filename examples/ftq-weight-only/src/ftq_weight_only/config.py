"""Options of the ``int8-weight-only`` quantizer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ftq_core.api import check

__all__ = ["ComputeDType", "Int8WeightOnlyConfig"]


class ComputeDType(enum.Enum):
    """The activation dtype inside each quantized matmul."""

    #: fused int8 kernel for decoding; bfloat16 GEMM for long inputs (fast)
    BFLOAT16 = "bfloat16"
    #: float32 activations everywhere: exact activations, memory savings only
    FLOAT32 = "float32"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.value)


@dataclass(frozen=True, kw_only=True)
class Int8WeightOnlyConfig:
    """int8 weights (one scale per output channel), float activations."""

    compute_dtype: ComputeDType = field(
        default=ComputeDType.BFLOAT16,
        metadata={"help": "bfloat16: fused int8 kernel when decoding (fast); float32: exact activations, no kernel"},
    )
    kernel_max_tokens: int = field(
        default=16,
        metadata={"help": "inputs with at most this many tokens use the fused kernel; longer ones a dequantized GEMM"},
    )
    keep_float: tuple[str, ...] = field(
        default=(), metadata={"help": "glob patterns of layer names kept in float, e.g. lm_head,*.down_proj"}
    )
    skip_tied: bool = field(
        default=True,
        metadata={"help": "keep layers whose weight is shared with another module (tied embeddings) in float"},
    )

    def __post_init__(self) -> None:
        check(
            [
                (isinstance(self.compute_dtype, ComputeDType), f"compute_dtype must be one of "
                 f"{', '.join(repr(d.value) for d in ComputeDType)}, got {self.compute_dtype!r}"),
                (isinstance(self.kernel_max_tokens, int) and self.kernel_max_tokens >= 0,
                 f"kernel_max_tokens must be an integer >= 0 (0 turns the fused kernel off), got {self.kernel_max_tokens!r}"),
                (all(isinstance(p, str) and p for p in self.keep_float), "keep_float entries must be non-empty strings"),
            ],
            where="int8-weight-only options",
        )

    @property
    def scheme(self) -> str:
        return f"int8 per-channel weight, {self.compute_dtype.value} activation"
