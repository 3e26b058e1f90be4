"""One ftq process per output tree: exclusive lock files holding the owner's pid.

Two processes writing one directory would delete each other's staging files,
mix their checkpoints, or leave a report that describes another model than
the artifact beside it.  A lock is an ``flock`` on a small file: the kernel
drops it when its process dies, however it dies, so a lock file left behind
by a killed process is stale by construction and the next one simply takes
it.  The file also names its holder's pid, for the message the second
process prints.

The rule, in one place: writing a directory ``X`` (an artifact, an export)
takes the lock ``X.parent/.X.name.ftq-lock`` (:func:`target_lock`).  A run
writes its output directory *and* the artifact ``model/`` inside it, so it
takes its own ``.ftq-lock`` and that artifact's lock (:func:`run_lock`): a
``quantize`` or ``export`` aimed at ``R/model`` while a run writes ``R`` (or
the reverse) is refused.

Lock files may sit in a directory someone else prepared, so they are opened
without following links and must be regular files with one name: ftq never
truncates or writes a file that a planted link or hard link points at.  A
lock file is deleted when its holder is done with it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
from pathlib import Path
from typing import Iterator

from .errors import UsageError

__all__ = ["LOCK_NAME", "output_lock", "run_lock", "target_lock", "target_lock_path"]

#: The lock file's name inside a run's output directory.
LOCK_NAME = ".ftq-lock"

#: The artifact a run writes inside its output directory.
RUN_ARTIFACT = "model"

#: How often taking a lock is retried when the file is replaced under it (another process deleting its lock).
_ATTEMPTS = 5


def target_lock_path(target: Path) -> Path:
    """The lock file guarding the directory ``target`` (an artifact or export): beside it, named after it."""
    target = Path(target).absolute()
    return target.parent / f".{target.name}{LOCK_NAME}"


def _holder(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return "another ftq process"
    try:
        pid = os.read(fd, 64).decode("ascii", "replace").split()[0]
    except (OSError, IndexError):
        return "another ftq process"
    finally:
        os.close(fd)
    return f"ftq process {pid}" if pid.isdigit() else "another ftq process"


def _not_a_lock(path: Path, why: str) -> UsageError:
    return UsageError(
        f"{path} {why}, not a lock file ftq made (ftq opens its lock files without following links and writes its "
        f"pid into them, so it will not touch this). Remove {path} and run again."
    )


def _open_lock_file(path: Path) -> int:
    """Open (creating if needed) the lock file ``path``: a regular file with one name, never through a link."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise _not_a_lock(path, f"is a symbolic link (to {os.readlink(path)})")
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # made a link between the lstat and the open
            raise _not_a_lock(path, "is a symbolic link") from None
        raise UsageError(f"cannot create the lock file {path} ({exc.strerror}); make its directory writable or "
                         f"choose another output directory (-o)") from None
    info = os.fstat(fd)
    problem = "" if stat.S_ISREG(info.st_mode) else "is not a regular file"
    if not problem and info.st_nlink != 1:
        problem = f"is a hard link ({info.st_nlink} names for one file)"
    if problem:
        os.close(fd)
        raise _not_a_lock(path, problem)
    return fd


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (its holder may have deleted it meanwhile)."""
    try:
        named = os.lstat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _take(path: Path, what: str) -> int:
    """The descriptor of ``path`` with an exclusive ``flock`` on it; :class:`UsageError` if another process holds it."""
    import fcntl

    for _ in range(_ATTEMPTS):
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UsageError(
                f"{what} is in use by {_holder(path)}, which is still running; two ftq processes writing one "
                f"output directory would overwrite each other. Wait for it to finish, or choose another output "
                f"directory (-o)."
            ) from None
        if _same_file(path, fd):
            return fd
        os.close(fd)  # the holder deleted the file as we opened it: the lock is the file now at ``path``
    raise UsageError(f"the lock file {path} keeps being replaced; another program is changing it. Stop it and run again.")


def _release(path: Path, fd: int) -> None:
    """Delete the lock file (only while holding it, and only if ``path`` still names it), then let it go."""
    import fcntl

    with contextlib.suppress(OSError):
        if _same_file(path, fd):
            os.unlink(path)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def output_lock(path: Path, *, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block; refuse if another process holds it.

    ``what`` names the directory the lock guards, for the message.  A link,
    hard link or non-regular file at ``path`` is refused (:class:`UsageError`).
    """
    try:
        import fcntl  # noqa: F401
    except ImportError:  # pragma: no cover - not POSIX: no locking, as before
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _take(path, what)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {' '.join(sys.argv)[:200]}\n".encode())
        yield
    finally:
        _release(path, fd)


def target_lock(target: Path, *, what: str):
    """The lock of the directory ``target`` that ``quantize`` or ``export`` writes (see the module's rule)."""
    return output_lock(target_lock_path(target), what=what)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """The locks of a run's output directory ``out``: its own, and that of the artifact it writes inside it."""
    out = Path(out)
    with output_lock(out / LOCK_NAME, what=f"output directory {out}"):
        with target_lock(out / RUN_ARTIFACT, what=f"artifact directory {out / RUN_ARTIFACT}"):
            yield
