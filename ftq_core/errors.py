"""Exceptions ftq raises for problems a user can fix.

Each carries text meant for users: what is wrong and how to fix it.  Only the
CLI turns them into exit codes; any other exception is a bug and keeps its
traceback.
"""

from __future__ import annotations

__all__ = [
    "FtqError",
    "UsageError",
    "ConfigError",
    "UnknownComponentError",
    "PluginError",
    "ModelNotFoundError",
    "DatasetError",
    "ArtifactError",
    "TrainingError",
    "FtqWarning",
]


class FtqError(Exception):
    """Base of every error ftq reports to users.  ``exit_code`` 1: runtime failure."""

    exit_code = 1


class UsageError(FtqError):
    """The user asked for something that cannot work as stated (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A configuration has one or more problems; all of them are listed at once."""

    def __init__(self, problems: list[str] | str, *, where: str = "configuration"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        count = len(self.problems)
        head = f"{where} has {count} problem{'s' if count != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class UnknownComponentError(UsageError):
    """A dataset, trainer or quantizer name that no loaded plugin registered."""

    #: How many known names the message lists before it says how many more there are.
    LISTED = 20

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(
            f"unknown {kind} {_clipped(name)!r}. {self._listing()}. "
            f"Run 'ftq plugins' to see what each plugin provides, or install the plugin that "
            f"provides {_clipped(name)!r}."
        )

    def _listing(self) -> str:
        """The known names, or, when a plugin registered many, the closest ones and a count (one readable line)."""
        kinds = f"{self.kind}s"
        if len(self.known) <= self.LISTED:
            return f"Known {kinds}: {', '.join(self.known) or '(none loaded)'}"
        import difflib

        close = difflib.get_close_matches(self.name, self.known, n=5, cutoff=0.6)
        shown = close or self.known[: self.LISTED]
        label = f"Closest known {kinds}" if close else f"Known {kinds}"
        return f"{label}: {', '.join(shown)} and {len(self.known) - len(shown)} more"


def _clipped(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters, so a name pasted by mistake cannot flood the message."""
    return text if len(text) <= limit else text[:limit] + "..."


class PluginError(FtqError):
    """A plugin misbehaved (duplicate name, bad registration)."""


class ModelNotFoundError(UsageError):
    """The model source names nothing that can be loaded."""


class DatasetError(UsageError):
    """The dataset cannot be read or is unusable (empty, too short, bad column)."""


class ArtifactError(FtqError):
    """A saved artifact is missing, incomplete, tampered with or unreadable."""


class TrainingError(FtqError):
    """Training cannot go on (diverged loss, no data)."""


class FtqWarning(UserWarning):
    """Something works but may not be what the user wants (the CLI prints it as one line)."""
