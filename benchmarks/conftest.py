"""Shared setup of the speed benchmarks: thread counts, quick mode, the ratio table.

Run (full)::

    python -m pytest benchmarks --benchmark-only --benchmark-autosave --benchmark-json=.benchmarks/ftq-last.json

``FTQ_BENCH_QUICK=1`` runs a handful of shapes on one thread count with few
rounds (well under a minute; CI runs it and asserts nothing on timings).
At the end the run prints, and writes to ``.benchmarks/ftq-table.md``, a table
of medians with speed-ups over the fp32 and bf16 entries of the same group.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from summary import cpu_mhz, format_table, summary_rows

os.environ.setdefault("FTQ_LOAD_PLUGINS", "")  # built-in plugins only, as in the tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUICK = os.environ.get("FTQ_BENCH_QUICK", "") not in ("", "0")
REPO = Path(__file__).resolve().parent.parent


def thread_counts() -> list[int]:
    """1 and 2 threads (what the machine has, at most); quick mode: 1 thread only."""
    cores = os.cpu_count() or 1
    return [1] if QUICK else sorted({1, min(2, cores)})


def pedantic(benchmark, fn, *, setup=None, budget_s: float = 0.6, max_rounds: int = 30, min_rounds: int = 3):
    """Time ``fn`` for about ``budget_s`` seconds (fewer rounds for slow cases), after one warm-up call.

    One call per round: the kernels here run from microseconds to a second, and
    a round count fitted to each keeps a full run to minutes.
    """
    args = setup() if setup else ((), {})
    start = time.perf_counter()
    fn(*args[0], **args[1])  # warm-up: first-call allocations, kernel selection, packing
    once = time.perf_counter() - start
    if QUICK:
        max_rounds, min_rounds = min(max_rounds, 5), 2
    rounds = max(min_rounds, min(max_rounds, int(budget_s / max(once, 1e-6))))
    if setup is None:
        return benchmark.pedantic(fn, rounds=rounds, iterations=1)
    return benchmark.pedantic(fn, setup=setup, rounds=rounds)


@pytest.fixture
def threads(request):
    """Set torch's intra-op thread count for one benchmark and restore it afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    import torch

    rows = summary_rows(bench.as_dict(include_data=False) for bench in session.benchmarks if bench)
    table = format_table(rows)
    header = (
        f"torch {torch.__version__}; cpu MHz {cpu_mhz()}; speed-up = fp32 (or bf16) median / this median, "
        f"same group, same run"
    )
    terminalreporter.write_sep("=", "ftq speed table")
    terminalreporter.write_line(header)
    terminalreporter.write_line(table)
    out = REPO / ".benchmarks"
    out.mkdir(exist_ok=True)
    (out / "ftq-table.md").write_text(header + "\n\n" + table + "\n")

