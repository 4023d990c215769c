#!/usr/bin/env bash
# Builds the test control plane's binaries — kube-apiserver, kube-controller-manager (from
# k8s.io/kubernetes, module ./go.mod) and etcd (from go.etcd.io/etcd/server/v3, module
# ./etcd/go.mod) — static (CGO_ENABLED=0), into a cache keyed by their versions:
#
#   ${MONSOON_K8S_CACHE:-$HOME/.cache/monsoon/k8s}/<kube>-etcd-<etcd>/bin/
#
# and prints that directory. Does nothing when the binaries are already there. The versions
# come from the two go.mod files (their only home); crates/testkit/src/control_plane.rs reads
# them the same way to find the binaries.
#
# Measured on the project's 2-core machine with Go 1.26.8, others building beside it: cold (empty
# Go module and build caches) 8 min 48 s wall, 9 min 38 s CPU; ~200 MB of module zips downloaded
# (720 MB in the module cache, ~/go/pkg/mod), 3.7 GB of Go build cache (~/.cache/go-build), 200 MB
# of binaries. With the module cache warm: 10.5 min wall under heavier load, the same CPU. Warm
# (binaries cached): 13 ms.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# `module version` of a require line in a go.mod (one-line or inside a block).
required() {
  awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == m ? $2 : $3); exit }' "$1"
}
kube_version=$(required "$here/go.mod" k8s.io/kubernetes)
etcd_version=$(required "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)
if [[ -z "$kube_version" || -z "$etcd_version" ]]; then
  echo "build.sh: cannot read the pinned versions from $here/go.mod and $here/etcd/go.mod" >&2
  exit 1
fi

cache=${MONSOON_K8S_CACHE:-$HOME/.cache/monsoon/k8s}
dir="$cache/$kube_version-etcd-$etcd_version"
bin="$dir/bin"
binaries=(etcd kube-apiserver kube-controller-manager)

complete() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || return 1; done
}

if complete; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: Go is needed to build the control plane (go version >= 1.26)" >&2; exit 1; }
mkdir -p "$dir"
# One build at a time per version (two test runs, or make -j, may ask at once).
exec 9>"$dir/.lock"
flock 9
if complete; then
  echo "$bin"
  exit 0
fi

export CGO_ENABLED=0 GOWORK=off GOTOOLCHAIN=local
staging=$(mktemp -d "$dir/.build.XXXXXX")
chmod 755 "$staging"
# Go's build cache grows by ~3.7 GB for these binaries, which are themselves cached: unless the
# caller chose a GOCACHE, build with a private one and delete it afterwards (CI machines may
# have little disk).
private_gocache=
if [[ -z "${GOCACHE:-}" ]]; then
  private_gocache=$(mktemp -d "$dir/.gocache.XXXXXX")
  export GOCACHE=$private_gocache
fi
trap 'rm -rf "$staging" ${private_gocache:+"$private_gocache"}' EXIT
started=$(date +%s)
echo "build.sh: building kube-apiserver, kube-controller-manager $kube_version and etcd $etcd_version into $bin (a cold build takes minutes)" >&2

# As Kubernetes' own release build (hack/lib/golang.sh, hack/lib/version.sh): the version
# through -X so the binaries do not report v0.0.0, stripped, trimmed paths, the same tags.
major=${kube_version#v}; major=${major%%.*}
minor=${kube_version#v*.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done
(cd "$here" && go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "all=$ldflags" -o "$staging/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)

# etcd's module root is its main package; its version is a constant, GitSHA names the source.
(cd "$here/etcd" && go build -trimpath -ldflags "-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-$etcd_version" \
  -o "$staging/etcd" go.etcd.io/etcd/server/v3)

"$staging/kube-apiserver" --version >&2
# sed reads all of it: `head -1` could close the pipe early, and with pipefail the
# SIGPIPE etcd then gets would fail the build.
"$staging/etcd" --version | sed -n 1p >&2
rm -rf "$bin"
mv "$staging" "$bin"
trap - EXIT
if [[ -n "$private_gocache" ]]; then
  rm -rf "$private_gocache"
fi
echo "build.sh: built in $(($(date +%s) - started)) s" >&2
echo "$bin"
