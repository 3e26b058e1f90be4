"""Keep the libraries' own chatter out of what an ftq user sees (``--debug`` shows it all).

transformers, datasets and torch print progress bars and warnings that say
nothing to someone running ``ftq run``: "Loading weights", "Generating train
split", torch.ao's ``reduce_range`` deprecation.  ftq's own progress bars and
messages stay.  The switches are environment variables the libraries read
when they are imported, so :func:`quiet_libraries` runs before any of them is.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Iterator

__all__ = ["quiet_libraries", "quiet_gguf_conversion"]

#: Read by huggingface_hub (and so transformers) and by datasets at import time.
_QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}

#: Warnings of the libraries that an ftq user can do nothing about.
_IGNORED_WARNINGS = (
    ".*reduce_range will be deprecated.*",  # torch.ao observers behind the qat/static quantizers
    ".*torch.ao.quantization is deprecated.*",
    "Failed to initialize NumPy.*",
)


def quiet_libraries() -> None:
    """Silence third-party progress bars and warnings for this process and the processes it starts.

    Values the user set are left as they are.
    """
    for name, value in _QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


@contextlib.contextmanager
def quiet_gguf_conversion() -> Iterator[None]:
    """transformers' GGUF reader draws a plain tqdm bar that no switch reaches; turn it off while it runs.

    Only when :func:`quiet_libraries` is in force (not under ``--debug``); ftq
    says what the step is instead.
    """
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1" or os.environ.get("FTQ_DEBUG"):
        yield
        return
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - another transformers layout: the bar stays
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = lambda iterable=None, *args, **kwargs: original(iterable, *args, **{**kwargs, "disable": True})
    try:
        yield
    finally:
        gguf_utils.tqdm = original
