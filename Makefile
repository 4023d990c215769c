# monsoon: the single entry points. CI calls the same targets.
SHELL := /bin/bash
VENV := .venv
PY := python3
# Stand-ins for tests and the demo: third-party servers speaking the real protocols.
SECANTUSDB := secantusdb==0.7.0b3
NOIDA := noida-db==0.2.3
# Install checks (tests/check_manifests.py, charts/render.py). kubernetes-validate ships the
# Kubernetes API schemas (1.25 to 1.37), so validation needs no network once installed;
# cel-python evaluates the CRD's CEL rules (x-kubernetes-validations) as the API server would.
KUBERNETES_VALIDATE := kubernetes-validate==1.37.0
PYYAML := PyYAML==6.0.3
CEL_PYTHON := cel-python==0.5.0
# Runs the chart's Argo CD health check (charts/monsoon/argocd-health.lua) on sample statuses
# in tests/check_manifests.py (Argo CD runs it with gopher-lua, a Lua 5.1; the script keeps to
# what both accept).
LUPA := lupa==2.8
# A DNS server serving SRV and TXT records, for the `mongodb+srv://` tests (crates/testkit/py/srv_dns.py).
DNSLIB := dnslib==0.9.26
# Recomputes AWS SigV4 signatures in the signature-checking proxy in front of noida-db, the
# test double of Amazon OpenSearch Service's front door (crates/testkit/py/sigv4_proxy.py).
BOTOCORE := botocore==1.44.18
CARGO ?= cargo
# Where cargo puts what it builds: honours CARGO_TARGET_DIR and build.target-dir in a cargo
# config, as cargo itself does (many developers share one target directory).
TARGET_DIR = $(shell $(CARGO) metadata --format-version 1 --no-deps 2>/dev/null | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

.PHONY: all build venv test unit integration demo bench hot-code crds check-crds check-manifests manifests lint e2e opensearch k8s-bins dashboard-picture clean

all: build

build:
	$(CARGO) build --release -p monsoon

# Project-local Python venv holding the stand-in servers and the install checks (idempotent;
# reinstalls when this Makefile, and so a pin, changes).
venv: $(VENV)/.installed
$(VENV)/.installed: Makefile
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check '$(SECANTUSDB)' '$(NOIDA)' '$(KUBERNETES_VALIDATE)' '$(PYYAML)' '$(CEL_PYTHON)' '$(DNSLIB)' '$(LUPA)' '$(BOTOCORE)'
	touch $@

# Everything CI runs: the install checks (chart, manifests/, examples and the objects the
# operator renders for the cluster examples, against the Kubernetes API schemas), then unit,
# property and integration tests against the stand-ins, a real OpenSearch node and a real
# Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager built from Go modules).
RENDERED = $(TARGET_DIR)/rendered
CLUSTER_EXAMPLES := shop k8s-with-secrets k8s-sharded k8s-aws-opensearch
# One build for everything: `--workspace` with the tests' feature set, which also builds the
# monsoon binary the render step uses. (A `-p monsoon` build unifies features differently and
# compiles every dependency a second time.)
test: venv opensearch k8s-bins
	$(CARGO) test --workspace --no-run -q
	rm -rf $(RENDERED) && mkdir -p $(RENDERED)
	for f in $(CLUSTER_EXAMPLES); do $(TARGET_DIR)/debug/monsoon render -f examples/$$f.yaml --namespace shop > $(RENDERED)/$$f.yaml || exit 1; done
	MONSOON_RENDERED_DIR=$(RENDERED) $(VENV)/bin/python tests/check_manifests.py
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2

# A real OpenSearch node for the tests (tools/opensearch): the server and its modules from Maven
# Central, started in-process by a small Java main; built once per version into
# ${MONSOON_OPENSEARCH_CACHE:-~/.cache/monsoon/opensearch}/<version>, skipped when present.
opensearch:
	./tools/opensearch/build.sh

unit:
	$(CARGO) test --workspace --lib --bins

crds:
	$(CARGO) build -q --workspace --bins
	$(TARGET_DIR)/debug/monsoon crd > crds/syncpipeline.yaml
	$(MAKE) manifests

# The plain-YAML install (manifests/) and the chart's CRD copy, generated from charts/monsoon
# and crds/ by charts/render.py.
manifests: venv
	$(VENV)/bin/python charts/render.py

# The chart, manifests/ and e2e objects: CRD copies, freshness, Kubernetes API schemas
# (strict), and what the operator needs (RBAC, arguments, probes). MONSOON_RENDERED_DIR=dir
# also checks every *.yaml under dir.
check-manifests: venv
	$(VENV)/bin/python tests/check_manifests.py

# Starts the stand-ins, seeds a shop database, runs `monsoon run` on examples/shop.yaml,
# shows the synced indexes, a search and live changes, then stops everything.
demo: venv
	$(CARGO) build --workspace --bins
	$(TARGET_DIR)/debug/monsoon-demo $(TARGET_DIR)/debug/monsoon

# Figures as ratios against baselines measured in the same run (see crates/bench). Sections
# hot, noida, opensearch (the real node: make opensearch) and scripts, all by default;
# BENCH_ARGS="--only hot,scripts" or "--skip opensearch" chooses.
# BENCH_ARGS="--docs 200000 --stream 100000 --backlog 1000000 --script-docs 40000" by default.
BENCH_ARGS ?=
bench: venv opensearch
	$(CARGO) build --release -p monsoon -p monsoon-bench
	$(TARGET_DIR)/release/monsoon-bench $(TARGET_DIR)/release/monsoon $(BENCH_ARGS)

# tools/hot-code/monsoon.txt: the functions a plain pipeline runs, which the release link lays
# out together (tools/hot-code/cc.sh, named as the linker in .cargo/config.toml). Run as root
# (it turns read-ahead off while it runs the bench's `noida` section) after changes that move
# the plain path's code, and commit the list.
hot-code: venv
	$(CARGO) build --release -p monsoon -p monsoon-bench
	tools/hot-code/collect.py

# The test control plane's binaries (etcd, kube-apiserver, kube-controller-manager for
# crates/testkit/src/control_plane.rs), built from Go modules (tools/k8s) into a cache keyed by
# version, ${MONSOON_K8S_CACHE:-~/.cache/monsoon/k8s}; does nothing when they are there.
k8s-bins:
	tools/k8s/build.sh

# docs/dashboard.png: the Grafana dashboard (charts/monsoon/dashboards/monsoon.json) drawn from a
# real Prometheus over a ten-minute run of the operator and its workers against the stand-ins
# (tools/dashboard/run.sh; Prometheus built from its Go module by tools/prometheus). Not part of
# `test`: it takes about a quarter of an hour and checks nothing. DASHBOARD_ARGS="--minutes 3".
DASHBOARD_ARGS ?=
dashboard-picture: venv k8s-bins
	tools/dashboard/run.sh $(DASHBOARD_ARGS)

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Real servers and a real cluster; needs Docker (each script says SKIPPED, and passes
# nothing, where its tools are missing). run.sh: `monsoon run` against MongoDB and
# Elasticsearch containers. kind.sh: the image, manifests/ and a SyncPipeline on a kind cluster.
e2e:
	./e2e/run.sh
	./e2e/kind.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV) .demo
