#!/usr/bin/env bash
# shellcheck disable=SC2016  # $lt, $set, ... in single quotes are MongoDB operators, not shell
# The operator on a real cluster: builds the image from the Dockerfile, installs manifests/ into
# a new kind cluster, and follows one SyncPipeline (e2e/kind/pipeline.yaml, two workers) from a
# real MongoDB replica set to a real Elasticsearch 8 (e2e/kind/backends.yaml):
#   snapshot (500 documents written before the pipeline) and stream (500 after) -> 1000 in the
#   index; updates and deletes; a deleted worker pod while writes go on; and
#   `kubectl delete syncpipeline` removing the worker StatefulSet.
# Prints PASS or FAIL (with the operator's and workers' logs); deletes the cluster at the end
# unless KEEP_CLUSTER=1.
# Needs docker (with a running engine), kind and kubectl. Where one is missing this prints
# SKIPPED and why, and exits 0 without claiming a pass.
# Settings: E2E_TIMEOUT (seconds for each wait, default 300), KIND_CLUSTER_NAME (default
# monsoon-e2e; an existing cluster of that name is never touched).
set -Eeuo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
  echo "SKIPPED: e2e needs docker, kind and kubectl (missing: ${missing[*]}); nothing was tested, nothing passed."
  exit 0
fi
if ! docker info >/dev/null 2>&1; then
  echo "SKIPPED: e2e needs a running Docker engine (docker info failed); nothing was tested, nothing passed."
  exit 0
fi

CLUSTER=${KIND_CLUSTER_NAME:-monsoon-e2e}
# A tag no registry serves: the nodes get it from `kind load`, so a pull would fail loudly.
IMAGE=monsoon.local/monsoon:e2e
TIMEOUT=${E2E_TIMEOUT:-300}
NS=e2e                   # MongoDB, Elasticsearch, the pipeline and its workers
OPERATOR_NS=monsoon-system
PIPELINE=shop
WORK=$(mktemp -d)
export KUBECONFIG="$WORK/kubeconfig"   # never the user's own kubeconfig
CREATED=
RESULT=FAIL

diagnostics() {
  echo "---- diagnostics"
  kubectl get pods,statefulsets,services,syncpipelines -n "$NS" -o wide 2>&1 || true
  kubectl get pods,leases -n "$OPERATOR_NS" -o wide 2>&1 || true
  kubectl get syncpipeline "$PIPELINE" -n "$NS" -o yaml 2>&1 | sed -n '/^status:/,$p' || true
  kubectl get events -n "$NS" --sort-by=.lastTimestamp 2>&1 | tail -25 || true
  echo "---- operator log"
  kubectl logs -n "$OPERATOR_NS" deploy/monsoon --tail=80 2>&1 || true
  for pod in $(kubectl get pods -n "$NS" -o name 2>/dev/null | grep -v -e mongodb -e elasticsearch || true); do
    echo "---- $pod log"
    kubectl logs -n "$NS" "$pod" --tail=40 2>&1 || true
  done
}

cleanup() {
  trap - ERR
  if [[ $RESULT != PASS && -n $CREATED ]]; then diagnostics; fi
  if [[ -n $CREATED ]]; then
    if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
      echo "kept the cluster: kind export kubeconfig --name $CLUSTER; delete it with kind delete cluster --name $CLUSTER"
    else
      kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    fi
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*"
  exit 1
}
trap 'fail "command failed (line $LINENO): $BASH_COMMAND"' ERR

step() { echo "== $*"; }

# wait_until DESCRIPTION COMMAND...: runs COMMAND every 2 s until it succeeds, at most TIMEOUT s.
wait_until() {
  local what=$1 deadline=$((SECONDS + TIMEOUT))
  shift
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out after ${TIMEOUT}s waiting for $what"
    sleep 2
  done
}

mongo() { kubectl -n "$NS" exec deploy/mongodb -- mongosh --quiet --eval "$1"; }
mongo_is_primary() { [[ $(mongo 'db.hello().isWritablePrimary') == true ]]; }
es() { kubectl -n "$NS" exec deploy/elasticsearch -- curl -s "$@"; }
# Documents in the index shop.orders (matching a query string if given); empty if no index.
es_count() {
  es -XPOST "localhost:9200/shop.orders/_refresh" >/dev/null 2>&1 || true
  es "localhost:9200/shop.orders/_count${1:+?q=$1}" 2>/dev/null | sed -nE 's/.*"count":([0-9]+).*/\1/p' || true
}

# expect_docs TOTAL CHANGED: waits until shop.orders holds exactly TOTAL documents, CHANGED of
# them with s=changed.
expect_docs() {
  local want=$1 want_changed=$2 got changed deadline=$((SECONDS + TIMEOUT))
  while :; do
    got=$(es_count)
    changed=$(es_count 's:changed')
    if [[ $got == "$want" && $changed == "$want_changed" ]]; then
      echo "   shop.orders: $got documents, $changed updated"
      return 0
    fi
    ((SECONDS < deadline)) ||
      fail "expected $want documents ($want_changed updated) in shop.orders, got ${got:-no index} (${changed:-?} updated) after ${TIMEOUT}s"
    sleep 2
  done
}

# The worker StatefulSets: those owned by the SyncPipeline.
worker_statefulsets() {
  kubectl -n "$NS" get statefulsets -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.metadata.ownerReferences[*].kind}{"/"}{.metadata.ownerReferences[*].name}{"\n"}{end}' |
    awk -v owner="SyncPipeline/$PIPELINE" '$2 == owner {print $1}'
}
workers_ready() {
  local sts spec ready total=0
  for sts in $(worker_statefulsets); do
    spec=$(kubectl -n "$NS" get statefulset "$sts" -o jsonpath='{.spec.replicas}')
    ready=$(kubectl -n "$NS" get statefulset "$sts" -o jsonpath='{.status.readyReplicas}')
    [[ ${ready:-0} == "$spec" ]] || return 1
    total=$((total + spec))
  done
  ((total == 2))   # workers: 2 in e2e/kind/pipeline.yaml
}
no_worker_statefulsets() { [[ -z $(worker_statefulsets) ]]; }
lease_exists() { kubectl -n "$OPERATOR_NS" get lease monsoon; }
pod_uid() { kubectl -n "$NS" get pod "$1" -o jsonpath='{.metadata.uid}'; }
pod_replaced() { local uid; uid=$(pod_uid "$1") && [[ -n $uid && $uid != "$2" ]]; }

echo "e2e/kind.sh: $(kind version); kubectl $(kubectl version --client -o yaml | sed -n 's/^ *gitVersion: //p' | head -1)"

step "kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  fail "a kind cluster named $CLUSTER exists already; delete it (kind delete cluster --name $CLUSTER) or set KIND_CLUSTER_NAME"
fi
CREATED=1
kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG" --wait 180s

step "image $IMAGE (Dockerfile, a release build: several minutes)"
DOCKER_BUILDKIT=1 docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

step "install: crds/ and manifests/ (image replaced by $IMAGE)"
mkdir "$WORK/manifests"
cp manifests/*.yaml "$WORK/manifests/"
default_image=$(sed -nE 's/^ *image: "?(ghcr\.io\/monsoon-dev\/monsoon:[^"]+)"?$/\1/p' manifests/02-operator.yaml | head -1)
[[ -n $default_image ]] || fail "no ghcr.io/monsoon-dev/monsoon image in manifests/02-operator.yaml"
sed "s#$default_image#$IMAGE#g" manifests/02-operator.yaml >"$WORK/manifests/02-operator.yaml"
[[ $(grep -c "$IMAGE" "$WORK/manifests/02-operator.yaml") == 2 ]] ||
  fail "expected the operator image and --worker-image to be replaced by $IMAGE"
kubectl apply -f crds/
kubectl wait --for=condition=Established crd/syncpipelines.monsoon.dev --timeout=60s
kubectl apply -f "$WORK/manifests/"
kubectl -n "$OPERATOR_NS" rollout status deployment/monsoon --timeout="${TIMEOUT}s"
wait_until "the operator's Lease monsoon (named after the release)" lease_exists
kubectl get --raw "/api/v1/namespaces/$OPERATOR_NS/services/monsoon:http/proxy/metrics" | grep -q '^# TYPE' ||
  fail "the operator's Service serves no Prometheus metrics on port http"
echo "   operator ready, Lease held, /metrics served"

step "MongoDB replica set and Elasticsearch in namespace $NS"
kubectl apply -f e2e/kind/backends.yaml
kubectl -n "$NS" rollout status deployment/mongodb --timeout="${TIMEOUT}s"
wait_until "MongoDB to answer" mongo 'db.runCommand({ping: 1}).ok'
# The only member is registered as 127.0.0.1: clients connect with directConnection=true.
mongo "rs.initiate({_id: 'rs0', members: [{_id: 0, host: '127.0.0.1:27017'}]})" >/dev/null
wait_until "MongoDB to become primary" mongo_is_primary
kubectl -n "$NS" rollout status deployment/elasticsearch --timeout="${TIMEOUT}s"

step "500 documents before the pipeline (snapshot), the pipeline, 500 after (stream)"
mongo 'const d = []; for (let i = 0; i < 500; i++) d.push({_id: i, n: i, s: "x" + i}); db.getSiblingDB("shop").orders.insertMany(d)' >/dev/null
kubectl apply -f e2e/kind/pipeline.yaml
wait_until "two ready worker pods of SyncPipeline $PIPELINE" workers_ready
STATEFULSETS=$(worker_statefulsets)
echo "   worker StatefulSets: $STATEFULSETS"
mongo 'const d = []; for (let i = 500; i < 1000; i++) d.push({_id: i, n: i, s: "x" + i}); db.getSiblingDB("shop").orders.insertMany(d)' >/dev/null
expect_docs 1000 0

step "updates and deletes"
mongo 'const o = db.getSiblingDB("shop").orders; o.updateMany({_id: {$lt: 100}}, {$set: {s: "changed"}}); o.deleteMany({_id: {$gte: 900}})' >/dev/null
expect_docs 900 100

step "a worker pod deleted while writes go on"
victim="$(echo "$STATEFULSETS" | head -1)-0"
uid=$(pod_uid "$victim")
kubectl -n "$NS" delete pod "$victim" --wait=false
mongo 'const o = db.getSiblingDB("shop").orders; const d = []; for (let i = 1000; i < 1200; i++) d.push({_id: i, n: i, s: "x" + i}); o.insertMany(d); o.updateMany({_id: {$gte: 100, $lt: 150}}, {$set: {s: "changed"}})' >/dev/null
wait_until "worker pod $victim to be replaced" pod_replaced "$victim" "$uid"
wait_until "two ready worker pods again" workers_ready
expect_docs 1100 150

step "kubectl delete syncpipeline removes the workers"
kubectl -n "$NS" delete syncpipeline "$PIPELINE" --timeout="${TIMEOUT}s"
wait_until "the worker StatefulSets ($STATEFULSETS) to be deleted" no_worker_statefulsets
for sts in $STATEFULSETS; do
  [[ -z $(kubectl -n "$NS" get statefulset "$sts" --ignore-not-found -o name) ]] ||
    fail "StatefulSet $sts still exists after the SyncPipeline was deleted"
done
echo "   SyncPipeline and worker StatefulSets gone"

RESULT=PASS
echo "PASS: e2e on kind: operator installed from manifests/, 1000 documents synced by 2 workers (snapshot and stream), updates, deletes and a lost worker converged, clean-up on delete"
