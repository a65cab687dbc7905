# gunicorn settings for placement under a debugger, behind glance-shim's uwsgi front (docs/uwsgi.md).
# Used by the "placement (gunicorn)" configuration in deploy/vscode/launch.json through
# GUNICORN_CMD_ARGS="-c THIS_FILE": the settings go in a file and not on gunicorn's command line
# because the service parses sys.argv with oslo.config, and any argument gunicorn leaves there makes
# its worker exit 2 in a loop.
#
#   sudo systemctl stop devstack@placement-api
#   sudo glance-shim --takeover placement        # Apache's socket for /placement -> 127.0.0.1:8778
#   (start this configuration in VS Code; or, in the service's venv:)
#   GUNICORN_CMD_ARGS="-c /opt/stack/glance-shim/deploy/gunicorn/placement.py" /opt/stack/data/venv/bin/gunicorn
#
# Put DevStack back: stop the debugger and glance-shim (it removes its socket), then
#   sudo systemctl start devstack@placement-api
# placement reads /etc/placement/placement.conf (OS_PLACEMENT_CONFIG_DIR names another directory).
# Releases whose DevStack runs a *-wsgi script instead (Zed) have no placement.wsgi.api: use the
# function that script calls (its last lines), e.g. wsgi_app = "placement.wsgi:init_application()".
wsgi_app = "placement.wsgi.api:application"
bind = "127.0.0.1:8778"
# One process, so every request reaches the debugger; no worker timeout, so a breakpoint does not
# get the worker killed.
workers = 1
timeout = 0
# Where Apache mounts the service: gunicorn takes SCRIPT_NAME from the environment and strips it from
# the path, as uWSGI did with Apache's SCRIPT_NAME.
raw_env = ["SCRIPT_NAME=/placement"]
# gunicorn 25.1 and later open a control socket at one path per user by default; two debug servers
# at once would fight over it.
control_socket_disable = True
accesslog = "-"
