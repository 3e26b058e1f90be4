"""The run report: ``report.json``, a Markdown table and a PNG chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .evaluation import NOISY_SPREAD, Evaluation
from .tensor_io import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["markdown_table", "layer_summary", "grouped_float_reasons", "write_report", "render_chart"]


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(rows: Sequence[Evaluation], *, baseline: Evaluation | None = None) -> str:
    """Rows side by side, with ratios to ``baseline`` (the float model), named in a caption under the table."""
    if len(rows) == 1:
        return _absolute_table(rows[0])
    baseline = baseline or (rows[0] if rows else None)
    lines = [
        "| model | perplexity | Δ perplexity | size MB | size vs fp32 | prefill ms | prefill speed-up | decode tok/s | decode speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        delta = speed_p = speed_d = size_ratio = None
        if baseline is not None:
            if row.perplexity and baseline.perplexity:
                delta = 100 * (row.perplexity / baseline.perplexity - 1)
            if row.prefill_ms and baseline.prefill_ms:
                speed_p = baseline.prefill_ms / row.prefill_ms
            if row.decode_tokens_per_s and baseline.decode_tokens_per_s:
                speed_d = row.decode_tokens_per_s / baseline.decode_tokens_per_s
            size_ratio = 100 * row.size_bytes / baseline.size_bytes if baseline.size_bytes else None
        lines.append(
            f"| {row.label} | {_fmt(row.perplexity, '.3f')} | {_fmt(delta, '+.1f')}% | {row.size_bytes / 2**20:.1f} | "
            f"{_fmt(size_ratio, '.0f')}% | {_fmt(row.prefill_ms, '.1f')} | {_fmt(speed_p, '.2f')}× | "
            f"{_fmt(row.decode_tokens_per_s, '.1f')} | {_fmt(speed_d, '.2f')}× |"
        )
    if baseline is not None and len(rows) > 1:
        lines += ["", f"Δ, size share and speed-ups are relative to **{baseline.label}**."]
    timed = [row for row in rows if row.extra.get("latency")]
    if timed:
        noisy = [row.label for row in timed
                 if max(row.extra["latency"]["prefill_spread"], row.extra["latency"]["decode_spread"]) > NOISY_SPREAD]
        turns = timed[0].extra["latency"]["turns"]
        lines.append(f"Speeds: the best of {turns} turns, the models measured in turns." + (
            f" Noise: the turns of {', '.join(noisy)} differed by more than {100 * (NOISY_SPREAD - 1):.0f}% "
            f"(a busy machine?), so compare speeds with care." if noisy else ""))
    for row in rows:
        if row.extra.get("latency_from"):
            lines.append(f"{row.label}'s speed is {row.extra['latency_from']}'s (same architecture, measured once).")
    return "\n".join(lines)


def _absolute_table(row: Evaluation) -> str:
    """One model on its own: its figures, and no ratios (a model compared with itself says nothing)."""
    return "\n".join([
        "| model | perplexity | size MB | prefill ms | decode tok/s |",
        "|---|---:|---:|---:|---:|",
        f"| {row.label} | {_fmt(row.perplexity, '.3f')} | {row.size_bytes / 2**20:.1f} | {_fmt(row.prefill_ms, '.1f')} | "
        f"{_fmt(row.decode_tokens_per_s, '.1f')} |",
    ])


def grouped_float_reasons(kept_float: dict[str, str]) -> list[tuple[str, int, str]]:
    """``(layer pattern, count, reason)`` for the layers kept float, one entry per reason.

    Layer names that differ only in their block index (``model.layers.3.x``)
    are shown once as ``model.layers.*.x``.
    """
    import re

    by_reason: dict[str, list[str]] = {}
    for name, reason in kept_float.items():
        by_reason.setdefault(reason, []).append(name)
    groups = []
    for reason, names in by_reason.items():
        patterns = sorted({re.sub(r"\.\d+\.", ".*.", name) for name in names})
        groups.append((", ".join(patterns), len(names), reason))
    return groups


def layer_summary(layers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts for the quantizability report: layers and parameters quantized vs kept float."""
    quantized = [layer for layer in layers if layer["quantized"]]
    kept = [layer for layer in layers if not layer["quantized"]]
    total_params = sum(layer["parameters"] for layer in layers) or 1
    return {
        "layers_quantized": len(quantized),
        "layers_float": len(kept),
        "parameters_quantized": sum(layer["parameters"] for layer in quantized),
        "parameters_quantized_share": sum(layer["parameters"] for layer in quantized) / total_params,
        "kept_float": {layer["name"]: layer["reason"] for layer in kept},
        "schemes": sorted({layer["scheme"] for layer in quantized}),
    }


def _bar_label(value: float) -> str:
    """A bar's number: plain digits (never ``7.06e+03``), decimals only where they say something."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def render_chart(rows: Sequence[Evaluation], title: str, *, baseline: Evaluation | None = None) -> bytes:
    """A four-panel bar chart (perplexity, size, prefill, decode) as PNG bytes.

    With a ``baseline`` the perplexity panel shows the change against it in
    percent: absolute perplexities of a pretrained and a fine-tuned model differ
    so much that the quantization loss would not show.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row.label for row in rows]
    colors = ["#7f8c8d", "#2980b9", "#c0392b", "#27ae60", "#8e44ad", "#d35400"][: len(rows)]
    if baseline is not None and baseline.perplexity and baseline in rows:
        # the baseline and what was compared with it: rows before it (the pretrained
        # model) differ by so much that the quantization loss would be a sliver
        first = rows.index(baseline)
        quality = (f"perplexity Δ % vs {baseline.label} (lower is better)", labels[first:], colors[first:],
                   [100 * (row.perplexity / baseline.perplexity - 1) if row.perplexity else 0 for row in rows[first:]])
    else:
        quality = ("held-out perplexity (lower is better)", labels, colors, [row.perplexity or 0 for row in rows])
    panels = [
        quality,
        ("size MB", labels, colors, [row.size_bytes / 2**20 for row in rows]),
        ("prefill ms, 1×256 (lower is better)", labels, colors, [row.prefill_ms or 0 for row in rows]),
        ("decode tokens/s (higher is better)", labels, colors, [row.decode_tokens_per_s or 0 for row in rows]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.2))
    for axis, (name, labels, colors, values) in zip(axes, panels):
        bars = axis.bar(range(len(values)), values, color=colors)
        axis.set_title(name, fontsize=10)
        axis.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
        axis.margins(y=0.18)  # room for the numbers above (or below) the bars
        axis.axhline(0, color="#333333", linewidth=0.6)
        for bar, value in zip(bars, values):
            axis.annotate(_bar_label(value), (bar.get_x() + bar.get_width() / 2, value),
                          xytext=(0, 3 if value >= 0 else -3), textcoords="offset points",
                          ha="center", va="bottom" if value >= 0 else "top", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(directory: str | Path, report: dict[str, Any], rows: Sequence[Evaluation], *, title: str) -> dict[str, Path]:
    """Write report.json, report.md and report.png atomically into ``directory``."""
    directory = Path(directory)
    paths = {"json": directory / "report.json", "markdown": directory / "report.md", "chart": directory / "report.png"}
    atomic_write_json(paths["json"], report)
    summary = report.get("layers_summary")
    baseline = next((row for row in rows if row.label == report.get("baseline")), None)
    text = [f"# {title}", "", markdown_table(rows, baseline=baseline), ""]
    if summary:
        text += [
            f"Quantized {summary['layers_quantized']} layers ({100 * summary['parameters_quantized_share']:.1f}% of "
            f"Linear parameters); kept in float: {summary['layers_float']}.",
            "",
        ]
        for pattern, count, reason in grouped_float_reasons(summary["kept_float"]):
            layers = f"{count} layers" if count > 1 else "1 layer"
            text.append(f"- {layers} (`{pattern}`) stay float: {reason}")
    atomic_write_text(paths["markdown"], "\n".join(text) + "\n")
    atomic_write_bytes(paths["chart"], render_chart(rows, title, baseline=baseline))
    return paths
