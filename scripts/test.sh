#!/usr/bin/env bash
# Set up (venv, torch pinned), start PostgreSQL if needed, then ruff, mypy and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure_postgres.sh
bash scripts/ensure_test_tools.sh
.venv/bin/ruff check .
.venv/bin/mypy compression latency_models agents engine service db modeltailor
.venv/bin/pytest -n 2 --dist loadfile --no-loadscope-reorder -p no:cacheprovider --durations=40 "$@"
