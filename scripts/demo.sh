#!/usr/bin/env bash
# Set up, seed the embedded demo (SQLite + simulator) and serve it on 127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/govbroker demo "$@"
