"""Options that several quantizers share, declared once.

``keep_float`` (layer selection), ``smoothquant_alpha`` (outlier migration)
and the sensitivity fallback (``ppl_budget``, ``sensitivity_tokens``,
``sensitivity``) mean the same in every quantizer that offers them; only the
defaults differ.  Each ``*_option`` function returns a dataclass ``field`` for
a config class, and each ``*_checks`` function the ``check`` entries for it:
a config calls the checks of the options it declares.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from ftq_plugins.transforms.sensitivity import SensitivityMethod

__all__ = [
    "keep_float_option",
    "smoothquant_option",
    "ppl_budget_option",
    "sensitivity_tokens_option",
    "sensitivity_option",
    "keep_float_checks",
    "smoothquant_checks",
    "sensitivity_checks",
]


def keep_float_option() -> Any:
    return field(default=(), metadata={"help": "glob patterns of layer names kept in float, e.g. lm_head,*.down_proj"})


def smoothquant_option(default: float | None) -> Any:
    return field(
        default=default,
        metadata={"help": "SmoothQuant migration strength in [0, 1] (calibrates first); none: off"},
    )


def ppl_budget_option(default: float | None) -> Any:
    return field(
        default=default,
        metadata={
            "help": "keep the most sensitive layers float until calibration perplexity is within this % of float "
            "(calibrates first; 3 recommended); none: off"
        },
    )


def sensitivity_tokens_option() -> Any:
    return field(default=512, metadata={"help": "calibration tokens used to rank layer sensitivity"})


def sensitivity_option() -> Any:
    return field(
        default=SensitivityMethod.FISHER,
        metadata={"help": "layer ranking for ppl_budget: fisher (one backward pass) or exact (one pass per layer, slow)"},
    )


def keep_float_checks(keep_float: tuple[str, ...]) -> list[tuple[bool, str]]:
    return [(all(isinstance(p, str) and p for p in keep_float), "keep_float entries must be non-empty strings")]


def smoothquant_checks(alpha: float | None) -> list[tuple[bool, str]]:
    return [(alpha is None or 0.0 <= alpha <= 1.0, f"smoothquant_alpha must be in [0, 1] or none, got {alpha}")]


def sensitivity_checks(ppl_budget: float | None, sensitivity_tokens: int) -> list[tuple[bool, str]]:
    return [
        (ppl_budget is None or ppl_budget > 0, f"ppl_budget must be > 0 or none, got {ppl_budget}"),
        (sensitivity_tokens >= 16, f"sensitivity_tokens must be >= 16, got {sensitivity_tokens}"),
    ]
