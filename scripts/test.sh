#!/usr/bin/env bash
# The full test suite, on SQLite and PostgreSQL, with lint and import contracts, against the real
# peers (../shared/PEERS.md): libvirt's test driver (in-process), the vCenter simulator (built
# here, started by each pytest worker) and OpenStack (Keystone, Placement, Glance, Nova with the
# fake virt driver; started here once and stopped afterwards). A peer that fails to start fails
# the run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

# PostgreSQL runs on this kind of machine already; start it if it has stopped
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    echo "test: starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi

peers/vcsim/build.sh
peers/openstack/setup.sh
openstack_state="$(mktemp -d -t govbroker-openstack.XXXXXX)"
stop_openstack() {
    .peers/openstack/nova/bin/python peers/openstack/peer.py stop "$openstack_state" >/dev/null 2>&1 || true
    rm -rf "$openstack_state"
}
trap stop_openstack EXIT
echo "test: starting the OpenStack peer (about a minute)"
.peers/openstack/nova/bin/python peers/openstack/peer.py start "$openstack_state" >/dev/null
export GOVBROKER_TEST_OPENSTACK="$openstack_state/peer.json"

.venv/bin/python -m pytest -n "${GOVBROKER_TEST_WORKERS:-2}" -q "$@"
