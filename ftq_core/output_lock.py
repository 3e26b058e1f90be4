"""One ftq process per output directory: an exclusive lock file holding the owner's pid.

Two runs writing one directory would delete each other's staging files and
mix their checkpoints.  The lock is an ``flock`` on a small file: the kernel
drops it when its process dies, however it dies, so a lock file left behind
by a killed run is stale by construction and the next run simply takes it.
The file also names its holder's pid, for the message the second run prints.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from .errors import UsageError

__all__ = ["LOCK_NAME", "output_lock"]

#: The lock file's name inside a run's output directory.
LOCK_NAME = ".ftq-lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().split()[0]
    except (OSError, IndexError):
        return "another ftq process"
    return f"ftq process {pid}"


@contextlib.contextmanager
def output_lock(path: Path, *, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block; refuse if another process holds it.

    ``what`` names the directory the lock guards, for the message.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking, as before
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise UsageError(
            f"{what} is in use by {_holder(path)}, which is still running; two runs on one output directory would "
            f"overwrite each other. Wait for it to finish, or choose another output directory (-o)."
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {' '.join(sys.argv)[:200]}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
