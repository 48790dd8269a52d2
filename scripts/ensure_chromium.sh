#!/usr/bin/env bash
# Make sure a headless-capable Chromium is installed (Debian package `chromium`) and print its path.
# The dashboard's browser tests call this; it fails loudly instead of letting them skip.
set -euo pipefail

find_chromium() {
  command -v chromium || command -v chromium-browser || true
}

path="$(find_chromium)"
if [[ -z "$path" ]]; then
  if [[ "$(id -u)" -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "ensure_chromium: chromium is missing and cannot be installed here (need root and apt-get);" \
         "install the Debian package 'chromium'" >&2
    exit 1
  fi
  echo "ensure_chromium: installing the Debian package 'chromium'..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2 || { echo "ensure_chromium: apt-get update failed" >&2; exit 1; }
  apt-get install -y -qq chromium >&2 || { echo "ensure_chromium: apt-get install chromium failed" >&2; exit 1; }
  path="$(find_chromium)"
fi
if [[ -z "$path" ]]; then
  echo "ensure_chromium: chromium still not found after installing it" >&2
  exit 1
fi
"$path" --version >&2
echo "$path"
