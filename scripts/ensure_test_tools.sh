#!/usr/bin/env bash
# Install the system tools the test suite drives: Chromium (dashboard browser tests) and
# docker-compose (validates docker-compose.yml with `docker-compose config`; no engine needed).
# Exit status is non-zero, with the reason on stderr, if either cannot be installed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

"$here/ensure_chromium.sh" >/dev/null

if ! command -v docker-compose >/dev/null; then
  if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "ensure_test_tools: docker-compose is missing and cannot be installed here (need root and apt-get)" >&2
    exit 1
  fi
  echo "ensure_test_tools: installing the Debian package 'docker-compose'..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || { echo "ensure_test_tools: apt-get update failed" >&2; exit 1; }
  apt-get install -y -qq --no-install-recommends docker-compose >&2 \
    || { echo "ensure_test_tools: apt-get install docker-compose failed" >&2; exit 1; }
fi
docker-compose --version >&2
