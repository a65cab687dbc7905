# gunicorn settings for neutron under a debugger, behind glance-shim's uwsgi front (docs/uwsgi.md).
# Used by the "neutron (gunicorn)" configuration in deploy/vscode/launch.json through
# GUNICORN_CMD_ARGS="-c THIS_FILE": the settings go in a file and not on gunicorn's command line
# because the service parses sys.argv with oslo.config, and any argument gunicorn leaves there makes
# its worker exit 2 in a loop.
#
#   sudo systemctl stop devstack@neutron-api
#   sudo glance-shim --takeover neutron        # Apache's socket for /networking -> 127.0.0.1:9696
#   (start this configuration in VS Code; or, in the service's venv:)
#   GUNICORN_CMD_ARGS="-c /opt/stack/glance-shim/deploy/gunicorn/neutron.py" /opt/stack/data/venv/bin/gunicorn
#
# Put DevStack back: stop the debugger and glance-shim (it removes its socket), then
#   sudo systemctl start devstack@neutron-api
# neutron-api reads /etc/neutron/neutron.conf; copy any `env =` line of
# /etc/neutron/neutron-api-uwsgi.ini into raw_env below. Older releases run neutron-server
# (devstack@q-svc) with eventlet, not uWSGI: debug it directly, without glance-shim.
wsgi_app = "neutron.wsgi.api:application"
bind = "127.0.0.1:9696"
# One process, so every request reaches the debugger; no worker timeout, so a breakpoint does not
# get the worker killed.
workers = 1
timeout = 0
# Where Apache mounts the service: gunicorn takes SCRIPT_NAME from the environment and strips it from
# the path, as uWSGI did with Apache's SCRIPT_NAME.
raw_env = ["SCRIPT_NAME=/networking"]
# gunicorn 25.1 and later open a control socket at one path per user by default; two debug servers
# at once would fight over it.
control_socket_disable = True
accesslog = "-"
