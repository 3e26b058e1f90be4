"""The ``chat`` dataset: conversations rendered with the tokenizer's chat template, loss on the answers only.

Each line of a JSON-lines file is one conversation, either
``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``
or ``{"prompt": ..., "completion": ...}`` (one user turn, one answer).  Every
conversation is rendered with the model's own chat template and becomes one
example of ``block_size`` tokens: padded (``attention_mask`` 0, no loss) or,
if longer, cut.  Labels are the token ids on the assistant turns and -100
everywhere else, so fine-tuning learns to answer, not to repeat prompts.  The
assistant tokens are found the way the template renders them: the
conversation up to a turn with the generation prompt, then with the answer;
the answer's tokens are the difference.  The last ``eval_fraction`` of the
conversations are held out.  Conversations out of order (an answer first,
two answers in a row) or that the template refuses are dropped and counted
in a warning; templates render under a budget (:mod:`ftq_core.chat_template`).  Without a ``path`` it reads the bundled sample
(``ftq_plugins/data/chat_sample.jsonl``, written for ftq).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ftq_core.api import DatasetError, DataSplits, check, hookimpl

from .files import dataset_file, file_stamp

__all__ = ["ChatDatasetConfig", "ChatDataset", "assistant_token_mask"]

SAMPLE_PATH = Path(__file__).parent.parent / "data" / "chat_sample.jsonl"  # ftq_plugins/data

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, kw_only=True)
class ChatDatasetConfig:
    """Options of the ``chat`` dataset."""

    path: str | None = field(default=None, metadata={"help": "a .jsonl file of conversations (default: the bundled chat sample)"})
    block_size: int = field(default=256, metadata={"help": "tokens per example (padded or cut)"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of the conversations held out (the last ones)"})

    def __post_init__(self) -> None:
        check([
            (self.block_size >= 8, f"block_size must be >= 8, got {self.block_size}"),
            (0 < self.eval_fraction < 1, f"eval_fraction must be between 0 and 1, got {self.eval_fraction}"),
        ])


class Examples:
    """A map-style dataset of chat examples: dicts of ``input_ids``, ``labels``, ``attention_mask``."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


class ChatDataset:
    """See the module docstring."""

    def __init__(self, config: ChatDatasetConfig):
        self.config = config
        self._read: tuple | None = None  # (file stamp, conversations): check() and build() read the file once

    def _path(self) -> Path:
        return dataset_file(self.config.path, SAMPLE_PATH, what="chat dataset", formats=".jsonl")

    def check(self) -> None:
        """The file exists and every line is a conversation ftq can render: checked before any model loads."""
        self.conversations()

    def conversations(self) -> list[list[dict]]:
        """Every usable conversation of the file as a list of ``{role, content}`` messages.

        A malformed line is an error naming it; a conversation whose turns are
        out of order (an answer before any question, two answers in a row) is
        dropped, counted and reported in one warning.
        """
        return [messages for _, messages in self._numbered()]

    def _numbered(self) -> list[tuple[int, list[dict]]]:
        """The usable conversations with their line numbers (the file read once per change)."""
        path = self._path()
        stamp = file_stamp(path)
        if self._read is not None and self._read[0] == stamp:
            return self._read[1]
        numbered, dropped = [], []
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path.name} is not UTF-8 text (byte {exc.start}); a chat dataset is a .jsonl file") from None
        for number, line in enumerate(lines, start=1):
            if line.strip():
                messages = _messages(path.name, number, line)
                problem = _order_problem(messages)
                if problem:
                    dropped.append(f"line {number} ({problem})")
                else:
                    numbered.append((number, messages))
        _warn_dropped(path.name, dropped, len(numbered) + len(dropped))
        if len(numbered) < 2:
            raise DatasetError(f"{path.name} holds {len(numbered)} usable conversation(s); a train and a held-out split "
                               f"need at least 2")
        self._read = (stamp, numbered)
        return numbered

    def build(self, tokenizer) -> DataSplits:
        if not getattr(tokenizer, "chat_template", None):
            raise DatasetError(
                "this model's tokenizer has no chat template, so conversations cannot be rendered as it expects; "
                "use a chat model (e.g. the bundled SmolLM2-135M-Instruct) or the text dataset"
            )
        rows = self._rows(tokenizer)
        cut = max(1, min(len(rows) - 1, round(len(rows) * (1 - self.config.eval_fraction))))
        digest = hashlib.sha256()
        for row in rows:
            digest.update(row["input_ids"].numpy().tobytes())
            digest.update(row["labels"].numpy().tobytes())
        digest.update(f"|chat|{self.config.block_size}|{self.config.eval_fraction}".encode())
        name = self._path().name
        return DataSplits(
            train=Examples(rows[:cut]),
            eval=Examples(rows[cut:]),
            block_size=self.config.block_size,
            fingerprint=digest.hexdigest()[:16],
            description=f"{name}: {cut} train / {len(rows) - cut} held-out conversations of up to {self.config.block_size} "
                        f"tokens, loss on assistant turns",
        )

    def _rows(self, tokenizer) -> list[dict]:
        """One example per conversation; those the chat template refuses are dropped and counted."""
        from ftq_core.chat_template import ChatTemplateError

        numbered = self._numbered()
        rows, dropped = [], []
        for number, messages in numbered:
            try:
                rows.append(self._example(tokenizer, messages))
            except ChatTemplateError as exc:
                if not exc.rejected:  # the template fails whatever the conversation: nothing to drop, all to fix
                    raise
                dropped.append(f"line {number}")
        name = self._path().name
        _warn_dropped(name, dropped, len(numbered), why="the chat template refused them: ")
        if len(rows) < 2:
            raise DatasetError(f"{name}: the chat template refused {len(dropped)} of {len(numbered)} conversations, "
                               f"leaving {len(rows)}; a train and a held-out split need at least 2. Make the "
                               f"conversations fit the template (e.g. user and assistant turns alternating) or fix "
                               f"its chat_template")
        return rows

    def _example(self, tokenizer, messages: list[dict]) -> dict:
        import torch

        from ftq_core.data import IGNORE_INDEX

        ids, mask = assistant_token_mask(tokenizer, messages)
        block = self.config.block_size
        ids, mask = ids[:block], mask[:block]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        length = len(ids)
        input_ids = torch.full((block,), pad if pad is not None else 0, dtype=torch.long)
        input_ids[:length] = torch.tensor(ids, dtype=torch.long)
        labels = torch.full((block,), IGNORE_INDEX, dtype=torch.long)
        labels[:length] = torch.where(torch.tensor(mask, dtype=torch.bool), input_ids[:length], IGNORE_INDEX)
        attention = torch.zeros(block, dtype=torch.long)
        attention[:length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}


def assistant_token_mask(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The rendered conversation's token ids, and 1 for each token of an assistant turn (0 elsewhere).

    For each assistant turn: the tokens of the conversation up to it with the
    generation prompt (what a model is given to answer) are a prefix of the
    tokens with the answer; the rest are the answer's, closing marker
    included, so the model learns where to stop.
    """
    from ftq_core.chat_template import tokenize_chat

    where = getattr(tokenizer, "name_or_path", "") or "this model"

    def render(turns, prompt: bool) -> list[int]:
        return tokenize_chat(tokenizer, turns, add_generation_prompt=prompt, where=where)

    ids = render(messages, False)
    mask = [0] * len(ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:index], True), render(messages[: index + 1], False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise DatasetError(
                "the chat template renders a conversation differently from its beginning (it rewrites earlier turns), "
                "so the answer tokens cannot be found; use a template that appends turns"
            )
        mask[len(before): len(through)] = [1] * (len(through) - len(before))
    return ids, mask


def _messages(name: str, number: int, line: str) -> list[dict]:
    """One JSON line as chat messages, or a one-line error naming the line and the expected shape."""
    shape = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]} or {"prompt": "...", "completion": "..."}'
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{name} line {number} is not valid JSON ({exc.msg}); each line must be {shape}") from None
    except RecursionError:
        raise DatasetError(f"{name} line {number} nests JSON too deeply to be a row; each line must be {shape}") from None
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{name} line {number} has neither messages nor prompt/completion; each line must be {shape}")
    for message in messages:
        if not (isinstance(message, dict) and message.get("role") in ROLES and isinstance(message.get("content"), str)):
            raise DatasetError(
                f"{name} line {number}: every message needs a role ({', '.join(ROLES)}) and a text content, got {message!r}"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{name} line {number} has no assistant turn, so nothing to learn from; add the answer")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _order_problem(messages: list[dict]) -> str | None:
    """Why the turns are out of order, or ``None``: an optional system turn first, then user and assistant in turn."""
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        return "a system turn after the first"
    turns = roles[1:] if roles[0] == "system" else roles
    if turns and turns[0] != "user":
        return "it starts with an assistant turn"
    if any(a == b for a, b in zip(turns, turns[1:])):
        return "two user or two assistant turns in a row"
    return None


def _warn_dropped(name: str, dropped: list[str], total: int, why: str = "") -> None:
    """One warning counting the conversations left out, naming the first few lines."""
    import warnings

    from ftq_core.errors import FtqWarning

    if dropped:
        more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        warnings.warn(f"{name}: {len(dropped)} of {total} conversations were dropped ({why}{', '.join(dropped[:5])}"
                      f"{more}); a conversation is an optional system turn, then user and assistant turns in turn",
                      FtqWarning, stacklevel=3)


@hookimpl
def register_datasets(register):
    register("chat", ChatDataset, ChatDatasetConfig,
             description="JSONL conversations rendered with the model's chat template, loss on assistant turns only")
