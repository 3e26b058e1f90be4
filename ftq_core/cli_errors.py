"""How every ftq command shows a user error or an ftq warning: one line, no traceback."""

from __future__ import annotations

import functools
import os
import sys
import warnings

import click

from .errors import FtqError, FtqWarning

__all__ = ["user_errors"]

_plain_showwarning = warnings.showwarning


def _show_ftq_warning(message, category, filename, lineno, file=None, line=None):
    """ftq's own warnings as one line for users; anything else as Python shows it."""
    if issubclass(category, FtqWarning):
        click.secho(f"Warning: {message}", fg="yellow", err=True)
    else:
        _plain_showwarning(message, category, filename, lineno, file, line)


def user_errors(func):
    """Turn FtqError into a clean message and exit code (traceback with --debug)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", FtqWarning)
                warnings.showwarning = _show_ftq_warning
                return func(*args, **kwargs)
        except FtqError as exc:
            if os.environ.get("FTQ_DEBUG"):
                raise
            click.secho(f"Error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)

    return wrapper
