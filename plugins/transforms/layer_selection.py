"""Which layers a quantizer takes, and the quantizability report rows for the rest.

Every quantizer reports every candidate layer: Linear/Conv1D layers as int8
or float with the reason (user exclusion, sensitivity), and the layers no
int8 path here handles (embeddings, norms) as float with theirs.
"""

from __future__ import annotations

from ftq_core.protocols import LayerReport

__all__ = ["select_layers", "float_only_reports", "params_of"]


def params_of(module) -> int:
    return sum(p.numel() for p in module.parameters())


def select_layers(model, keep_float) -> tuple[list[tuple[str, object]], list[LayerReport]]:
    """``(name, module)`` of every Linear/Conv1D to quantize, and report rows for those excluded."""
    from ftq_core.layers import iter_linear_layers, matches_any

    chosen, excluded = [], []
    for name, module in iter_linear_layers(model):
        pattern = matches_any(name, keep_float)
        if pattern is not None:
            excluded.append(
                LayerReport(name, type(module).__name__, "float32", False, f"user exclusion: keep_float {pattern!r}", params_of(module))
            )
        else:
            chosen.append((name, module))
    return chosen, excluded


def float_only_reports(model) -> list[LayerReport]:
    """Rows for embeddings and norms, which stay float (no GEMM to run in int8)."""
    from torch import nn

    rows = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, nn.Embedding):
            reason = "unsupported type: embedding lookups stay float (a tied lm_head is quantized as its own copy)"
        elif kind == "LayerNorm" or kind.endswith("RMSNorm"):
            reason = "unsupported type: norms stay float (tiny, and precision-critical)"
        else:
            continue
        rows.append(LayerReport(name, kind, "float32", False, reason, params_of(module)))
    return rows


def install_with_fallback(model, floats: dict, quantized: dict, config, batches) -> dict[str, str]:
    """Put the quantized layers in place, or with ``config.ppl_budget`` let the
    sensitivity fallback keep the fewest float layers that meet the budget.

    Returns ``{layer name: why it stayed float}``.  ``config`` needs
    ``ppl_budget``, ``sensitivity_tokens`` and ``sensitivity``.
    """
    from ftq_core.layers import set_submodule

    if config.ppl_budget is None:
        for name, module in quantized.items():
            set_submodule(model, name, module)
        return {}
    from .sensitivity import fallback_to_budget

    return fallback_to_budget(
        model, floats, quantized, batches,
        budget_pct=config.ppl_budget, tokens=config.sensitivity_tokens, method=config.sensitivity,
    ).kept


def plan_reports(model, excluded: list[LayerReport], floats: dict, kept: dict[str, str], scheme: str) -> list[LayerReport]:
    """One report per layer: exclusions, float-only layers (norms, embeddings), and each candidate."""
    reports = excluded + float_only_reports(model)
    for name, module in floats.items():
        if name in kept:
            reports.append(LayerReport(name, type(module).__name__, "float32", False, kept[name], params_of(module)))
        else:
            reports.append(LayerReport(name, type(module).__name__, scheme, True, "", params_of(module)))
    return reports
