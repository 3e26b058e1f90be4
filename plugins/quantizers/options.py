"""Options that several quantizers share, declared once.

``keep_float`` (layer selection), ``smoothquant_alpha`` (outlier migration)
and the sensitivity fallback (``ppl_budget``, ``sensitivity_tokens``,
``sensitivity``) mean the same in every quantizer that offers them; only the
defaults differ.  Each function returns a dataclass ``field`` for a config
class; :func:`shared_checks` validates whichever of them a config has.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from ftq_plugins.transforms.sensitivity import SensitivityMethod
from ftq_plugins.transforms.smoothquant import check_alpha

__all__ = [
    "keep_float_option",
    "smoothquant_option",
    "ppl_budget_option",
    "sensitivity_tokens_option",
    "sensitivity_option",
    "shared_checks",
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


def shared_checks(config: Any) -> list[tuple[bool, str]]:
    """``check`` entries for the shared options ``config`` has."""
    checks = [(all(isinstance(p, str) and p for p in config.keep_float), "keep_float entries must be non-empty strings")]
    if hasattr(config, "smoothquant_alpha"):
        checks.append(check_alpha(config.smoothquant_alpha))
    if hasattr(config, "ppl_budget"):
        budget, tokens = config.ppl_budget, config.sensitivity_tokens
        checks.append((budget is None or budget > 0, f"ppl_budget must be > 0 or none, got {budget}"))
        checks.append((tokens >= 16, f"sensitivity_tokens must be >= 16, got {tokens}"))
    return checks
