"""Token blocks for causal-LM fine-tuning and evaluation.

The classic Dataset/DataLoader pattern: a :class:`TokenBlocks` dataset yields
fixed-length ``LongTensor`` blocks; any ``torch.utils.data.Dataset`` of such
blocks works wherever ftq takes data.  :func:`splits_from_texts` turns a list
of texts into train/held-out splits for a tokenizer.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

from .errors import DatasetError
from .protocols import DataSplits

__all__ = [
    "IGNORE_INDEX", "TokenBatch", "collate", "TokenBlocks", "pack_tokens", "tokenize_documents", "token_fingerprint",
    "splits_from_texts", "as_data_splits",
]

#: Label of a position that has no loss (a prompt token, padding): what Hugging Face's losses skip.
IGNORE_INDEX = -100


class TokenBatch:
    """A batch of :class:`~ftq_core.protocols.DataSplits` items: ``input_ids``, ``labels``, ``attention_mask``.

    ``labels`` equal ``input_ids`` for plain blocks; ``attention_mask`` is
    ``None`` when nothing is padded.  ``to(device)`` moves all three.
    """

    __slots__ = ("input_ids", "labels", "attention_mask")

    def __init__(self, input_ids, labels, attention_mask=None):
        self.input_ids, self.labels, self.attention_mask = input_ids, labels, attention_mask

    def to(self, device) -> "TokenBatch":
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return TokenBatch(self.input_ids.to(device), self.labels.to(device), mask)

    def model_inputs(self) -> dict:
        """Keyword arguments for a Hugging Face model's forward (no labels)."""
        if self.attention_mask is None:
            return {"input_ids": self.input_ids}
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def loss_tokens(self) -> int:
        """Next-token targets that count: labels after the first position that are not :data:`IGNORE_INDEX`."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def collate(items: Sequence[Any]) -> TokenBatch:
    """Stack DataSplits items: 1-D token blocks (every next token counts), or dicts with ``input_ids`` and
    ``labels`` (:data:`IGNORE_INDEX` where no loss is taken) and optionally ``attention_mask`` (0 on padding)."""
    import torch

    if not isinstance(items[0], dict):
        ids = torch.stack(list(items))
        return TokenBatch(ids, ids)
    ids = torch.stack([item["input_ids"] for item in items])
    labels = torch.stack([item["labels"] for item in items])
    masks = [item.get("attention_mask") for item in items]
    return TokenBatch(ids, labels, None if any(m is None for m in masks) else torch.stack(masks))


class TokenBlocks:
    """A map-style dataset of ``block_size`` token blocks cut from one token stream."""

    def __init__(self, tokens: Any, block_size: int):
        import torch

        tokens = torch.as_tensor(tokens, dtype=torch.long)
        count = tokens.numel() // block_size
        self.block_size = block_size
        self.blocks = tokens[: count * block_size].view(count, block_size)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int):
        return self.blocks[index]


def tokenize_documents(texts: Sequence[str], tokenizer: Any) -> list[int]:
    """One token stream: documents joined by the tokenizer's end-of-sequence token."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for ids in encoded:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    return stream


def pack_tokens(stream: Sequence[int], block_size: int, *, what: str) -> TokenBlocks:
    """Cut a token stream into blocks; fewer tokens than one block is an error."""
    if len(stream) < block_size:
        smaller = len(stream) // 2
        fix = f"Add more text, or lower block_size (e.g. block_size = {smaller})" if smaller >= 8 else "Add more text"
        raise DatasetError(f"{what} has {len(stream)} tokens, fewer than one block of {block_size}. {fix}.")
    return TokenBlocks(stream, block_size)


def token_fingerprint(stream: Sequence[int], *, block_size: int, eval_fraction: float) -> str:
    """What identifies the data a run trains on: its token ids and how they are cut.

    Content only, never paths: the same text through the same vocabulary gives
    the same fingerprint whether the tokenizer was read from a GGUF file or
    from the model cache, so a resumed run recognises its checkpoints.
    """
    from array import array

    digest = hashlib.sha256(array("q", stream).tobytes())
    digest.update(f"|{block_size}|{eval_fraction}".encode())
    return digest.hexdigest()[:16]


def splits_from_texts(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    block_size: int = 256,
    eval_fraction: float = 0.1,
    name: str = "texts",
) -> DataSplits:
    """Train/held-out splits from documents: the last ``eval_fraction`` of tokens are held out.

    The split is by position (the tail), so no held-out text leaks into training.
    """
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise DatasetError(f"{name} holds no text: every document is empty. Give at least one non-empty text.")
    stream = tokenize_documents(texts, tokenizer)
    cut = int(len(stream) * (1.0 - eval_fraction))
    train = pack_tokens(stream[:cut], block_size, what=f"the training split of {name}")
    held_out = pack_tokens(stream[cut:], block_size, what=f"the held-out split of {name} ({eval_fraction:.0%})")
    return DataSplits(
        train=train,
        eval=held_out,
        block_size=block_size,
        fingerprint=token_fingerprint(stream, block_size=block_size, eval_fraction=eval_fraction),
        description=f"{name}: {len(train)} train / {len(held_out)} held-out blocks of {block_size} tokens",
    )


def as_data_splits(data: Any, tokenizer: Any, *, block_size: int = 256, eval_fraction: float = 0.1) -> DataSplits:
    """Accept what Python users hand in: DataSplits, a list of texts, or a Dataset of blocks.

    A single ``torch.utils.data.Dataset`` of token blocks is split by its tail
    like texts are.
    """
    if isinstance(data, DataSplits):
        return data
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        return splits_from_texts(data, tokenizer, block_size=block_size, eval_fraction=eval_fraction)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        import torch
        from torch.utils.data import Subset

        count = len(data)
        if count < 2:
            raise DatasetError(f"the dataset has {count} item(s); at least 2 blocks are needed (train and held-out)")
        first = torch.as_tensor(data[0])
        if first.dim() != 1 or first.dtype not in (torch.int32, torch.int64):
            raise DatasetError(
                f"dataset items must be 1-D integer token blocks, got {tuple(first.shape)} {first.dtype}; "
                f"tokenize first, or pass a list of texts"
            )
        held = max(1, int(count * eval_fraction))
        return DataSplits(
            train=Subset(data, range(count - held)),
            eval=Subset(data, range(count - held, count)),
            block_size=first.numel(),
            fingerprint=f"dataset:{type(data).__name__}:{count}",
            description=f"{type(data).__name__}: {count - held} train / {held} held-out blocks",
        )
    raise DatasetError(
        f"cannot use {type(data).__name__} as data: pass a list of texts, a torch Dataset of token "
        f"blocks, or DataSplits"
    )
