#!/usr/bin/env bash
# Build the vCenter simulator peer into .peers/bin/govbroker-vcsim (git-ignored).
#
# Needs the Debian packages golang-go and golang-github-vmware-govmomi-dev (govmomi's simulator
# as Go source in /usr/share/gocode). Builds in GOPATH mode with the network off, and only when
# main.go is newer than the binary; concurrent callers (pytest-xdist workers) wait for one build.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
src="$here/src/govbroker-vcsim/main.go"
out="$root/.peers/bin/govbroker-vcsim"
gocode="${GOVBROKER_GOCODE:-/usr/share/gocode}"

fresh() { [[ -x "$out" && ! "$src" -nt "$out" ]]; }

if fresh; then
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "vcsim build: go is missing (apt-get install -y golang-go golang-github-vmware-govmomi-dev)" >&2
    exit 1
fi
if [[ ! -d "$gocode/src/github.com/vmware/govmomi/simulator" ]]; then
    echo "vcsim build: govmomi sources are missing in $gocode (apt-get install -y golang-github-vmware-govmomi-dev)" >&2
    exit 1
fi

mkdir -p "$root/.peers/bin" "$root/.peers/cache"
exec 9>"$root/.peers/cache/vcsim-build.lock"
flock 9
# another caller may have finished the build while this one waited for the lock
if fresh; then
    exit 0
fi

tmp="$(mktemp "$out.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
# A repo-local build cache works without $HOME and never touches the user's own.
GOPATH="$here:$gocode" GO111MODULE=off GOFLAGS= GOPROXY=off \
    GOCACHE="${GOCACHE:-$root/.peers/cache/go-build}" \
    go build -o "$tmp" govbroker-vcsim
chmod +x "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "vcsim build: built $out" >&2
