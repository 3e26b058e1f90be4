"""What ftq refuses in a directory it reads: links out, code files, remote-code hooks, pickles.

Artifacts, checkpoints and model directories may come from someone else.
Loading one must never run its code and never read a file outside it, so
before transformers or safetensors open anything, ftq looks for:

* symbolic links (and, in what ftq wrote itself, hard links: ftq never makes
  either, so one means the directory was edited);
* Python or native code files (``.py``, ``.so``...), which only matter to a
  loader that runs them -- ftq's never do, so they have no business there;
* ``auto_map`` in ``config.json`` / ``tokenizer_config.json``, transformers'
  hook for loading classes from such files ("remote code");
* pickle-based files, which run code when unpickled.

Names that come from such a directory (a manifest's file list, a checkpoint's
``latest``) must be plain file names, and the files ftq reads or deletes are
opened or removed without following links (:func:`open_regular_file`,
:func:`remove_tree`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Iterable

__all__ = [
    "CODE_SUFFIXES",
    "PICKLE_SUFFIXES",
    "REMOTE_CODE_FILES",
    "code_file_problems",
    "is_plain_name",
    "link_problems",
    "open_regular_file",
    "pickle_file_names",
    "plain_directory_problem",
    "read_regular_file",
    "remote_code_problems",
    "remove_tree",
]

#: Suffixes of pickle-based files.  Nothing in ftq reads them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")

#: Suffixes of files Python could import or load as native code.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll")

#: JSON files in which transformers looks for ``auto_map`` (classes to import from the directory).
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _entries(directory: Path) -> Iterable[Path]:
    """Every path under ``directory``, without following links."""
    for root, dirs, files in os.walk(directory, followlinks=False):
        for name in sorted(dirs + files):
            yield Path(root) / name


def _inside(path: Path, roots: Iterable[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def link_problems(directory: Path, *, allowed_roots: Iterable[Path] = (), hard_links: bool = True) -> list[str]:
    """Symbolic links in ``directory`` (and files with more than one name, if ``hard_links``).

    A symbolic link is accepted only if it resolves inside ``directory`` or
    one of ``allowed_roots`` (a Hugging Face cache snapshot points into its
    own ``blobs/`` folder, for instance).
    """
    directory = Path(directory)
    roots = [directory.resolve(), *(Path(r).resolve() for r in allowed_roots)]
    problems = []
    for path in _entries(directory):
        name = path.relative_to(directory)
        if path.is_symlink():
            target = path.resolve()
            if not _inside(target, roots):
                problems.append(f"{name} is a symbolic link to {target}, outside the directory")
            continue
        if hard_links and path.is_file() and path.stat().st_nlink > 1:
            problems.append(f"{name} is a hard link ({path.stat().st_nlink} names for one file)")
    return problems


def code_file_problems(directory: Path) -> list[str]:
    """Files whose suffix says Python or native code."""
    return [
        f"{path.relative_to(directory)} is a code file"
        for path in _entries(Path(directory))
        if path.suffix.lower() in CODE_SUFFIXES
    ]


def pickle_file_names(names: Iterable[str]) -> list[str]:
    """The names among ``names`` with a pickle-based suffix."""
    return sorted(name for name in names if name.lower().endswith(PICKLE_SUFFIXES))


def remote_code_problems(directory: Path) -> list[str]:
    """``auto_map`` entries in the directory's config files (transformers would import code for them)."""
    problems = []
    for name in REMOTE_CODE_FILES:
        path = Path(directory) / name
        if not path.is_file() or path.is_symlink():
            continue
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue  # unreadable JSON is reported by whatever reads it next
        if isinstance(content, dict) and "auto_map" in content:
            classes = content["auto_map"]
            listing = ", ".join(sorted(classes)) if isinstance(classes, dict) else repr(classes)
            problems.append(f"{name} has an auto_map ({listing}): it asks to import classes from code in the directory")
    return problems


def is_plain_name(name: object) -> bool:
    """Whether ``name`` is one file name inside a directory: no separator, not ``.`` or ``..``, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def plain_directory_problem(path: Path) -> str:
    """Why ``path`` is not a real directory ftq may write into and delete from (``""`` if it is one or is absent).

    A symbolic link there would send writes, and deletions, to another directory.
    """
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ""
    if stat.S_ISLNK(mode):
        return f"{path} is a symbolic link (to {os.readlink(path)})"
    if not stat.S_ISDIR(mode):
        return f"{path} is not a directory"
    return ""


def remove_tree(path: Path) -> None:
    """Delete ``path``: a directory with everything in it, or a link or file itself -- never what a link points at."""
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)  # rmtree unlinks the links it meets, never descends through them
    else:
        path.unlink(missing_ok=True)


def open_regular_file(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file reached without following a link.

    Raises ``OSError`` otherwise (``ELOOP`` for a link; ``EINVAL`` for a directory, FIFO or device).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_regular_file(path: Path, *, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular_file`); ``limit``: refuse larger files."""
    fd = open_regular_file(path)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
    return data
