#!/usr/bin/env bash
# bench/run.sh [run.py options] - build, install the load tools if missing, run the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
    echo "bench: installing ${need[*]}" >&2
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet --bin glance-shim --example bench-upstream
exec python3 bench/run.py "$@"
