#!/usr/bin/env bash
# Builds Prometheus from its Go module (github.com/prometheus/prometheus/cmd/prometheus, through
# our module ./go.mod) into a cache keyed by its version:
#
#   ${MONSOON_PROMETHEUS_CACHE:-$HOME/.cache/monsoon/prometheus}/<version>/bin/prometheus
#
# and prints that directory. Does nothing when the binary is already there. Used by
# tools/dashboard/run.sh (the dashboard picture); not part of `make test`.
#
# Built without the `builtinassets` tag (no web UI: tools/dashboard only uses the HTTP API, and
# the UI's assets are not in the Go module) and with `remove_all_sd` (only static, file and HTTP
# service discovery: no cloud SDKs to compile).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# `module version` of a require line in a go.mod (one-line or inside a block).
required() {
  awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == m ? $2 : $3); exit }' "$1"
}
version=$(required "$here/go.mod" github.com/prometheus/prometheus)
if [[ -z "$version" ]]; then
  echo "build.sh: cannot read the pinned Prometheus version from $here/go.mod" >&2
  exit 1
fi
# Module v0.3XX.Y is Prometheus 3.XX.Y (v0.316.0 is 3.16.0): `prometheus --version` shows it.
minor=${version#v0.}; patch=${minor#*.}; minor=${minor%%.*}
release=$((minor / 100)).$((minor % 100)).$patch

cache=${MONSOON_PROMETHEUS_CACHE:-$HOME/.cache/monsoon/prometheus}
dir="$cache/$version"
bin="$dir/bin"

if [[ -x "$bin/prometheus" ]]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: Go is needed to build Prometheus (go version >= 1.26.7)" >&2; exit 1; }
mkdir -p "$dir"
exec 9>"$dir/.lock"
flock 9
if [[ -x "$bin/prometheus" ]]; then
  echo "$bin"
  exit 0
fi

export CGO_ENABLED=0 GOWORK=off GOTOOLCHAIN=local
staging=$(mktemp -d "$dir/.build.XXXXXX")
chmod 755 "$staging"
# The binary is cached; Go's build cache for it need not be: unless the caller chose a GOCACHE,
# build with a private one and delete it afterwards.
private_gocache=
if [[ -z "${GOCACHE:-}" ]]; then
  private_gocache=$(mktemp -d "$dir/.gocache.XXXXXX")
  export GOCACHE=$private_gocache
fi
trap 'rm -rf "$staging" ${private_gocache:+"$private_gocache"}' EXIT
started=$(date +%s)
echo "build.sh: building Prometheus $release (module $version) into $bin (a cold build takes minutes)" >&2

# As Prometheus' own release build (.promu.yml): the version through -X, netgo; stripped.
v=github.com/prometheus/common/version
ldflags="-s -w -X $v.Version=$release -X $v.Revision=module-$version -X $v.Branch=module -X $v.BuildUser=monsoon -X $v.BuildDate=$(date -u +%Y%m%d-%H:%M:%S)"
(cd "$here" && go build -trimpath -tags netgo,remove_all_sd -ldflags "$ldflags" -o "$staging/" \
  github.com/prometheus/prometheus/cmd/prometheus)

"$staging/prometheus" --version | sed -n 1p >&2
rm -rf "$bin"
mv "$staging" "$bin"
trap - EXIT
if [[ -n "$private_gocache" ]]; then
  rm -rf "$private_gocache"
fi
echo "build.sh: built in $(($(date +%s) - started)) s" >&2
echo "$bin"
