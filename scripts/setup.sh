#!/usr/bin/env bash
# Idempotent set-up of everything govbroker needs on a fresh machine of this kind (Debian 12,
# Python 3.11, root): system packages, the virtualenv, the package with its dev group.
set -euo pipefail
cd "$(dirname "$0")/.."

# python3-venv: the project venv; libvirt-dev, pkg-config, gcc, python3-dev: building libvirt-python;
# golang-go and govmomi's Go sources: building the vCenter simulator the tests talk to
# poppler-utils: pdftotext and pdftoppm, with which tests read and render exported statements;
# fonts-arphic-uming: a CJK font poppler substitutes for the PDF's (unembedded) STSong-Light
APT_PACKAGES=(python3-venv libvirt-dev pkg-config gcc python3-dev golang-go golang-github-vmware-govmomi-dev poppler-utils fonts-arphic-uming)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PYTHON" -m venv .venv
fi
# dependency groups (PEP 735) need pip 25.1 or newer
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade "pip>=25.1"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[openstack,vmware,libvirt]" --group dev
echo "setup: ready ($(.venv/bin/python --version))"
