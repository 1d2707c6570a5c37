#!/usr/bin/env bash
# Debian's Chromium for the playground's end-to-end test (driven by playwright with this executable;
# playwright's own browser download is never used). Safe to run again; prints the executable.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq chromium >&2
fi
command -v chromium
