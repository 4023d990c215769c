# Sourced by tools/k8s/build.sh and tools/prometheus/build.sh: building Go binaries once into a
# cache directory keyed by their versions, one build at a time per directory.
#
#   required GO_MOD MODULE           the version a go.mod requires of MODULE
#   cached_build_begin WHAT GO_NEEDED
#                                    with $dir and a function `complete` (true once $bin holds
#                                    every binary) set by the caller: prints $bin and exits when
#                                    complete; else takes the directory's lock, checks again,
#                                    and sets $staging (build into it) and $started
#   cached_build_finish              moves $staging into $bin, prints the time taken and $bin
#
# The binaries are cached; Go's build cache for them need not be (the control plane's grows by
# ~3.7 GB; CI machines may have little disk): unless the caller chose a GOCACHE, the build uses
# a private one, deleted afterwards. Static builds (CGO_ENABLED=0), the local Go toolchain.

# `module version` of a require line in a go.mod (one-line or inside a block).
required() {
  awk -v m="$2" '($1 == m || ($1 == "require" && $2 == m)) { print ($1 == m ? $2 : $3); exit }' "$1"
}

cached_build_begin() {
  local what=$1 go_needed=$2
  bin="$dir/bin"
  if complete; then
    echo "$bin"
    exit 0
  fi
  command -v go >/dev/null || { echo "build.sh: Go is needed to build $what (go version >= $go_needed)" >&2; exit 1; }
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
  private_gocache=
  if [[ -z "${GOCACHE:-}" ]]; then
    private_gocache=$(mktemp -d "$dir/.gocache.XXXXXX")
    export GOCACHE=$private_gocache
  fi
  trap 'rm -rf "$staging" ${private_gocache:+"$private_gocache"}' EXIT
  started=$(date +%s)
}

cached_build_finish() {
  rm -rf "$bin"
  mv "$staging" "$bin"
  trap - EXIT
  if [[ -n "$private_gocache" ]]; then
    rm -rf "$private_gocache"
  fi
  echo "build.sh: built in $(($(date +%s) - started)) s" >&2
  echo "$bin"
}
