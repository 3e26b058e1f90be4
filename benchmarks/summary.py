"""The ratio table of a benchmark run: medians, and speed-ups over fp32 and bf16 of the same group.

Every benchmark group (one shape, token count and thread count; or one model
measurement) holds an ``fp32`` and a ``bf16`` entry measured in the same run,
so ratios stay meaningful on a noisy machine where absolute times do not.

Used by ``benchmarks/conftest.py`` at the end of a run, and standalone on a
saved pytest-benchmark JSON file::

    python benchmarks/summary.py .benchmarks/ftq-last.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping

__all__ = ["cpu_mhz", "amx_int8_peak_tops", "summary_rows", "format_table"]


def cpu_mhz() -> float | None:
    """The clock /proc/cpuinfo reports (under a hypervisor: the nominal/TSC clock)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def amx_int8_peak_tops(threads: int, mhz: float | None = None) -> float | None:
    """AMX int8 peak in TOP/s: 1024 int8 MACs = 2048 ops per cycle per core, times cores, times clock.

    One thread per core is assumed (the machines here have no SMT siblings).
    """
    mhz = mhz if mhz is not None else cpu_mhz()
    if not mhz:
        return None
    return 2048 * threads * mhz * 1e6 / 1e12


def _speedup(base: float | None, value: float) -> str:
    return f"{base / value:.2f}x" if base else "-"


def summary_rows(benchmarks: Iterable[Mapping]) -> list[dict]:
    """One row per benchmark with its median and ratios to the group's fp32 and bf16.

    ``benchmarks`` are pytest-benchmark dicts (``group``, ``stats.median``,
    ``extra_info`` with ``variant`` and, for linear layers, ``ops``).
    """
    groups: dict[str, list[Mapping]] = {}
    for bench in benchmarks:
        groups.setdefault(bench["group"] or "", []).append(bench)
    rows = []
    for group, members in groups.items():
        medians = {m["extra_info"].get("variant"): m["stats"]["median"] for m in members}
        for bench in members:
            info, median = bench["extra_info"], bench["stats"]["median"]
            row = {
                "group": group,
                "variant": info.get("variant", bench["name"]),
                "median_ms": median * 1e3,
                "vs_fp32": _speedup(medians.get("fp32"), median),
                "vs_bf16": _speedup(medians.get("bf16"), median),
                "note": "",
            }
            if info.get("ops"):
                tops = info["ops"] / median / 1e12
                peak = amx_int8_peak_tops(info.get("threads", 1))
                int8 = row["variant"] not in ("fp32", "bf16")
                row["note"] = f"{tops:.2f} TOP/s" + (f" = {100 * tops / peak:.0f}% of AMX int8 peak" if peak and int8 else "")
            if info.get("new_tokens"):
                row["note"] = f"{info['new_tokens'] / median:.1f} tokens/s"
            if info.get("loop"):  # rows run through a decode loop: also vs the lean fp32 and bf16 loops
                bases = [base for base in ("fp32-lean", "bf16-lean") if medians.get(base)]
                notes = [f"{_speedup(medians[base], median)} vs {base}" for base in bases]
                row["note"] = "; ".join(([row["note"]] if row["note"] else []) + notes)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of :func:`summary_rows`."""
    lines = [
        "| group | variant | median ms | vs fp32 | vs bf16 | note |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['group']} | {row['variant']} | {row['median_ms']:.3f} | {row['vs_fp32']} | {row['vs_bf16']} | {row['note']} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/summary.py RESULTS.json", file=sys.stderr)
        return 2
    data = json.loads(Path(argv[0]).read_text())
    print(format_table(summary_rows(data["benchmarks"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
