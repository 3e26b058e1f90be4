"""Options that several quantizers share, declared once.

``keep_float`` (layer selection), ``smoothquant_alpha`` (outlier migration),
``rotate``/``untie_head`` (the residual-stream rotation) and the sensitivity fallback (``ppl_budget``, ``sensitivity_tokens``,
``sensitivity``) mean the same in every quantizer that offers them; only the
defaults differ.  Each ``*_option`` function returns a dataclass ``field`` for
a config class, and each ``*_checks`` function the ``check`` entries for it:
a config calls the checks of the options it declares.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ftq_plugins.transforms.sensitivity import SensitivityMethod

__all__ = [
    "AUTO_SMOOTHQUANT_ALPHA",
    "Rotation",
    "OutlierPlan",
    "rotate_option",
    "untie_head_option",
    "rotation_checks",
    "plan_outliers",
    "keep_float_option",
    "quantize_embeddings_option",
    "smoothquant_option",
    "ppl_budget_option",
    "sensitivity_tokens_option",
    "sensitivity_option",
    "keep_float_checks",
    "layer_pattern_checks",
    "smoothquant_checks",
    "sensitivity_checks",
]


def quantize_embeddings_option() -> Any:
    return field(default=True, metadata={"help": "store token embeddings as per-row int8 (shared with a tied lm_head)"})


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


def layer_pattern_checks(option: str, patterns: tuple[str, ...]) -> list[tuple[bool, str]]:
    """The check of an option holding glob patterns of layer names (``keep_float``, ``qat``'s ``per_token``)."""
    return [(all(isinstance(p, str) and p for p in patterns), f"{option} entries must be non-empty strings")]


def keep_float_checks(keep_float: tuple[str, ...]) -> list[tuple[bool, str]]:
    return layer_pattern_checks("keep_float", keep_float)


def smoothquant_checks(alpha: float | None) -> list[tuple[bool, str]]:
    return [(alpha is None or 0.0 <= alpha <= 1.0, f"smoothquant_alpha must be in [0, 1] or none, got {alpha}")]


def sensitivity_checks(ppl_budget: float | None, sensitivity_tokens: int) -> list[tuple[bool, str]]:
    return [
        (ppl_budget is None or ppl_budget > 0, f"ppl_budget must be > 0 or none, got {ppl_budget}"),
        (sensitivity_tokens >= 16, f"sensitivity_tokens must be >= 16, got {sensitivity_tokens}"),
    ]


def smoothquant_per_layer_option() -> Any:
    return field(
        default=False,
        metadata={
            "help": "where SmoothQuant applies, choose its alpha per group of layers sharing an input (0, 0.1, ..., 1): "
            "the one whose int8 outputs stay closest to float on 256 calibration tokens (smoothquant_alpha is then "
            "used only for a group without calibration inputs); off by default: it fits the calibration text and, "
            "measured, loses more on other text than one alpha (benchmarks/RESULTS.md)"
        },
    )


class WeightRounding(enum.Enum):
    """How float weights become int8 codes (:mod:`ftq_plugins.transforms.gptq`)."""

    NEAREST = "nearest"
    GPTQ = "gptq"


#: What ``weight_rounding``'s choices mean (``dynamic`` and ``static`` say it the same way).
WEIGHT_ROUNDING_HELP = (
    "nearest: round each weight to its nearest int8 code (no data needed); gptq: choose the codes against the "
    "calibration inputs, each column's rounding error moved onto the columns after it (calibrates)"
)


#: The SmoothQuant strength ``rotate = auto`` falls back to where a model cannot be rotated (``static``, ``qat``).
AUTO_SMOOTHQUANT_ALPHA = 0.5


class Rotation(enum.Enum):
    """Whether a quantizer rotates the residual stream first (:mod:`ftq_plugins.transforms.rotation`)."""

    AUTO = "auto"  # where the model's layout allows it and smoothquant_alpha is unset
    ON = "true"
    OFF = "false"


def rotate_option(default: Rotation = Rotation.AUTO) -> Any:
    return field(
        default=default,
        metadata={
            "help": "rotate the residual stream by a seeded random orthogonal matrix folded into the weights, and "
            "down_proj's input by block Hadamard transforms at run time (Llama-family float layers; exact in float, "
            "spreads activation outliers over all channels); auto: where the model allows it and smoothquant_alpha "
            "is unset; true: refused where it does not fold; false: never"
        },
    )


def untie_head_option() -> Any:
    return field(
        default=False,
        metadata={
            "help": "with rotation, give a tied head its own int8 copy of the embeddings carrying the final norm's "
            "weight (one more embedding-sized matrix in the artifact; slightly more accurate); false: the head stays "
            "tied and the final norm becomes a hidden x hidden matrix"
        },
    )


def rotation_checks(rotate: Rotation, alpha: float | None) -> list[tuple[bool, str]]:
    return [(
        not (rotate is Rotation.ON and alpha is not None),
        "rotate and smoothquant_alpha both move activation outliers, and SmoothQuant's statistics are recorded "
        "before the rotation; set one of them (smoothquant_alpha = none, or rotate = false)",
    )]


@dataclass(frozen=True)
class OutlierPlan:
    """What a quantizer does about activation outliers for one model."""

    rotate: bool
    alpha: float | None  # SmoothQuant strength, or None


def plan_outliers(rotate: Rotation, alpha: float | None, model, *, allowed: str | None = None,
                  fallback_alpha: float | None = None) -> OutlierPlan:
    """Resolve ``rotate`` for ``model``: rotation, SmoothQuant or neither.

    ``allowed``: why this configuration cannot rotate at all (``None``: it can).
    ``fallback_alpha``: the SmoothQuant strength ``auto`` uses where the model
    cannot be rotated (``static``; ``dynamic`` stays calibration-free).
    ``rotate = true`` on a model that cannot be rotated raises
    :class:`~ftq_core.errors.UsageError` with the reason, before any work.
    """
    from ftq_core.errors import UsageError
    from ftq_plugins.transforms.rotation import unsupported_reason

    if rotate is Rotation.OFF:
        return OutlierPlan(False, alpha)
    reason = allowed or unsupported_reason(model)
    if rotate is Rotation.ON:
        if reason is not None:
            raise UsageError(f"cannot rotate the residual stream: {reason}. Unset rotate.")
        return OutlierPlan(True, None)
    if alpha is not None:
        return OutlierPlan(False, alpha)
    if reason is not None:
        return OutlierPlan(False, fallback_alpha)
    return OutlierPlan(True, None)
