"""Servers for the end-to-end suite: real glance-api (eventlet, uWSGI or gunicorn), a private Apache in
DevStack's shape, and glance-shim, all on 127.0.0.1 and all stopped by `Stack.close()`, which the
suite calls however it ends.

Each class writes its own configuration under a state directory, starts its process in its own
session (so the suite's Ctrl-C reaches only the suite), waits until it answers, and knows how to stop
it, including when a test left it SIGSTOPped.
"""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("GLANCE_SHIM_E2E_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "glance-shim-e2e")
SHIM = os.environ.get("GLANCE_SHIM_BIN") or os.path.join(ROOT, "target", "release", "glance-shim")
APACHE = os.environ.get("APACHE_BIN", "/usr/sbin/apache2")
APACHE_MODULES = os.environ.get("APACHE_MODULES", "/usr/lib/apache2/modules")

# Everything talks to 127.0.0.1: never let a proxy variable divert it.
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.lower().endswith("_proxy") and not k.startswith("OS_")}
CLEAN_ENV["NO_PROXY"] = CLEAN_ENV["no_proxy"] = "127.0.0.1,localhost"
# python-requests lets these override the CA a client is given (--os-cacert): drop them.
for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
    CLEAN_ENV.pop(var, None)


DEPLOY = os.path.join(ROOT, "deploy")


def venv(gen):
    return os.path.join(CACHE, f"venv-{gen}")


def jsonc(path):
    """JSON with `//` comment lines, as VS Code writes it."""
    with open(path) as f:
        return json.loads("".join(l for l in f if not l.lstrip().startswith("//")))


def launch_args(name_part):
    """The args of the deploy/vscode/launch.json configuration whose name contains name_part."""
    for config in jsonc(os.path.join(DEPLOY, "vscode", "launch.json"))["configurations"]:
        if name_part in config["name"]:
            return config
    raise KeyError(name_part)


def glance_conf_snippet(port):
    """deploy/glance/glance-api.conf.snippet's [DEFAULT] settings, with bind_port set to port."""
    lines = []
    with open(os.path.join(DEPLOY, "glance", "glance-api.conf.snippet")) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or line.startswith("["):
                continue
            key = line.split("=", 1)[0].strip()
            lines.append(f"bind_port = {port}" if key == "bind_port" else line)
    return "\n".join(lines) + "\n"


def apache_snippet(shim_port):
    """deploy/apache/glance-shim.conf, pointed at a shim on shim_port instead of 9292."""
    with open(os.path.join(DEPLOY, "apache", "glance-shim.conf")) as f:
        return f.read().replace("127.0.0.1:9292", f"127.0.0.1:{shim_port}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_status(url, timeout=5.0):
    """GET url -> status, or None when nothing answers."""
    m = re.match(r"http://([^/:]+):(\d+)(/.*)?$", url)
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout)
    try:
        conn.request("GET", m.group(3) or "/")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def wait_until(what, predicate, timeout, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}" + tail(log))
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not within {timeout} s" + tail(log))


def tail(path, lines=25):
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return f"\n--- last lines of {path}:\n" + "".join(f.readlines()[-lines:])


def children(pid):
    """Direct children of pid, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def stop_process(proc, serving_pid=None, grace=20):
    """SIGCONT (a test may have left it stopped), SIGTERM, wait, SIGKILL; also the whole session."""
    if proc is None or proc.poll() is not None:
        return
    for pid in {proc.pid, serving_pid} - {None}:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    for pid in children(proc.pid):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.kill()
        proc.wait()


class Glance:
    """A self-contained glance-api: sqlite database, file store and logs under `state`.

    mode "eventlet": the `glance-api` console script with workers = 0, as a developer runs glance 32
    by hand. mode "uwsgi": uWSGI with http-socket, as DevStack's devstack@g-api runs it. mode
    "gunicorn": `glance.wsgi.api:application` under gunicorn with one worker and --timeout 0, as a
    debugger launches glance 33.
    """

    def __init__(self, gen, mode, state):
        self.gen, self.mode, self.state = gen, mode, state
        self.venv = venv(gen)
        self.proc = None
        self.port = None
        self.serving_pid = None
        self.etc = os.path.join(state, "etc")
        self.log = os.path.join(state, "log", "glance-api.log")
        self.out = os.path.join(state, "log", f"{mode}.out")
        self._synced = False

    def _write_config(self, port):
        for d in ("etc", "lib", "log", "images", "staging", "lock", "cache"):
            os.makedirs(os.path.join(self.state, d), exist_ok=True)
        s = self.state
        server = ""
        if self.mode == "eventlet":
            # What a developer merges into glance-api.conf for a by-hand debug run.
            server = glance_conf_snippet(port)
        conf = f"""[DEFAULT]
debug = True
log_file = {self.log}
{server}worker_self_reference_url = http://127.0.0.1:{port}
node_staging_uri = file://{s}/staging
enabled_import_methods = [glance-direct,web-download,copy-image]
image_cache_dir = {s}/cache

[database]
connection = sqlite:///{s}/glance.sqlite

[paste_deploy]
flavor = fakekeystone
config_file = {self.etc}/glance-api-paste.ini

[glance_store]
stores = file
default_store = file
filesystem_store_datadir = {s}/images

[oslo_concurrency]
lock_path = {s}/lock
"""
        with open(os.path.join(self.etc, "glance-api.conf"), "w") as f:
            f.write(conf)
        shipped = os.path.join(self.venv, "etc", "glance", "glance-api-paste.ini")
        with open(shipped) as f:
            paste = f.read()
        if "[filter:healthcheck]" in paste:
            # glance 25 and older: healthcheck is a filter, and the flavor names a pipeline.
            paste += """
# DevStack's keystone pipeline with authtoken replaced by tests/e2e/fakeauth.py.
[pipeline:glance-api-fakekeystone]
pipeline = cors healthcheck http_proxy_to_wsgi versionnegotiation osprofiler fakeauth context rootapp

[filter:fakeauth]
paste.filter_factory = fakeauth:filter_factory
"""
        else:
            paste += """
# DevStack's keystone pipeline with authtoken replaced by tests/e2e/fakeauth.py.
[composite:glance-api-fakekeystone]
paste.composite_factory = glance.api:root_app_factory
/: api-fakekeystone
/healthcheck: healthcheck

[pipeline:api-fakekeystone]
pipeline = cors http_proxy_to_wsgi versionnegotiation osprofiler fakeauth context rootapp

[filter:fakeauth]
paste.filter_factory = fakeauth:filter_factory
"""
        with open(os.path.join(self.etc, "glance-api-paste.ini"), "w") as f:
            f.write(paste)
        shutil.copy(os.path.join(HERE, "fakeauth.py"), os.path.join(s, "lib", "fakeauth.py"))

    def start(self, port):
        """Starts serving on 127.0.0.1:port and waits for GET /versions -> 200."""
        self.port = port
        self._write_config(port)
        env = dict(CLEAN_ENV, PYTHONPATH=os.path.join(self.state, "lib"), OS_GLANCE_CONFIG_DIR=self.etc)
        conf = os.path.join(self.etc, "glance-api.conf")
        if not self._synced:
            subprocess.run([os.path.join(self.venv, "bin", "glance-manage"), "--config-file", conf, "db_sync"],
                           env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._synced = True
        if self.mode == "eventlet":
            cmd = [os.path.join(self.venv, "bin", "glance-api"), "--config-file", conf]
        elif self.mode == "uwsgi":
            ini = os.path.join(self.etc, "glance-uwsgi.ini")
            with open(ini, "w") as f:
                f.write(f"""[uwsgi]
# DevStack's g-api settings (lib/glance), one worker.
http-socket = 127.0.0.1:{port}
module = glance.wsgi.api:application
virtualenv = {self.venv}
pythonpath = {self.state}/lib
env = OS_GLANCE_CONFIG_DIR={self.etc}
need-app = true
master = true
processes = 1
threads = 4
enable-threads = true
die-on-term = true
exit-on-reload = true
thunder-lock = true
lazy-apps = true
buffer-size = 65535
add-header = Connection: close
# glanceclient uploads in 1 MiB chunks and uWSGI's default limit for one chunk is exactly 1 MiB:
# without this, every upload straight to uWSGI fails ("unable to receive chunked part").
chunked-input-limit = 16777216
""")
            cmd = [os.path.join(self.venv, "bin", "uwsgi"), "--ini", ini]
        elif self.mode == "gunicorn":
            # Exactly the arguments the VS Code configuration in deploy/ gives gunicorn.
            args = [a.replace("127.0.0.1:9292", f"127.0.0.1:{port}") for a in launch_args(">= 33")["args"]]
            cmd = [os.path.join(self.venv, "bin", "gunicorn"), *args]
        else:
            raise ValueError(self.mode)
        if port_open(port):
            raise RuntimeError(f"127.0.0.1:{port} is already in use")
        out = open(self.out, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                     start_new_session=True)
        out.close()
        wait_until(f"glance {self.gen} ({self.mode}) on {port}",
                   lambda: http_status(f"http://127.0.0.1:{port}/versions") == 200,
                   90, self.proc, self.out)
        self.serving_pid = self.proc.pid
        if self.mode in ("uwsgi", "gunicorn"):
            kids = children(self.proc.pid)
            if not kids:
                raise RuntimeError(f"no worker process under {self.mode} master {self.proc.pid}")
            self.serving_pid = kids[0]
        return self

    def stop(self):
        stop_process(self.proc, self.serving_pid)
        self.proc = None

    def log_text(self):
        with open(self.log, errors="replace") as f:
            return f.read()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


class Apache:
    """A private Apache with DevStack's glance site: `ProxyPass "/image" "http://127.0.0.1:BACKEND"
    retry=0 acquire=1`, `KeepAlive Off`, `SetEnv proxy-sendchunked 1`. Runs from Debian's binary with
    its own ServerRoot, pid file and logs; /etc/apache2 is never touched."""

    def __init__(self, state):
        self.dir = os.path.join(state, "apache")
        self.conf = os.path.join(self.dir, "apache2.conf")
        self.site = os.path.join(self.dir, "glance-site.conf")
        self.pidfile = os.path.join(self.dir, "run", "apache2.pid")
        self.error_log = os.path.join(self.dir, "log", "error.log")
        self.port = None
        # Debian's apache2.conf; ProxyTimeout inherits it.
        self.timeout = 300

    def start(self, port, backend, site=None):
        """site: the directives inside the VirtualHost; by default DevStack's glance site."""
        self.port = port
        os.makedirs(os.path.join(self.dir, "run"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "log"), exist_ok=True)
        mods = APACHE_MODULES
        user = "User www-data\nGroup www-data\n" if os.geteuid() == 0 else ""
        with open(self.conf, "w") as f:
            f.write(f"""ServerRoot "{self.dir}"
ServerName 127.0.0.1
PidFile "{self.pidfile}"
DefaultRuntimeDir "{self.dir}/run"
Listen 127.0.0.1:{port}
{user}
LoadModule mpm_event_module {mods}/mod_mpm_event.so
LoadModule authz_core_module {mods}/mod_authz_core.so
LoadModule env_module {mods}/mod_env.so
LoadModule headers_module {mods}/mod_headers.so
LoadModule proxy_module {mods}/mod_proxy.so
LoadModule proxy_http_module {mods}/mod_proxy_http.so
LoadModule proxy_uwsgi_module {mods}/mod_proxy_uwsgi.so
Timeout {self.timeout}
ErrorLog "{self.error_log}"
LogLevel warn
LogFormat "%h %t \\"%r\\" %>s %b %Dus out_req_id=\\"%{{x-openstack-request-id}}o\\"" glance
CustomLog "{self.dir}/log/access.log" glance
Include "{self.site}"
""")
        if site is None:
            site = f"""# As DevStack's glance site (lib/apache, lib/glance).
KeepAlive Off
SetEnv proxy-sendchunked 1
ProxyPass "/image" "http://127.0.0.1:{backend}" retry=0 acquire=1
ProxyPassReverse "/image" "http://127.0.0.1:{backend}"
"""
        with open(self.site, "w") as f:
            f.write(f"<VirtualHost 127.0.0.1:{port}>\n{site}\n</VirtualHost>\n")
        test = subprocess.run([APACHE, "-d", self.dir, "-f", self.conf, "-t"], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"apache2 -t failed: {test.stderr}")
        subprocess.run([APACHE, "-d", self.dir, "-f", self.conf, "-k", "start"], check=True)
        wait_until(f"apache on {port}", lambda: os.path.exists(self.pidfile) and port_open(port), 15,
                   log=self.error_log)
        return self

    def site_digest(self):
        with open(self.site, "rb") as f:
            return f.read()

    def stop(self):
        if not os.path.exists(self.pidfile):
            return
        with open(self.pidfile) as f:
            pid = int(f.read().strip() or 0)
        subprocess.run([APACHE, "-d", self.dir, "-f", self.conf, "-k", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.1)
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)
        try:
            os.remove(self.pidfile)
        except FileNotFoundError:
            pass

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/image"


class Shim:
    """glance-shim writing JSON lines to a file the suite reads."""

    def __init__(self, state, name="shim"):
        self.log = os.path.join(state, f"{name}.log")
        self.out = os.path.join(state, f"{name}.out")
        self.proc = None
        self.port = None

    def start(self, port, upstream, *flags):
        """port: a TCP port, or the path of a unix socket (with "--uwsgi" in flags, the uwsgi front)."""
        self.port = port
        out = open(self.out, "ab")
        # Every shim's inspector on a port of its own: several run at once.
        inspect = [] if "--inspect" in flags else ["--inspect", "127.0.0.1:0"]
        listen = port if isinstance(port, str) else f"127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [SHIM, "--listen", listen, "--upstream", str(upstream), "--log-format", "json",
             "--log-file", self.log, *inspect, *flags],
            env=CLEAN_ENV, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        out.close()
        if isinstance(port, str):
            self.wait_for("the listening line", lambda l: l.get("message") == "listening")
        else:
            wait_until(f"glance-shim on {port}", lambda: port_open(port), 10, self.proc, self.out)
        return self

    def stop(self):
        stop_process(self.proc, grace=15)
        self.proc = None

    def lines(self):
        if not os.path.exists(self.log):
            return []
        out = []
        with open(self.log, errors="replace") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"message": line.rstrip("\n"), "unparsed": True})
        return out

    def api(self, path):
        """GET `path` from the shim's inspector -> (parsed JSON, the body as text)."""
        listening = self.wait_for("the listening line", lambda l: l.get("message") == "listening")
        base = urllib.parse.urlsplit(listening["inspector"])
        url = f"{base.scheme}://{base.netloc}{path}"
        with urllib.request.urlopen(url, timeout=20) as r:
            text = r.read().decode()
        return json.loads(text), text

    def replay(self, ask):
        """POST /api/replay with the inspector's key from the start-up line -> (status, parsed JSON)."""
        listening = self.wait_for("the listening line", lambda l: l.get("message") == "listening")
        base = urllib.parse.urlsplit(listening["inspector"])
        key = urllib.parse.parse_qs(base.query)["key"][0]
        req = urllib.request.Request(f"{base.scheme}://{base.netloc}/api/replay", data=json.dumps(ask).encode(),
                                     headers={"Content-Type": "application/json", "X-Glance-Shim-Key": key})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def mark(self):
        """A position in the log: lines after it belong to what happens next."""
        return len(self.lines())

    def since(self, mark):
        return self.lines()[mark:]

    def wait_for(self, what, predicate, timeout=20, since=0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines()[since:]:
                if predicate(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no shim log line for {what} within {timeout} s" + tail(self.log, 15))

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


class Stack:
    """Everything a scenario started, stopped in reverse order by close()."""

    def __init__(self):
        self.things = []

    def add(self, thing):
        self.things.append(thing)
        return thing

    def close(self):
        while self.things:
            thing = self.things.pop()
            try:
                thing.stop()
            except Exception as e:  # keep stopping the rest
                print(f"  (while stopping {type(thing).__name__}: {e})", file=sys.stderr)
