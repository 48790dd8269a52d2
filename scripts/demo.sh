#!/usr/bin/env bash
# Set up, start the server on its embedded default (SQLite + local pool + this CPU),
# run the demo searches against it, then keep serving the dashboard until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MODELTAILOR_DATA_DIR="${MODELTAILOR_DATA_DIR:-$HOME/.modeltailor}"
PORT="${PORT:-8000}"
.venv/bin/modeltailor serve --port "$PORT" > "$MODELTAILOR_DATA_DIR.serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    if curl -fs "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 || curl -fs "http://127.0.0.1:$PORT/docs" >/dev/null 2>&1; then break; fi
    if ! kill -0 $SERVER 2>/dev/null; then cat "$MODELTAILOR_DATA_DIR.serve.log"; exit 1; fi
    sleep 1
done
echo "server up: http://127.0.0.1:$PORT  (log: $MODELTAILOR_DATA_DIR.serve.log)"
.venv/bin/modeltailor demo --server "http://127.0.0.1:$PORT" "$@"
if [ -z "${CI:-}" ] && [ -t 0 ]; then
    echo "Dashboard at http://127.0.0.1:$PORT/ — Ctrl-C to stop the server."
    wait $SERVER
fi
