#!/usr/bin/env bash
# Start the local PostgreSQL cluster if it is not accepting connections (CI machines
# may come up without it). Fails loudly: the test suite runs on PostgreSQL too.
set -euo pipefail
if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then exit 0; fi
if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
for _ in $(seq 1 30); do
    if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then exit 0; fi
    sleep 1
done
echo "PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started" >&2
exit 1
