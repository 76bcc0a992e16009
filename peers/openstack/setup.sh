#!/usr/bin/env bash
# Idempotent: the OpenStack peer's venvs under .peers/openstack/, from the pinned requirements.
# A venv whose stamp matches its requirements file and interpreter is left alone, so a second run
# returns at once.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENVS="${GOVBROKER_OPENSTACK_VENVS:-$ROOT/.peers/openstack}"
PYTHON="${PYTHON:-python3}"

build() {  # build <venv name> <requirements file>
    local venv="$VENVS/$1" reqs="$HERE/$2"
    local want
    want="$(sha256sum "$reqs" | cut -d' ' -f1) $("$PYTHON" -c 'import sys; print(sys.version)' | head -n1)"
    if [ -x "$venv/bin/python" ] && [ "$(cat "$venv/.govbroker-stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    echo "openstack peer: installing $1 venv (a few minutes on a fresh machine)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$reqs" \
        >"$venv.install.log" 2>&1; then
        # pip's warnings about this machine's local index mirrors are noise here
        grep -v "^WARNING: Location" "$venv.install.log" >&2
        echo "openstack peer: installing the $1 venv failed (log: $venv.install.log)" >&2
        return 1
    fi
    "$venv/bin/python" -m pip check
    echo "$want" >"$venv/.govbroker-stamp"
}

mkdir -p "$VENVS"
build nova requirements-nova.txt &
nova=$!
build glance requirements-glance.txt &
glance=$!
wait "$nova"
wait "$glance"
echo "openstack peer: venvs ready in $VENVS"
