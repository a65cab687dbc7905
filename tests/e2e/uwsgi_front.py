"""The uwsgi front against the real thing: DevStack's Apache site for a uWSGI service
(`ProxyPass "/identity" "unix:SOCKET|uwsgi://uwsgi-uds-keystone-api" retry=0 acquire=1`, through
Debian's mod_proxy_uwsgi), first to real uWSGI serving tests/e2e/wsgi_echo.py as DevStack runs its
services, then to the same app under gunicorn (one worker, --timeout 0, as a debugger runs it) behind
glance-shim on uWSGI's socket. Every request must give the same status, body and WSGI variables both
ways, 64 MiB bodies included.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import time

from harness import CLEAN_ENV, HERE, SHIM, Apache, Shim, Stack, free_port, port_open, stop_process, tail, venv, \
    wait_until

MIB64 = 64 << 20
# Hop-by-hop fields, which uWSGI hands the app as variables and no HTTP hop passes on; Apache
# answered Expect: 100-continue itself before it sent the body.
HOP = {"HTTP_CONNECTION", "HTTP_KEEP_ALIVE", "HTTP_TE", "HTTP_UPGRADE", "HTTP_EXPECT"}


class Process:
    """A server process in its own session, with its output in a file."""

    def __init__(self, cmd, log, cwd=None, env=None):
        self.log = log
        out = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env or CLEAN_ENV, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=out, start_new_session=True)
        out.close()

    def stop(self):
        stop_process(self.proc, grace=15)


def connectable(path):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def curl(url, *args):
    """(status, {lower-case header: [values]}, body) of one request through Apache, by curl."""
    out = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/stdout", *args, url], capture_output=True,
                         env=CLEAN_ENV, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"curl {url}: {out.stderr.decode(errors='replace')}")
    raw = out.stdout
    # Skip interim answers (100 Continue) to the final head.
    while True:
        end = raw.index(b"\r\n\r\n") + 4
        head, raw = raw[:end].decode("latin-1"), raw[end:]
        if not head.startswith("HTTP/1.1 100"):
            break
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers.setdefault(k.strip().lower(), []).append(v.strip())
    return status, headers, raw


def flows(base, upload):
    """The requests both servers get; what came back from each, comparable as it is."""
    results = {}
    status, headers, body = curl(f"{base}/identity/environ/a%20b/%C3%A4?x=1&y=%2F&z",
                                 "-H", "X-Auth-Token: gAAAAAtoken", "-H", "X-Custom_Under: kept?",
                                 "-H", "Accept: application/json", "-H", "User-Agent: python-keystoneclient")
    results["get"] = (status, headers.get("location"), json.loads(body))
    status, headers, body = curl(f"{base}/identity/environ", "-X", "POST", "-H", "Content-Type: application/json",
                                 "--data-binary", '{"auth": {"identity": {"methods": ["password"]}}}')
    results["post"] = (status, headers.get("location"), json.loads(body))
    status, headers, body = curl(f"{base}/identity/environ/upload", "-T", upload,
                                 "-H", "Content-Type: application/octet-stream")
    results["upload"] = (status, headers.get("location"), json.loads(body))
    status, headers, body = curl(f"{base}/identity/download?bytes={MIB64}")
    results["download"] = (status, headers.get("transfer-encoding"), headers.get("content-length"),
                           len(body), hashlib.sha256(body).hexdigest())
    return results


def without(answer, keys):
    status, location, seen = answer
    environ = {k: v for k, v in seen["environ"].items() if k not in keys}
    return status, location, {**seen, "environ": environ, "added": None}


# The variables Apache 2.4's mod_proxy_uwsgi sends for a request with a body (docs/uwsgi.md).
MEASURED = {"PATH_INFO", "HTTP_HOST", "HTTP_USER_AGENT", "HTTP_ACCEPT", "CONTENT_TYPE", "CONTENT_LENGTH",
            "SERVER_NAME", "SERVER_PORT", "REMOTE_ADDR", "REMOTE_PORT", "REQUEST_SCHEME", "SERVER_PROTOCOL",
            "REQUEST_METHOD", "QUERY_STRING", "REQUEST_URI", "SCRIPT_NAME"}


def apache_packet(path, base):
    """Listens on `path` as uWSGI would, sends a POST through Apache, and returns the packet's variables
    and body as they arrived; answers 204."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(1)
    client = subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-H", "X-Under_Score: dropped",
                               "-H", "Content-Type: application/octet-stream", "-H", "Expect: 100-continue",
                               "--data-binary", "x" * 2048, f"{base}/identity/v3/a%20b?x=%2F"],
                              env=CLEAN_ENV)
    try:
        listener.settimeout(30)
        conn, _ = listener.accept()
        conn.settimeout(30)

        def read(n):
            out = b""
            while len(out) < n:
                chunk = conn.recv(n - len(out))
                if not chunk:
                    raise AssertionError(f"the packet ended after {len(out)} of {n} bytes")
                out += chunk
            return out
        head = read(4)
        size = int.from_bytes(head[1:3], "little")
        raw, vars_ = read(size), {}
        while raw:
            k = int.from_bytes(raw[:2], "little")
            key, raw = raw[2:2 + k].decode(), raw[2 + k:]
            v = int.from_bytes(raw[:2], "little")
            vars_[key], raw = raw[2:2 + v].decode("latin-1"), raw[2 + v:]
        body = read(int(vars_.get("CONTENT_LENGTH") or 0))
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
        conn.close()
        check_modifiers = head[0] == 0 and head[3] == 0
        if not check_modifiers:
            raise AssertionError(f"modifier1/modifier2 are {head[0]}/{head[3]}, not 0/0")
    finally:
        client.wait(30)
        listener.close()
        os.unlink(path)
    return vars_, body


def start_shim(state, name, ini, upstream, *flags):
    shim = Shim(state, name)
    shim.proc = subprocess.Popen(
        [SHIM, "--takeover", ini, "--upstream", str(upstream), "--log-format", "json", "--log-file", shim.log,
         "--inspect", "127.0.0.1:0", *flags],
        env=CLEAN_ENV, stdin=subprocess.DEVNULL, stdout=open(shim.out, "ab"), stderr=subprocess.STDOUT,
        start_new_session=True)
    return shim


def scenario(tmp, check):
    state = os.path.join(tmp, "uwsgi-front")
    os.makedirs(state)
    os.chmod(state, 0o755)  # Apache's children (www-data) reach the socket through it
    sock = os.path.join(state, "keystone-api.socket")
    upload = os.path.join(state, "upload.bin")
    with open(upload, "wb") as f:
        f.write(os.urandom(1 << 20) * 64)
    upload_sha = hashlib.sha256(open(upload, "rb").read()).hexdigest()
    stack = Stack()
    try:
        apache = stack.add(Apache(state))
        apache.start(free_port(), None, site=f"""# As lib/apache's write_uwsgi_config writes keystone's site.
ProxyPass "/identity" "unix:{sock}|uwsgi://uwsgi-uds-keystone-api" retry=0 acquire=1
""")
        base = f"http://127.0.0.1:{apache.port}"

        # What mod_proxy_uwsgi sends, read off the socket by hand (docs/uwsgi.md lists it).
        vars_, body = apache_packet(sock, base)
        check(set(vars_) >= MEASURED and vars_["SCRIPT_NAME"] == "/identity"
              and vars_["PATH_INFO"] == "/v3/a b" and vars_["REQUEST_URI"] == "/identity/v3/a%20b?x=%2F"
              and vars_["QUERY_STRING"] == "x=%2F" and "HTTP_X_UNDER_SCORE" not in vars_
              and vars_["HTTP_EXPECT"] == "100-continue" and body == b"x" * 2048,
              "uwsgi front: mod_proxy_uwsgi sends the variables docs/uwsgi.md lists, then the body",
              sorted(set(vars_) ^ MEASURED))

        # uWSGI as DevStack runs keystone (lib/apache's write_uwsgi_config), serving the echo app.
        ini = os.path.join(state, "keystone-uwsgi-public.ini")
        with open(ini, "w") as f:
            f.write(f"""[uwsgi]
module = wsgi_echo:application
pythonpath = {HERE}
processes = 1
master = true
die-on-term = true
enable-threads = true
buffer-size = 65535
add-header = Connection: close
lazy-apps = true
socket = {sock}
chmod-socket = 666
""")
        uwsgi = stack.add(Process([os.path.join(venv("33"), "bin", "uwsgi"), "--ini", ini],
                                  os.path.join(state, "uwsgi.log")))
        wait_until("uWSGI on its socket", lambda: connectable(sock), 20, uwsgi.proc, uwsgi.log)
        by_uwsgi = flows(base, upload)
        check(by_uwsgi["get"][0] == 200 and by_uwsgi["upload"][2]["body_sha256"] == upload_sha,
              "uwsgi front: Apache -> mod_proxy_uwsgi -> uWSGI serves the echo app", by_uwsgi["get"])
        seen = by_uwsgi["get"][2]["environ"]
        # PEP 3333: the decoded path's bytes, as latin-1.
        check(seen["SCRIPT_NAME"] == "/identity" and seen["PATH_INFO"] == "/environ/a b/ä".encode().decode("latin-1"),
              "uwsgi front: under uWSGI the app sees SCRIPT_NAME /identity and the decoded PATH_INFO", seen)

        # The shim refuses the socket while uWSGI holds it, naming the unit to stop.
        refused = subprocess.run([SHIM, "--takeover", ini, "--upstream", "1", "--inspect", "off"],
                                 capture_output=True, text=True, env=CLEAN_ENV, timeout=30)
        check(refused.returncode == 2 and refused.stderr.count("\n") == 1
              and "sudo systemctl stop devstack@keystone" in refused.stderr,
              "uwsgi front: --takeover of a live socket is one line naming devstack@keystone, exit 2",
              refused.stderr)

        uwsgi.stop()
        stack.things.remove(uwsgi)
        check(os.path.exists(sock) and not connectable(sock),
              "uwsgi front: a stopped uWSGI leaves its socket file behind")

        # The debug server: gunicorn as a debugger launches it, told where Apache mounts the app.
        gport = free_port()
        gunicorn = stack.add(Process(
            [os.path.join(venv("33"), "bin", "gunicorn"), "--bind", f"127.0.0.1:{gport}", "--workers", "1",
             "--timeout", "0", "--no-control-socket", "--env", "SCRIPT_NAME=/identity", "wsgi_echo:application"],
            os.path.join(state, "gunicorn.log"), cwd=HERE))
        wait_until(f"gunicorn on {gport}", lambda: port_open(gport), 20, gunicorn.proc, gunicorn.log)
        shim = stack.add(start_shim(state, "shim-uwsgi", ini, gport))
        listening = shim.wait_for("the listening line", lambda l: l.get("message") == "listening")
        check(listening.get("uwsgi") is True and listening.get("listen") == f"unix:{sock}",
              "uwsgi front: --takeover of keystone's ini listens on its socket, speaking uwsgi", listening)
        check(any("replacing a socket file" in l.get("message", "") for l in shim.lines()),
              "uwsgi front: the stale socket file is replaced")
        check(os.stat(sock).st_mode & 0o777 == 0o666, "uwsgi front: the socket is mode 0666 (chmod-socket = 666)")

        mark = shim.mark()
        by_shim = flows(base, upload)
        for name in ("get", "post", "upload"):
            check(without(by_shim[name], HOP) == without(by_uwsgi[name], HOP),
                  f"uwsgi front: {name}: the same status, Location, WSGI variables and body as uWSGI gave",
                  f"\n  uWSGI: {by_uwsgi[name]}\n  shim:  {by_shim[name]}")
        check(by_shim["post"][1] == ["/identity/created"],
              "uwsgi front: a Location built from SCRIPT_NAME names /identity", by_shim["post"])
        check(by_shim["upload"][2]["body_len"] == MIB64 and by_shim["upload"][2]["body_sha256"] == upload_sha,
              "uwsgi front: a 64 MiB upload (Content-Length, as Apache sends it) arrives whole")
        check(by_shim["download"] == by_uwsgi["download"] and by_shim["download"][3] == MIB64
              and by_shim["download"][1] == ["chunked"],
              "uwsgi front: a 64 MiB download without Content-Length reaches the client byte for byte, "
              "chunked once (by Apache)", (by_uwsgi["download"], by_shim["download"]))

        # The shim's ids: each request's id is the one the app got, on the arrival and completion lines.
        ids = [by_shim[name][2]["added"].get("HTTP_X_OPENSTACK_REQUEST_ID") for name in ("get", "post", "upload")]
        done = {l.get("id") for l in shim.since(mark) if l.get("message") == "completed"}
        check(all(i and i.startswith("req-") and i in done for i in ids),
              "uwsgi front: the id each request carried to the app is on its completion line", (ids, done))
        clients = {l.get("client") for l in shim.since(mark) if l.get("message") == "arrived"}
        check(all(c.startswith("127.0.0.1:") for c in clients),
              "uwsgi front: the client on the arrival line is Apache's client (REMOTE_ADDR)", clients)
        requests, _ = shim.api("/api/requests")
        shown = {r.get("id") for r in requests["in_flight"] + requests["recent"]}
        check(set(ids) <= shown, "uwsgi front: the inspector shows every request", shown)
        check("gAAAAAtoken" not in open(shim.log).read(), "uwsgi front: no token in the shim's log")

        shim.stop()
        stack.things.remove(shim)
        check(not os.path.exists(sock), "uwsgi front: the socket file is removed when the shim stops")

        # Apache's clock: its Timeout at 3 s, and the debug server paused at a breakpoint.
        apache.stop()
        apache.timeout = 3
        apache.start(apache.port, None, site=open(apache.site).read().split("\n", 1)[1].rsplit("</VirtualHost>", 1)[0])
        shim = stack.add(start_shim(state, "shim-clock", ini, gport, "--apache-config", apache.conf,
                                    "--stall-after", "1s"))
        started = shim.wait_for("Apache's clock", lambda l: l.get("apache_timeout_s") == 3)
        check(started.get("site") == apache.site,
              "uwsgi front: the shim reads Apache's Timeout (3 s) for the site that forwards to its socket", started)
        os.killpg(gunicorn.proc.pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            status, _, _ = curl(f"{base}/identity/environ/held")
            waited = time.monotonic() - began
        finally:
            os.killpg(gunicorn.proc.pid, signal.SIGCONT)
        check(status == 500 and 2.5 <= waited < 10,
              f"uwsgi front: mod_proxy_uwsgi answers 500 when Apache's Timeout runs out ({waited:.1f} s)", status)
        notice = shim.wait_for("a stall notice", lambda l: "probably paused" in l.get("message", ""))
        check("Apache gives up on it in 2 s (Timeout 3 in" in notice["message"],
              "uwsgi front: the stall notice says how long Apache still waits", notice["message"])
        done = shim.wait_for("the completion line", lambda l: l.get("message", "").startswith("aborted"))
        check(done.get("error", "").startswith("Apache gave up on it after 3 s (Timeout 3 in")
              and "answered its client 500" in done.get("error", "")
              and apache.site in done.get("error", ""),
              "uwsgi front: the completion line says Apache's Timeout ended the request, and where to raise it",
              done)
    finally:
        stack.close()
