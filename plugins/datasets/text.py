"""The ``text`` dataset: local text, JSONL or CSV files through ``datasets``.

Files load offline with the ``datasets`` library's local builders (``text``,
``json``, ``csv``), are tokenized, and packed into fixed-length blocks; the
last ``eval_fraction`` of the tokens is held out.  With no ``path`` the
bundled sample (``ftq_plugins/data/sample.txt``) is used.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ftq_core.configs import check
from ftq_core.errors import DatasetError
from ftq_core.hookspecs import hookimpl

from .files import dataset_file, file_stamp

__all__ = ["TextFormat", "TextDatasetConfig", "TextDataset", "SAMPLE_PATH"]

SAMPLE_PATH = Path(__file__).parent.parent / "data" / "sample.txt"  # ftq_plugins/data


class TextFormat(enum.Enum):
    AUTO = "auto"
    TEXT = "text"
    JSONL = "jsonl"
    CSV = "csv"


_SUFFIXES = {".txt": TextFormat.TEXT, ".md": TextFormat.TEXT, ".jsonl": TextFormat.JSONL, ".json": TextFormat.JSONL, ".csv": TextFormat.CSV}
_BUILDERS = {TextFormat.TEXT: "text", TextFormat.JSONL: "json", TextFormat.CSV: "csv"}


@dataclass(frozen=True, kw_only=True)
class TextDatasetConfig:
    """Options of the ``text`` dataset."""

    path: str | None = field(default=None, metadata={"help": "a .txt, .jsonl or .csv file (default: the bundled sample)"})
    format: TextFormat = field(default=TextFormat.AUTO, metadata={"help": "file format; auto: from the suffix"})
    text_column: str = field(default="text", metadata={"help": "column holding the text (JSONL/CSV)"})
    block_size: int = field(default=256, metadata={"help": "tokens per training block"})
    eval_fraction: float = field(default=0.1, metadata={"help": "share of the tokens held out for evaluation (the tail)"})
    max_train_blocks: int | None = field(default=None, metadata={"help": "use at most this many training blocks"})

    def __post_init__(self) -> None:
        check(
            [
                (self.block_size >= 8, f"block_size must be >= 8, got {self.block_size}"),
                (0.0 < self.eval_fraction < 1.0, f"eval_fraction must be between 0 and 1, got {self.eval_fraction}"),
                (self.max_train_blocks is None or self.max_train_blocks >= 1, "max_train_blocks must be >= 1"),
                (bool(self.text_column), "text_column must not be empty"),
            ]
        )


class TextDataset:
    """Builds :class:`DataSplits` from a local file."""

    def __init__(self, config: TextDatasetConfig):
        self.config = config
        self._checked: tuple | None = None  # (path, size, mtime) of the file check() last passed

    def _path(self) -> Path:
        return dataset_file(self.config.path, SAMPLE_PATH, what="dataset", formats=".txt, .jsonl or .csv")

    def check(self) -> None:
        """The file exists, has a known format and is readable UTF-8 text: checked before any model loads."""
        path = self._path()
        self._format(path)
        stamp = file_stamp(path)
        if stamp != self._checked:  # the pipeline checks before the model loads, build reads after: scan once
            _check_text_file(path)
            self._checked = stamp

    def _format(self, path: Path) -> TextFormat:
        if self.config.format is not TextFormat.AUTO:
            return self.config.format
        try:
            return _SUFFIXES[path.suffix.lower()]
        except KeyError:
            raise DatasetError(
                f"cannot tell the format of {path.name!r} from its suffix; set format to text, jsonl or csv"
            ) from None

    def read_documents(self) -> list[str]:
        """The file's documents: non-empty paragraphs of a text file, or rows' text column."""
        import datasets

        path = self._path()
        fmt = self._format(path)
        self.check()
        if fmt is TextFormat.JSONL and not _is_json_document(path):
            return read_jsonl_texts(path, self.config.text_column)
        if fmt is TextFormat.CSV and not _csv_has_rows(path):
            raise DatasetError(f"{path.name} has a header row and no data rows; add rows of text below the header")
        kwargs = {"sample_by": "paragraph", "keep_linebreaks": True} if fmt is TextFormat.TEXT else {}
        try:
            table = datasets.load_dataset(_BUILDERS[fmt], data_files=str(path), split="train", **kwargs)
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start}); re-encode it as UTF-8, "
                f"e.g. iconv -f latin1 -t utf-8"
            ) from None
        except Exception as exc:  # datasets wraps parse errors in its own types
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, UnicodeDecodeError):
                raise DatasetError(f"{path} is not valid UTF-8; re-encode it as UTF-8") from None
            raise DatasetError(f"cannot read {path} as {fmt.value}: {exc}") from None
        column = "text" if fmt is TextFormat.TEXT else self.config.text_column
        if column not in table.column_names:
            raise _no_such_column(path, column, table.column_names)
        texts = [t for t in table[column] if isinstance(t, str) and t.strip()]
        if not texts:
            raise DatasetError(f"{path} holds no text (every {('line' if fmt is TextFormat.TEXT else 'row')} is empty)")
        if fmt is TextFormat.TEXT:
            # A text file is one document: keep its paragraphs apart by a blank
            # line, not by end-of-sequence tokens that the text never had.
            return ["\n\n".join(t.strip("\n") for t in texts)]
        return texts

    def build(self, tokenizer):
        from ftq_core.data import splits_from_texts

        path = self._path()
        splits = splits_from_texts(
            self.read_documents(),
            tokenizer,
            block_size=self.config.block_size,
            eval_fraction=self.config.eval_fraction,
            name=path.name,
        )
        if self.config.max_train_blocks is not None and len(splits.train) > self.config.max_train_blocks:
            from torch.utils.data import Subset

            from ftq_core.protocols import DataSplits

            splits = DataSplits(
                train=Subset(splits.train, range(self.config.max_train_blocks)),
                eval=splits.eval,
                block_size=splits.block_size,
                fingerprint=hashlib.sha256(f"{splits.fingerprint}:{self.config.max_train_blocks}".encode()).hexdigest()[:16],
                description=splits.description + f" (training on the first {self.config.max_train_blocks})",
            )
        return splits


def _no_such_column(path: Path, column: str, columns: list[str]) -> DatasetError:
    return DatasetError(
        f"{path.name} has no column {column!r}; its columns are {', '.join(columns)}. "
        f"Set text_column to one of them (e.g. --set dataset.text_column={columns[0]})."
    )


def _csv_has_rows(path: Path) -> bool:
    """Whether a CSV file has a non-blank line after its header (``datasets`` reports none as an internal split error)."""
    with path.open(encoding="utf-8", errors="replace") as handle:
        lines = (line for line in handle if line.strip())
        return next(lines, None) is not None and next(lines, None) is not None


def _is_json_document(path: Path) -> bool:
    """Whether a .json file is one JSON document (an array of rows), which ``datasets`` reads, rather than JSON lines."""
    if path.suffix.lower() != ".json":
        return False
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    return head.startswith(b"[")


def read_jsonl_texts(path: Path, column: str) -> list[str]:
    """The ``column`` strings of a JSON-lines file, naming the line of every problem.

    Read line by line with :mod:`json` rather than through ``datasets``: its
    JSON builder reports neither the line of a malformed row nor the rows whose
    text is not a string (a column of mixed types fails as a whole, or is
    silently coerced).  A malformed line is an error; rows with no usable text
    are dropped and counted, and a file with none left is an error.
    """
    import json
    import warnings

    from ftq_core.errors import FtqWarning

    texts: list[str] = []
    dropped: list[str] = []
    columns: dict[str, None] = {}  # in the order first seen, as datasets lists them
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(
                    f"{path.name} line {number} is not valid JSON ({exc.msg.removesuffix(' at')} at column {exc.colno}); every line of "
                    f"a .jsonl file must be one JSON object, e.g. {{\"{column}\": \"...\"}}. Fix or delete that line."
                ) from None
            except RecursionError:
                raise DatasetError(
                    f"{path.name} line {number} nests JSON too deeply to be a row; every line must be one flat object "
                    f"with a {column!r} field. Fix or delete that line."
                ) from None
            if not isinstance(row, dict):
                raise DatasetError(
                    f"{path.name} line {number} is a JSON {type(row).__name__}, not an object; every line must be an "
                    f"object with a {column!r} field"
                )
            columns.update(dict.fromkeys(row))
            value = row.get(column)
            if isinstance(value, str) and value.strip():
                texts.append(value)
            else:
                what = "no such field" if column not in row else ("empty" if isinstance(value, str) else
                                                                   f"a {type(value).__name__}, not text")
                dropped.append(f"line {number} ({what})")
    if not texts:
        if columns and column not in columns:
            raise _no_such_column(path, column, list(columns))
        shown = f": {', '.join(dropped[:5])}" if dropped else ""
        raise DatasetError(f"{path} holds no text: no row has a non-empty string {column!r}{shown}")
    if dropped:
        more = f" and {len(dropped) - 5} more" if len(dropped) > 5 else ""
        warnings.warn(
            f"{path.name}: {len(dropped)} of {len(texts) + len(dropped)} rows have no usable {column!r} text and were "
            f"dropped: {', '.join(dropped[:5])}{more}",
            FtqWarning, stacklevel=2,
        )
    return texts


def _check_text_file(path: Path) -> None:
    """Refuse an empty, binary or non-UTF-8 file with its position, before ``datasets`` hides the cause."""
    import codecs

    if path.stat().st_size == 0:
        raise DatasetError(f"dataset file {path} is empty (0 bytes); put some text in it or point path at another file")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            nul = chunk.find(b"\x00")
            if nul >= 0:
                nul_line = line + chunk[:nul].count(b"\n")
                raise DatasetError(
                    f"{path} holds a NUL byte at offset {offset + nul} (line {nul_line}): it is "
                    f"a binary file or UTF-16 text, not UTF-8 text. Point path at a text file, or re-encode it as "
                    f"UTF-8 (e.g. iconv -f utf-16 -t utf-8 {path.name} > fixed.txt)."
                )
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                bad = offset + exc.start
                line += chunk[: exc.start].count(b"\n")
                raise DatasetError(
                    f"{path} is not valid UTF-8: byte 0x{chunk[exc.start]:02x} at offset {bad} (line {line}) cannot be "
                    f"decoded. Re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.txt"
                ) from None
            offset += len(chunk)
            line += chunk.count(b"\n")
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DatasetError(f"{path} is not valid UTF-8: it ends in the middle of a character. Re-encode it as UTF-8.") from None


@hookimpl
def register_datasets(register):
    register("text", TextDataset, TextDatasetConfig, description="local .txt/.jsonl/.csv files via datasets, packed into blocks")
