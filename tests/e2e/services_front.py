"""keystone and placement behind Apache's mod_proxy_uwsgi, as DevStack serves them, first under real
uWSGI on their sockets and then under gunicorn (started as deploy/vscode/launch.json and
deploy/gunicorn/ start them) behind `glance-shim --takeover`: the real openstack CLI's flows give the
same results both ways, a breakpoint in keystone shows in the shim's log and inspector, and the shim's
id is in each service's log.
"""

import json
import os
import shlex
import signal
import subprocess
import time
import urllib.request
import uuid

import services
from harness import CACHE, CLEAN_ENV, HERE, ROOT, SHIM, Apache, Stack, free_port, jsonc, port_open, venv, wait_until
from uwsgi_front import Process, connectable, start_shim

VENV = os.path.join(CACHE, "venv-services")
SITE = """# As lib/apache's write_uwsgi_config writes keystone's and placement's sites.
ProxyPass "/identity" "unix:{keystone}|uwsgi://uwsgi-uds-keystone-api" retry=0 acquire=1
ProxyPass "/placement" "unix:{placement}|uwsgi://uwsgi-uds-placement-api" retry=0 acquire=1
"""


def openstack(*args, timeout=120):
    out = subprocess.run([os.path.join(VENV, "bin", "openstack"), *args], capture_output=True, text=True,
                         env=CLEAN_ENV, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"openstack {shlex.join(args)}: exit {out.returncode}: {out.stderr[-2000:]}")
    return out.stdout


def keystone_args(base):
    return ["--os-auth-url", f"{base}/identity/v3", "--os-username", "admin", "--os-password",
            services.ADMIN_PASSWORD, "--os-project-name", "admin", "--os-user-domain-id", "default",
            "--os-project-domain-id", "default", "--os-identity-api-version", "3", "--os-interface", "public"]


def placement_args(base):
    return ["--os-auth-type", "admin_token", "--os-endpoint", f"{base}/placement", "--os-token", "admin"]


def flows(base):
    """The openstack CLI's flows through Apache; what came back, comparable between servers."""
    out = {}
    token = json.loads(openstack(*keystone_args(base), "token", "issue", "-f", "json"))
    out["token issue"] = sorted(token)  # its values change with every token
    out["catalog list"] = openstack(*keystone_args(base), "catalog", "list", "-f", "json")
    with urllib.request.urlopen(f"{base}/identity/v3", timeout=30) as r:
        out["version document"] = (r.status, json.loads(r.read())["version"]["links"])
    name = f"rp-{uuid.uuid4().hex[:8]}"
    created = json.loads(openstack(*placement_args(base), "resource", "provider", "create", name, "-f", "json"))
    listed = json.loads(openstack(*placement_args(base), "resource", "provider", "list", "-f", "json"))
    openstack(*placement_args(base), "resource", "provider", "delete", created["uuid"])
    after = json.loads(openstack(*placement_args(base), "resource", "provider", "list", "-f", "json"))
    out["resource provider create/list/delete"] = (created["name"] == name, [p["name"] == name for p in listed],
                                                   [p["name"] for p in after])
    req = urllib.request.Request(f"{base}/placement/resource_providers", method="POST",
                                 data=json.dumps({"name": f"loc-{name}"}).encode(),
                                 headers={"Content-Type": "application/json", "X-Auth-Token": "admin",
                                          "OpenStack-API-Version": "placement 1.20"})
    with urllib.request.urlopen(req, timeout=30) as r:
        location = r.headers["Location"]
        out["placement POST"] = (r.status, location.split("/resource_providers/")[0])
    uuid_ = location.rsplit("/", 1)[1]
    req = urllib.request.Request(f"{base}/placement/resource_providers/{uuid_}", method="DELETE",
                                 headers={"X-Auth-Token": "admin"})
    with urllib.request.urlopen(req, timeout=30) as r:
        out["placement DELETE"] = r.status
    return out


def gunicorn_as_launched(name, conf_env, port, log):
    """The service as the deploy kit's VS Code configuration starts it: `python -m gunicorn` with no
    arguments and GUNICORN_CMD_ARGS naming deploy/gunicorn/NAME.py, here with the port and the test's
    configuration instead of DevStack's."""
    config = next(c for c in jsonc(os.path.join(ROOT, "deploy", "vscode", "launch.json"))["configurations"]
                  if c.get("env", {}).get("GUNICORN_CMD_ARGS", "").endswith(f"/{name}.py"))
    assert config["module"] == "gunicorn" and config["args"] == [], config
    cmd_args = config["env"]["GUNICORN_CMD_ARGS"].replace("/opt/stack/glance-shim", ROOT)
    env = dict(CLEAN_ENV, **conf_env, GUNICORN_CMD_ARGS=f"{cmd_args} --bind 127.0.0.1:{port}")
    proc = Process([os.path.join(VENV, "bin", "python"), "-m", "gunicorn"], log, env=env)
    wait_until(f"{name} under gunicorn", lambda: port_open(port), 60, proc.proc, log)
    return proc


def uwsgi_ini(path, socket, module, env):
    with open(path, "w") as f:
        f.write(f"""[uwsgi]
module = {module}
home = {VENV}
processes = 1
master = true
die-on-term = true
enable-threads = true
buffer-size = 65535
add-header = Connection: close
lazy-apps = true
socket = {socket}
chmod-socket = 666
""" + "".join(f"env = {k}={v}\n" for k, v in env.items()))


def scenario(tmp, check):
    subprocess.run(["bash", os.path.join(HERE, "install-services.sh")], check=True)
    state = os.path.join(tmp, "services")
    os.makedirs(state)
    os.chmod(state, 0o755)
    ks_sock = os.path.join(state, "keystone-api.socket")
    pl_sock = os.path.join(state, "placement-api.socket")
    stack = Stack()
    try:
        apache = stack.add(Apache(state))
        apache.start(free_port(), None, site=SITE.format(keystone=ks_sock, placement=pl_sock))
        base = f"http://127.0.0.1:{apache.port}"
        ks_conf, ks_log = services.keystone_setup(VENV, state, f"{base}/identity")
        pl_conf, pl_log = services.placement_setup(VENV, state)
        ks_env = {"OS_KEYSTONE_CONFIG_FILES": os.path.abspath(ks_conf)}
        pl_env = {"OS_PLACEMENT_CONFIG_DIR": os.path.dirname(os.path.abspath(pl_conf))}

        # As DevStack runs them: uWSGI on the sockets (uwsgi from venv-33, the services' venv as home).
        ks_ini = os.path.join(state, "keystone-uwsgi-public.ini")
        pl_ini = os.path.join(state, "placement-uwsgi.ini")
        uwsgi_ini(ks_ini, ks_sock, services.KEYSTONE_APP, ks_env)
        uwsgi_ini(pl_ini, pl_sock, services.PLACEMENT_APP, pl_env)
        uwsgi_bin = os.path.join(venv("33"), "bin", "uwsgi")
        for ini, sock in ((ks_ini, ks_sock), (pl_ini, pl_sock)):
            proc = stack.add(Process([uwsgi_bin, "--ini", ini], ini + ".log"))
            wait_until(f"uWSGI on {sock}", lambda: connectable(sock), 60, proc.proc, proc.log)
        by_uwsgi = flows(base)
        check(by_uwsgi["version document"][0] == 200
              and all("/identity/v3" in l["href"] for l in by_uwsgi["version document"][1]),
              "services: under uWSGI, keystone's version document links name /identity", by_uwsgi["version document"])
        for thing in list(stack.things):
            if isinstance(thing, Process):
                thing.stop()
                stack.things.remove(thing)

        # As a debugger runs them: gunicorn from the deploy kit, behind the shim on the same sockets.
        ks_port, pl_port = free_port(), free_port()
        stack.add(gunicorn_as_launched("keystone", ks_env, ks_port, os.path.join(state, "gunicorn-keystone.out")))
        stack.add(gunicorn_as_launched("placement", pl_env, pl_port, os.path.join(state, "gunicorn-placement.out")))
        ks_shim = stack.add(start_shim(state, "shim-keystone", ks_ini, ks_port, "--stall-after", "1s"))
        pl_shim = stack.add(start_shim(state, "shim-placement", pl_ini, pl_port))
        for shim in (ks_shim, pl_shim):
            shim.wait_for("the listening line", lambda l: l.get("message") == "listening")
        # gunicorn answers once its worker has loaded the app.
        wait_until("keystone through the shim", lambda: services._answers(apache.port, "/identity/v3") == 200, 60)
        ks_mark, pl_mark = ks_shim.mark(), pl_shim.mark()
        by_shim = flows(base)
        for name in by_uwsgi:
            check(by_shim[name] == by_uwsgi[name], f"services: {name}: the same through the shim as under uWSGI",
                  f"\n  uWSGI: {by_uwsgi[name]}\n  shim:  {by_shim[name]}")
        check(by_shim["placement POST"][1].endswith("/placement"),
              "services: placement's Location names /placement (SCRIPT_NAME)", by_shim["placement POST"])

        # The shim's id is keystone's and placement's global request id: the first of the two in
        # their log lines.
        for shim, mark, log, name in ((ks_shim, ks_mark, ks_log, "keystone"), (pl_shim, pl_mark, pl_log, "placement")):
            done = [l for l in shim.since(mark) if l.get("message") == "completed"]
            with open(log, errors="replace") as f:
                text = f.read()
            logged = [l["id"] for l in done if f"[{l['id']} req-" in text]
            check(done and len(logged) == len(done),
                  f"services: every request's shim id is {name}'s global request id ([SHIM-ID LOCAL-ID ...])",
                  (len(done), len(logged)))
            answered = [l for l in done if l.get("upstream_id", "").startswith("req-") and l["upstream_id"] != l["id"]]
            check(len(answered) == len(done),
                  f"services: {name} answers its own local id, which the completion line shows as upstream_id")

        # A breakpoint in keystone during `token issue`: the shim shows it held, and it completes
        # after the debugger lets go.
        gunicorn_keystone = next(t for t in stack.things if isinstance(t, Process) and "keystone" in t.log)
        mark = ks_shim.mark()
        os.killpg(gunicorn_keystone.proc.pid, signal.SIGSTOP)
        issue = subprocess.Popen([os.path.join(VENV, "bin", "openstack"), *keystone_args(base), "token", "issue",
                                  "-f", "json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=CLEAN_ENV)
        try:
            notice = ks_shim.wait_for("a stall notice", lambda l: "probably paused" in l.get("message", ""),
                                      since=mark, timeout=60)
            held, _ = ks_shim.api("/api/requests")
            stalled = [r for r in held["in_flight"] if r["stalled"]]
            check(len(stalled) == 1 and stalled[0]["id"] == notice["id"],
                  "services: keystone held at a breakpoint is in the log and pinned on the inspector", held["in_flight"])
        finally:
            os.killpg(gunicorn_keystone.proc.pid, signal.SIGCONT)
        out, err = issue.communicate(timeout=120)
        check(issue.returncode == 0 and "expires" in json.loads(out),
              "services: token issue completes after the breakpoint", err[-500:])
        with open(ks_log, errors="replace") as f:
            check(f"[{notice['id']} req-" in f.read(),
                  "services: the held request's id is in keystone's log")
    finally:
        stack.close()
