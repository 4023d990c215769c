# monsoon: the single entry points. CI calls the same targets.
SHELL := /bin/bash
VENV := .venv
PY := python3
# Stand-ins for tests and the demo: third-party servers speaking the real protocols.
SECANTUSDB := secantusdb==0.7.0b3
NOIDA := noida-db==0.2.3
CARGO ?= cargo

.PHONY: all build venv test unit integration demo bench crds check-crds lint e2e clean

all: build

build:
	$(CARGO) build --release -p monsoon

# Project-local Python venv holding the stand-in servers (idempotent).
venv: $(VENV)/.installed
$(VENV)/.installed:
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check '$(SECANTUSDB)' '$(NOIDA)'
	touch $@

# Everything CI runs: unit, property and integration tests against the stand-ins.
test: venv
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2

unit:
	$(CARGO) test --workspace --lib --bins

crds:
	$(CARGO) run -q -p monsoon -- crd > crds/syncpipeline.yaml

# Starts the stand-ins, seeds a shop database, runs `monsoon run` on examples/shop.yaml,
# shows the synced indexes, a search and live changes, then stops everything.
demo: venv
	$(CARGO) build -p monsoon -p monsoon-testkit --bins
	target/debug/monsoon-demo target/debug/monsoon

# Figures as ratios against baselines measured in the same run (see crates/bench).
# BENCH_ARGS="--docs 200000 --stream 100000 --backlog 1000000" by default.
BENCH_ARGS ?=
bench: venv
	$(CARGO) build --release -p monsoon -p monsoon-bench
	target/release/monsoon-bench target/release/monsoon $(BENCH_ARGS)

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Real cluster (kind + MongoDB + Elasticsearch); needs Docker.
e2e:
	./e2e/run.sh

clean:
	$(CARGO) clean
	rm -rf $(VENV) .demo
