# tests/lib/venv.sh - sourced by the test scripts that run Python: `venv_with DIR PACKAGE==VERSION
# [DEBIAN-PACKAGE...]` makes a venv in DIR holding PACKAGE at VERSION (with its extras, if the
# requirement names any), installing python3, python3-venv and the Debian packages given through apt
# when they are missing (as root, or with sudo).

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "$0: installing needs root: $*" >&2
        exit 1
    fi
}

venv_with() {
    local venv=$1 requirement=$2
    shift 2
    local missing=()
    for deb in "$@"; do
        dpkg -s "$deb" >/dev/null 2>&1 || missing+=("$deb")
    done
    command -v python3 >/dev/null || missing+=(python3)
    if [ ! -x "$venv/bin/python" ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
        missing+=(python3-venv)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "$0: apt-get install ${missing[*]}" >&2
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    local name=${requirement%%==*} version=${requirement##*==}
    name=${name%%[*}
    if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('$name') != '$version')" 2>/dev/null; then
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$requirement"
    fi
}
