#!/usr/bin/env bash
# bench/callgrind.sh [REQUESTS] - instructions the shim executes per small request, counted by
# valgrind's callgrind (repeatable, unlike timings on a shared machine), and the top functions.
# Needs ab (apache2-utils). Set CALLGRIND_PATH=/large?bytes=N to profile a large transfer instead, or
# CALLGRIND_UPLOAD=BYTES to POST a body of that size to /upload (the split is then also given per 64 KiB);
# SHIM_BIN picks the binary (by default a release build with line tables, in target/profiling, which
# executes the same instructions and lets bench/phases.py see inlined code) and SHIM_ARGS adds flags
# (e.g. SHIM_ARGS="--inspect off"). HYPER_ALONE=1 counts bench-hyper-alone instead (bench/hyper_alone.rs:
# the libraries with nothing of the shim's), without the split by phase.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
path=${CALLGRIND_PATH:-/small}
T=target/release
tmp=$(mktemp -d)
trap 'kill $up 2>/dev/null; rm -rf "$tmp"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up_port=$(free_port); shim_port=$(free_port)
if [ -n "${HYPER_ALONE:-}" ]; then
    cargo build --release --quiet --example bench-hyper-alone
elif [ -z "${SHIM_BIN:-}" ]; then
    CARGO_PROFILE_RELEASE_DEBUG=line-tables-only cargo build --release --quiet --target-dir target/profiling --bin glance-shim
fi
bin=${SHIM_BIN:-target/profiling/release/glance-shim}
# The inspector on a port of its own unless SHIM_ARGS says otherwise (the default port may be taken).
inspect="--inspect 127.0.0.1:$(free_port)"
case "${SHIM_ARGS:-}" in *--inspect\ *) inspect= ;; esac
cmd=("$bin" --listen "$shim_port" --upstream "$up_port" --log-file "$tmp/shim.log" $inspect ${SHIM_ARGS:-})
[ -n "${HYPER_ALONE:-}" ] && cmd=("$T/examples/bench-hyper-alone" "$shim_port" "$up_port")
$T/examples/bench-upstream "$up_port" & up=$!
valgrind --tool=callgrind --callgrind-out-file="$tmp/idle.out" "${cmd[@]}" 2>"$tmp/vg-idle.err" & vg=$!
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$shim_port) 2>/dev/null && break; sleep 0.05; done
kill -TERM $vg; wait $vg || true
env ${SHIM_ENV:-} valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" "${cmd[@]}" 2>"$tmp/vg.err" & vg=$!
for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$shim_port) 2>/dev/null && break; sleep 0.05; done
post=()
if [ -n "${CALLGRIND_UPLOAD:-}" ]; then
    head -c "$CALLGRIND_UPLOAD" /dev/urandom >"$tmp/body"
    post=(-p "$tmp/body" -T application/octet-stream)
    path=/upload
fi
ab -q -k -n "$n" -c "${CALLGRIND_CONNS:-16}" "${post[@]}" "http://127.0.0.1:$shim_port$path" | grep -E "Complete requests|Failed requests"
kill -TERM $vg; wait $vg || true
total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}'; }
idle=$(total "$tmp/idle.out"); all=$(total "$tmp/cg.out")
echo "instructions per request: $(( (all - idle) / n )) (start-up and shutdown, $idle, subtracted)"
[ -n "${HYPER_ALONE:-}" ] || python3 bench/phases.py "$tmp/cg.out" "$n" "$idle" ${CALLGRIND_UPLOAD:+"$CALLGRIND_UPLOAD"}
cp "$tmp/cg.out" /tmp/last-callgrind.out; callgrind_annotate "$tmp/cg.out" 2>/dev/null | grep -E '^ *[0-9,]+ \(' | sed -n 2,16p | cut -c1-160
