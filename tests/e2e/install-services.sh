#!/usr/bin/env bash
# tests/e2e/install-services.sh - the venv of the real keystone and placement the suite runs under
# gunicorn (tests/e2e/services.py), installed once and reused.
#
#   venv-services: keystone 30.0.0 and openstack-placement 16.0.0 (OpenStack 2026.2), gunicorn 27.0.1,
#                  python-openstackclient 10.5.0 and osc-placement 4.9.1 (the `openstack` CLI with the
#                  placement commands); sqlite is Python's own, so no database server is needed.
#
# The venv lives in $GLANCE_SHIM_E2E_CACHE (default ~/.cache/glance-shim-e2e) and is reused when the
# marker inside says it was built from the same constraints file. Versions are pinned by
# constraints-services.txt next to this script. About 80 s to build on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${GLANCE_SHIM_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/glance-shim-e2e}
python=${PYTHON:-python3}
log() { echo "[e2e install-services] $*" >&2; }

"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || { log "$python is older than 3.11; keystone 30 and placement 16 need 3.10+, the suite 3.11"; exit 1; }

constraints=$here/constraints-services.txt
packages=(keystone==30.0.0 openstack-placement==16.0.0 gunicorn==27.0.1 python-openstackclient==10.5.0
          osc-placement==4.9.1)
venv=$cache/venv-services
want="$("$python" -V 2>&1) $(sha256sum < "$constraints" | cut -c1-16) ${packages[*]}"
if [ -f "$venv/.installed" ] && [ "$(cat "$venv/.installed")" = "$want" ]; then
    log "$venv is up to date"
    exit 0
fi
log "building $venv: ${packages[*]}"
start=$SECONDS
rm -rf "$venv"
mkdir -p "$cache"
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -c "$constraints" "${packages[@]}"
echo "$want" > "$venv/.installed"
log "built $venv in $((SECONDS - start)) s"
