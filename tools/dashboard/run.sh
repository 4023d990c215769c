#!/usr/bin/env bash
# The dashboard picture, in one command (`make dashboard-picture` calls it): builds what it needs
# and runs tools/dashboard/run.py, which runs monsoon against the stand-ins for about ten minutes
# with Prometheus scraping it, then draws charts/monsoon/dashboards/monsoon.json from that
# Prometheus with tools/dashboard/render.py into docs/dashboard.png.
#
#   tools/dashboard/run.sh [run.py options: --minutes 10 --out docs/dashboard.png --keep ...]
#
# Needs: the project's .venv (`make venv`: the stand-ins), Go (Prometheus is built from its
# module by tools/prometheus/build.sh, cached), Python 3 (matplotlib and pymongo go into a venv
# of this tool's own, ${MONSOON_DASHBOARD_VENV:-~/.cache/monsoon/dashboard/venv}), and the
# monsoon binary: $MONSOON_BIN, or `cargo build --workspace --bins` here. Not part of
# `make test`: it takes minutes and draws a picture, it checks nothing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

prometheus_bin=$("$root/tools/prometheus/build.sh")/prometheus

venv=${MONSOON_DASHBOARD_VENV:-$HOME/.cache/monsoon/dashboard/venv}
stamp="$venv/.installed-$(sha256sum "$here/requirements.txt" | cut -c1-16)"
if [[ ! -e "$stamp" ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$here/requirements.txt"
  touch "$stamp"
fi

make --no-print-directory venv

if [[ -z "${MONSOON_BIN:-}" ]]; then
  cargo build --workspace --bins
  target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  MONSOON_BIN=$target/debug/monsoon
fi

exec "$venv/bin/python" "$here/run.py" --monsoon "$MONSOON_BIN" --prometheus "$prometheus_bin" "$@"
