"""Real keystone and placement for the end-to-end suite, each under gunicorn with sqlite, as a
developer runs an OpenStack API service under a debugger: one worker, timeout 0, the service's own
WSGI module, SCRIPT_NAME set to where Apache mounts it (/identity, /placement).

The venv comes from tests/e2e/install-services.sh (keystone 30.0.0, openstack-placement 16.0.0,
gunicorn 27.0.1, pinned by constraints-services.txt). Standard library only.

gunicorn takes its settings from a generated gunicorn.conf.py in the service's run directory and is
started with NO arguments from there (gunicorn reads ./gunicorn.conf.py by default): keystone's WSGI
module calls oslo.config's CONF() without args, which parses sys.argv, so any gunicorn argument
(`-c FILE`, `--bind ...`, the app path) makes every worker exit 2, and gunicorn restarts it forever.
"""

import getpass
import grp
import http.client
import os
import shlex
import signal
import socket
import subprocess
import time

KEYSTONE_APP = "keystone.wsgi.api:application"
PLACEMENT_APP = "placement.wsgi.api:application"
ADMIN_PASSWORD = "secret"
REGION = "RegionOne"

# Everything talks to 127.0.0.1: never let a proxy variable divert it, nor an OS_* variable of the
# caller's reach the services or the clients.
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.lower().endswith("_proxy") and not k.startswith("OS_") and k != "GUNICORN_CMD_ARGS"}
BASE_ENV["NO_PROXY"] = BASE_ENV["no_proxy"] = "127.0.0.1,localhost"


def _bin(venv, name):
    return os.path.join(venv, "bin", name)


def _tail(path, lines=30):
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f"\n--- last lines of {path}:\n" + "".join(f.readlines()[-lines:])


def _run(cmd, env, what):
    out = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"{what}: {shlex.join(cmd)} exited with {out.returncode}\n{out.stdout}{out.stderr}")
    return out


def _dirs(state_dir, *names):
    for n in names:
        os.makedirs(os.path.join(state_dir, n), exist_ok=True)


def keystone_setup(venv, state_dir, public_url):
    """keystone.conf (sqlite, fernet and credential key repositories, debug log) under state_dir, the
    database, the keys, and `keystone-manage bootstrap` (admin / secret, RegionOne, the identity
    endpoints all = public_url). Returns (conf path, log path)."""
    state_dir = os.path.abspath(state_dir)
    _dirs(state_dir, "etc", "log", "fernet-keys", "credential-keys")
    for d in ("fernet-keys", "credential-keys"):
        os.chmod(os.path.join(state_dir, d), 0o700)
    conf = os.path.join(state_dir, "etc", "keystone.conf")
    log = os.path.join(state_dir, "log", "keystone.log")
    with open(conf, "w") as f:
        # The default oslo.log logging_context_format_string puts [global_request_id request_id
        # user_identity] on every line of a request.
        f.write(f"""[DEFAULT]
debug = true
log_file = {log}

[database]
connection = sqlite:///{state_dir}/keystone.sqlite

[token]
provider = fernet

[fernet_tokens]
key_repository = {state_dir}/fernet-keys

[credential]
key_repository = {state_dir}/credential-keys
""")
    user = getpass.getuser()
    group = grp.getgrgid(os.getgid()).gr_name
    manage = [_bin(venv, "keystone-manage"), "--config-file", conf]
    env = dict(BASE_ENV)
    _run([*manage, "db_sync"], env, "keystone db_sync")
    _run([*manage, "fernet_setup", "--keystone-user", user, "--keystone-group", group], env, "keystone fernet_setup")
    _run([*manage, "credential_setup", "--keystone-user", user, "--keystone-group", group], env,
         "keystone credential_setup")
    _run([*manage, "bootstrap", "--bootstrap-password", ADMIN_PASSWORD, "--bootstrap-region-id", REGION,
          "--bootstrap-admin-url", public_url, "--bootstrap-internal-url", public_url,
          "--bootstrap-public-url", public_url], env, "keystone bootstrap")
    return conf, log


def placement_setup(venv, state_dir):
    """placement.conf (noauth2, sqlite, debug log) under state_dir and `placement-manage db sync`.
    Returns (conf path, log path)."""
    state_dir = os.path.abspath(state_dir)
    _dirs(state_dir, "etc", "log")
    conf = os.path.join(state_dir, "etc", "placement.conf")
    log = os.path.join(state_dir, "log", "placement.log")
    with open(conf, "w") as f:
        f.write(f"""[DEFAULT]
debug = true
log_file = {log}

[api]
# No keystone: X-Auth-Token USER[:PROJECT] is the identity; "admin" gets the admin role.
auth_strategy = noauth2

[placement_database]
connection = sqlite:///{state_dir}/placement.sqlite
""")
    _run([_bin(venv, "placement-manage"), "--config-file", conf, "db", "sync"], dict(BASE_ENV), "placement db sync")
    return conf, log


def write_gunicorn_conf(run_dir, wsgi_app, port, script_name, env):
    """run_dir/gunicorn.conf.py: the whole gunicorn configuration, so gunicorn runs with no argument.
    env: variables for the worker's environment (raw_env)."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "gunicorn.conf.py")
    raw_env = [f"SCRIPT_NAME={script_name}"] + [f"{k}={v}" for k, v in env.items()]
    with open(path, "w") as f:
        f.write(f"""# Generated by tests/e2e/services.py. Run `gunicorn` with no arguments from this directory:
# the app parses sys.argv with oslo.config, and any gunicorn argument makes the worker exit 2.
wsgi_app = {wsgi_app!r}
bind = {f"127.0.0.1:{port}"!r}
workers = 1
# A request may sit at a breakpoint for as long as the developer likes.
timeout = 0
raw_env = {raw_env!r}
# gunicorn >= 25.1 opens a control socket at $XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl by default,
# one path shared by every gunicorn of the user: two services at once would fight over it.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
loglevel = "info"
""")
    return path


def _gunicorn(venv, state_dir, name, wsgi_app, port, script_name, app_env, log):
    state_dir = os.path.abspath(state_dir)
    run_dir = os.path.join(state_dir, f"gunicorn-{name}")
    write_gunicorn_conf(run_dir, wsgi_app, port, script_name, app_env)
    out_path = os.path.join(state_dir, "log", f"gunicorn-{name}.out")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        raise RuntimeError(f"127.0.0.1:{port} is already in use")
    except OSError:
        pass
    # Also in the process environment, so the config is found whichever way the app is loaded.
    env = dict(BASE_ENV, SCRIPT_NAME=script_name, **app_env)
    start = os.path.getsize(out_path) if os.path.exists(out_path) else 0
    out = open(out_path, "ab")
    proc = subprocess.Popen([_bin(venv, "gunicorn")], cwd=run_dir, env=env, stdin=subprocess.DEVNULL,
                            stdout=out, stderr=out, start_new_session=True)
    out.close()
    proc.out = out_path
    proc.log = log
    _wait(f"{name} under gunicorn on 127.0.0.1:{port}", proc, port, script_name + "/", out_path, start, log)
    return proc


def keystone_gunicorn(venv, state_dir, conf, port, script_name="/identity"):
    """keystone (keystone.wsgi.api:application) under gunicorn on 127.0.0.1:port; returns the Popen
    once GET {script_name}/ answers. The gunicorn output is in proc.out, keystone's log in proc.log."""
    log = os.path.join(os.path.abspath(state_dir), "log", "keystone.log")
    return _gunicorn(venv, state_dir, "keystone", KEYSTONE_APP, port, script_name,
                     {"OS_KEYSTONE_CONFIG_FILES": os.path.abspath(conf)}, log)


def placement_gunicorn(venv, state_dir, conf, port, script_name="/placement"):
    """placement (placement.wsgi.api:application) under gunicorn on 127.0.0.1:port; placement finds
    placement.conf in OS_PLACEMENT_CONFIG_DIR. Returns the Popen once GET {script_name}/ answers."""
    conf = os.path.abspath(conf)
    if os.path.basename(conf) != "placement.conf":
        raise ValueError("placement reads OS_PLACEMENT_CONFIG_DIR/placement.conf: name the file placement.conf")
    log = os.path.join(os.path.abspath(state_dir), "log", "placement.log")
    return _gunicorn(venv, state_dir, "placement", PLACEMENT_APP, port, script_name,
                     {"OS_PLACEMENT_CONFIG_DIR": os.path.dirname(conf)}, log)


def _answers(port, path, timeout=2.0):
    """Any HTTP status for GET path, or None."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def _wait(what, proc, port, path, out, start, log, timeout=120):
    """Until GET path gets an answer from the app (not only the listening socket, which gunicorn's
    master opens before the worker has loaded the app). Raises with the logs' tails when the process
    dies, or when a worker exits (gunicorn would restart it in a loop). start: where this run's output
    begins in out (the file is appended to across runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _answers(port, path)
        if status is not None and status < 500:
            return status
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: gunicorn exited with {proc.returncode}" + _tail(out) + _tail(log))
        with open(out, errors="replace") as f:
            f.seek(start)
            text = f.read()
        if "exited with code" in text or "Worker failed to boot" in text:
            stop(proc)
            raise RuntimeError(f"{what}: a worker exited" + _tail(out) + _tail(log))
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{what}: no answer within {timeout} s" + _tail(out) + _tail(log))


def stop(proc, grace=15):
    """SIGTERM to gunicorn's whole session (master and worker), SIGKILL after grace seconds."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
