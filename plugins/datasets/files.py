"""Finding a dataset's file: the one rule the file-reading datasets share."""

from __future__ import annotations

from pathlib import Path

from ftq_core.api import DatasetError

__all__ = ["dataset_file", "file_stamp"]


def dataset_file(option: str | None, default: Path, *, what: str, formats: str) -> Path:
    """The file a dataset's ``path`` option names (``default`` when unset), or a one-line error with the fix.

    ``what`` names the dataset in the message ("dataset", "chat dataset");
    ``formats`` lists what it reads (".txt, .jsonl or .csv").
    """
    path = Path(option).expanduser() if option else default
    if path.is_dir():
        raise DatasetError(f"{what} path {str(path)!r} is a directory; point it at one {formats} file in it")
    if not path.exists():
        raise DatasetError(f"{what} file {str(path)!r} does not exist; set dataset path to a {formats} file")
    if not path.is_file():
        # A FIFO, socket or device would be read more than once (check, then
        # build) or never end: ask for a file on disk.
        raise DatasetError(
            f"{what} path {str(path)!r} is not a regular file (a pipe, socket or device); save the data to a "
            f"{formats} file and point at that"
        )
    return path


def file_stamp(path: Path) -> tuple:
    """What changes when the file does: its real path, size and modification time (to read it once per change)."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
