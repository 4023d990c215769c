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
# shellcheck source=../go-cached-build.sh
source "$here/../go-cached-build.sh"

kube_version=$(required "$here/go.mod" k8s.io/kubernetes)
etcd_version=$(required "$here/etcd/go.mod" go.etcd.io/etcd/server/v3)
if [[ -z "$kube_version" || -z "$etcd_version" ]]; then
  echo "build.sh: cannot read the pinned versions from $here/go.mod and $here/etcd/go.mod" >&2
  exit 1
fi

cache=${MONSOON_K8S_CACHE:-$HOME/.cache/monsoon/k8s}
dir="$cache/$kube_version-etcd-$etcd_version"
binaries=(etcd kube-apiserver kube-controller-manager)

complete() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$dir/bin/$b" ]] || return 1; done
}

cached_build_begin "the control plane" 1.26
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
cached_build_finish
