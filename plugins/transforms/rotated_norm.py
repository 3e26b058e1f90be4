"""The final RMSNorm of a rotated model whose head stays tied to its embeddings.

After the residual stream is rotated by ``Q`` (:mod:`.rotation`), the
embeddings hold ``E Q``.  A tied head reads the same matrix, so it computes
``y (E Q)^T = y Q^T E^T``; to give the original logits
``rmsnorm(h) diag(g) E^T`` its input must be
``y = rmsnorm(h) diag(g) Q = rmsnorm(h Q) Q^T diag(g) Q``.  The final norm's
weight ``g`` therefore cannot stay a per-channel scale: it becomes the dense,
symmetric ``M = Q^T diag(g) Q``, applied after a unit-weight RMSNorm.

``M`` is ``hidden × hidden`` (1.3 MB for SmolLM2's 576) and runs only where the
head does, against a second embedding-sized head matrix (28 MB of int8 for
SmolLM2) that untying would cost.  An export to a float format folds ``M``
into an untied head again (:func:`untie_final_matrix`), since transformers'
Llama has no such norm.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RotatedRMSNorm", "untie_final_matrix", "folded_head_weight"]


class RotatedRMSNorm(nn.Module):
    """``rmsnorm(x) @ matrix``: Llama's RMSNorm of unit weight, then a dense ``[hidden, hidden]`` matrix.

    The name ends in ``RMSNorm`` on purpose: it is the model's final norm, and
    the decode loops treat it as one (the fused decoder passes ``matrix`` on).
    """

    def __init__(self, matrix: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("matrix", matrix.detach().to(torch.float32).contiguous())
        self.variance_epsilon = float(eps)

    @property
    def hidden_size(self) -> int:
        return self.matrix.shape[0]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        hidden = hidden.to(torch.float32)  # Llama's RMSNorm: statistics in float32
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (hidden @ self.matrix).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}, then a dense {self.hidden_size}x{self.hidden_size} matrix"


#: Head rows folded at a time by :func:`folded_head_weight`.
_FOLD_ROWS = 8192


def folded_head_weight(rows, out_features: int, matrix: torch.Tensor) -> torch.Tensor:
    """The float32 head ``W M^T`` of a final-norm ``matrix``, from ``rows(start, stop)`` (the head's float rows).

    In row blocks, in float64: the products of a [128k, 4096] head at once
    would take 8 GB beside it, and the rows may come from int8 codes a block
    at a time, so no float copy of the whole head is made but the result.
    """
    transposed = matrix.double().T
    folded = torch.empty(out_features, matrix.shape[0], dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, out_features, _FOLD_ROWS):
            stop = min(start + _FOLD_ROWS, out_features)
            folded[start:stop] = (rows(start, stop).detach().double() @ transposed).float()
    return folded


def untie_final_matrix(model) -> bool:
    """Fold a :class:`RotatedRMSNorm`'s matrix into a float head of its own, in place (``True`` if one was found).

    ``rmsnorm(h) M W^T = rmsnorm(h) (W M^T)^T``: the head becomes ``W M^T``,
    the norm transformers' own RMSNorm of unit weight (the class the model's
    layers use), and the head is untied.  ``model.lm_head`` must be a float
    ``nn.Linear`` (an export turns int8 layers float first).
    """
    body = getattr(model, "model", None)
    norm = getattr(body, "norm", None)
    if not isinstance(norm, RotatedRMSNorm):
        return False
    head = model.lm_head
    if type(head) is not nn.Linear:
        raise TypeError(f"the head must be float to take the final norm's matrix, not a {type(head).__name__}")
    with torch.no_grad():
        untied = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        untied.weight = nn.Parameter(folded_head_weight(lambda start, stop: head.weight[start:stop], head.out_features,
                                                        norm.matrix).to(head.weight.dtype))
        if head.bias is not None:
            untied.bias = nn.Parameter(head.bias.detach().clone())
        plain = type(body.layers[0].input_layernorm)(norm.hidden_size, eps=norm.variance_epsilon)
        plain.weight.fill_(1.0)
    model.lm_head = untied
    body.norm = plain
    model.config.tie_word_embeddings = False
    return True
