#!/usr/bin/env bash
# Create or reuse .venv and install modeltailor with torch 2.13.0 (CPU) pinned, with the
# ExecuTorch and OpenVINO device runtimes (the "runtimes" extra).
# torch is named on the same pip line as everything else so no dependency can
# pull another (multi-GB CUDA) torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
fi
if ! .venv/bin/python -c "import modeltailor, torch, pytest" 2>/dev/null \
    || [ pyproject.toml -nt .venv/.modeltailor-installed ]; then
    .venv/bin/pip install -q "torch==2.13.0" -e ".[dev,runtimes]"
    touch .venv/.modeltailor-installed
fi
