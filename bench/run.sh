#!/usr/bin/env bash
# bench/run.sh [run.py options] - build, install the peers and load tools if missing, run the benchmark.
#   Debian: wrk, curl, nginx (and its Lua module), haproxy, socat; PyPI (a venv in ~/.cache/glance-shim-bench): mitmproxy.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in wrk curl nginx haproxy socat; do
    command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] || need+=("$tool")
done
# nginx as the upstream (--upstream-kind nginx) reads uploads with Lua.
[ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || need+=(libnginx-mod-http-lua)
if ((${#need[@]})); then
    echo "bench: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The packages' own services are not used: the benchmark starts private instances.
    for service in nginx haproxy; do
        if command -v systemctl >/dev/null && systemctl is-active --quiet "$service" 2>/dev/null; then
            systemctl stop "$service" || true
        fi
    done
fi
venv=${XDG_CACHE_HOME:-$HOME/.cache}/glance-shim-bench/venv-mitmproxy
if [ ! -x "$venv/bin/mitmdump" ]; then
    echo "bench: installing mitmproxy into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "mitmproxy==11.0.2"
fi
cargo build --release --quiet --bin glance-shim --example bench-upstream --example bench-hyper-alone
exec python3 bench/run.py --mitmdump "$venv/bin/mitmdump" "$@"
