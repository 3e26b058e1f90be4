"""Next-token loss without the whole batch's logits in memory: the output head and cross-entropy by chunks.

A causal LM's logits are ``tokens x vocabulary`` floats (2 x 256 tokens x
49,152 for SmolLM2: 100 MB), and the loss keeps about three such tensors
alive through backward, more than everything a LoRA run trains.  Here the
model runs with its output head set aside (so it returns the final hidden
states), and the head and cross-entropy run over ``CHUNK_TOKENS`` tokens at a
time under activation checkpointing: backward recomputes one chunk's logits
at a time (one more head product per step).  The loss equals the model's own
(mean over the labelled next tokens) up to float summation order.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ftq_core.data import IGNORE_INDEX
from ftq_core.model_families import model_types_where

__all__ = ["CHUNK_TOKENS", "supports_chunked_loss", "chunked_next_token_loss", "hidden_states_instead_of_logits"]

#: Tokens per chunk: 128 x 49,152 float32 logits are 25 MB.
CHUNK_TOKENS = 128

#: Architectures whose causal-LM forward applies nothing but the output head to
#: the final hidden states (no logit soft-capping or scaling after it), so the
#: head may run outside the model (``plain_head`` in ``ftq_core.model_families``).
_PLAIN_HEAD_MODEL_TYPES = frozenset(model_types_where("plain_head"))


def supports_chunked_loss(model: nn.Module) -> bool:
    """Whether the output head of ``model`` may be run outside it (see ``_PLAIN_HEAD_MODEL_TYPES``)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and getattr(config, "model_type", None) in _PLAIN_HEAD_MODEL_TYPES


@contextlib.contextmanager
def hidden_states_instead_of_logits(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model's output head is the identity, so its "logits" are the final hidden states.

    Yields the real head; puts it back on exit.
    """
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_next_token_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``head(hidden[:, t])`` against ``labels[:, t + 1]`` over labelled positions.

    ``hidden [batch, tokens, width]``, ``labels [batch, tokens]`` (``IGNORE_INDEX`` where no loss is taken).
    """
    from torch.utils.checkpoint import checkpoint

    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].reshape(-1).to(hidden.device)
    count = (targets != IGNORE_INDEX).sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start, end in _chunks(hidden.shape[0]):
        total = total + checkpoint(_chunk_loss_sum, head, hidden[start:end], targets[start:end], use_reentrant=False)
    return total / count.clamp(min=1)


def _chunks(tokens: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each chunk; a short remainder joins the chunk before it (int8 GEMMs on CUDA need rows)."""
    bounds = list(range(0, tokens, CHUNK_TOKENS)) + [tokens]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < CHUNK_TOKENS // 2:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))
