#!/usr/bin/env bash
# The full test suite, on SQLite and PostgreSQL, with lint and import contracts.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# PostgreSQL runs on this kind of machine already; start it if it has stopped
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    echo "test: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

exec .venv/bin/python -m pytest -n "${GOVBROKER_TEST_WORKERS:-2}" -q "$@"
