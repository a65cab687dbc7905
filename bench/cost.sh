#!/usr/bin/env bash
# bench/cost.sh [SECONDS] [CONNS] - CPU cost of the shim per small request (user and system µs), which
# is steadier than req/s on a shared machine: the shim's own CPU time divided by the requests it served.
# Extra shim flags go in SHIM_ARGS; SHIM_ENV is prefixed to its command line (e.g. RUST_LOG=off);
# CAPTURE=1 adds --capture in a fresh directory of the run's own.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5} conns=${2:-16}
T=target/release
tmp=$(mktemp -d)
trap 'kill $up $shim 2>/dev/null; rm -rf "$tmp"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port=$(free_port); shim_port=$(free_port)
$T/examples/bench-upstream "$up_port" & up=$!
# The inspector on a port of its own unless SHIM_ARGS says otherwise (the default port may be taken).
inspect="--inspect 127.0.0.1:$(free_port)"
case "${SHIM_ARGS:-}" in *--inspect\ *) inspect= ;; esac
capture=
[ -n "${CAPTURE:-}" ] && capture="--capture $tmp/capture"
env ${SHIM_ENV:-} ${SHIM_BIN:-$T/glance-shim} --listen "$shim_port" --upstream "$up_port" --log-file "$tmp/shim.log" $inspect $capture ${SHIM_ARGS:-} & shim=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$shim_port) 2>/dev/null && break; sleep 0.05; done
wrk -t2 -c"$conns" -d1s "http://127.0.0.1:$shim_port/small" >/dev/null
tck=$(getconf CLK_TCK)
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$shim/stat)
out=$(wrk -t2 -c"$conns" -d"${secs}s" "http://127.0.0.1:$shim_port/small")
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$shim/stat)
n=$(awk '/requests in/ {print $1}' <<<"$out")
rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
awk -v n="$n" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$tck" -v rps="$rps" \
    'BEGIN { printf "%d requests, %.0f req/s; shim CPU per request: user %.2f us, system %.2f us, total %.2f us\n", n, rps, u/t*1e6/n, s/t*1e6/n, (u+s)/t*1e6/n }'
