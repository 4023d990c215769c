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
# shellcheck source=../go-cached-build.sh
source "$here/../go-cached-build.sh"

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

complete() {
  [[ -x "$dir/bin/prometheus" ]]
}

cached_build_begin Prometheus 1.26.7
echo "build.sh: building Prometheus $release (module $version) into $bin (a cold build takes minutes)" >&2

# As Prometheus' own release build (.promu.yml): the version through -X, netgo; stripped.
v=github.com/prometheus/common/version
ldflags="-s -w -X $v.Version=$release -X $v.Revision=module-$version -X $v.Branch=module -X $v.BuildUser=monsoon -X $v.BuildDate=$(date -u +%Y%m%d-%H:%M:%S)"
(cd "$here" && go build -trimpath -tags netgo,remove_all_sd -ldflags "$ldflags" -o "$staging/" \
  github.com/prometheus/prometheus/cmd/prometheus)

"$staging/prometheus" --version | sed -n 1p >&2
cached_build_finish
