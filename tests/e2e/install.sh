#!/usr/bin/env bash
# tests/e2e/install.sh - everything the end-to-end suite needs, installed once and reused.
#
#   Debian packages: apache2 (a private instance is started from its binary and modules), curl.
#   venv-32: glance 32.0.0, whose `glance-api` console script is the eventlet server a developer runs
#            by hand with workers = 0; python-glanceclient 4.13.0, python-openstackclient 10.5.0.
#   venv-25: glance 25.0.0 (Zed, the release the DevStack debugging recipe was written for), its
#            eventlet `glance-api`; Zed's python-openstackclient 6.0.0 and python-glanceclient 4.13.0
#            (constraints-25.txt says why that one is newer than Zed's).
#   venv-33: glance 33.0.0, which runs only under a WSGI server: uWSGI (http-socket, as DevStack runs
#            it) and gunicorn (as a debugger launches it, --timeout 0); the same clients.
#
# Venvs live in $GLANCE_SHIM_E2E_CACHE (default ~/.cache/glance-shim-e2e) and are reused when the
# marker inside says they were built from the same constraints file. Versions are pinned by
# constraints-25.txt / constraints-32.txt / constraints-33.txt next to this script.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${GLANCE_SHIM_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/glance-shim-e2e}
python=${PYTHON:-python3}
log() { echo "[e2e install] $*" >&2; }

need=()
# Debian's apache2 ships mod_proxy_uwsgi too (the uwsgi front's scenario).
[ -x /usr/sbin/apache2 ] && [ -f /usr/lib/apache2/modules/mod_proxy_http.so ] \
    && [ -f /usr/lib/apache2/modules/mod_proxy_uwsgi.so ] || need+=(apache2)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
    log "apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The package's own service is not ours to run: the suite starts a private instance.
    if command -v systemctl >/dev/null && systemctl is-active --quiet apache2 2>/dev/null; then
        systemctl stop apache2 || true
    fi
fi

"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || { log "$python is older than 3.11; glance 33 needs 3.11"; exit 1; }

install_venv() { # NAME CONSTRAINTS PACKAGES...
    local name=$1 constraints=$2; shift 2
    local venv=$cache/venv-$name
    local want
    want="$("$python" -V 2>&1) $(sha256sum < "$constraints" | cut -c1-16) $*"
    if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ]; then
        log "$venv is up to date"
        return
    fi
    log "building $venv: $*"
    local start=$SECONDS
    rm -rf "$venv"
    mkdir -p "$cache"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -c "$constraints" "$@"
    echo "$want" > "$venv/.installed"
    log "built $venv in $((SECONDS - start)) s"
}

clients=(python-glanceclient==4.13.0 python-openstackclient==10.5.0)
# glance 32 reads [oslo_policy] enforce_scope on every image create; oslo.policy 6 removed it
# (HTTP 500 NoSuchOptError), hence the pin in constraints-32.txt.
install_venv 32 "$here/constraints-32.txt" glance==32.0.0 "${clients[@]}" &
p32=$!
# uWSGI is built from source here (gcc and the Python headers are on the machine).
install_venv 33 "$here/constraints-33.txt" glance==33.0.0 uwsgi==2.0.31 gunicorn==27.0.1 "${clients[@]}" &
p33=$!
wait $p32
wait $p33
install_venv 25 "$here/constraints-25.txt" glance==25.0.0 python-glanceclient==4.13.0 python-openstackclient==6.0.0
