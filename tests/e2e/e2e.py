#!/usr/bin/env python3
"""glance-shim against the real thing: glance-api 25 (Zed) and 32 (eventlet) and 33 (uWSGI, gunicorn),
DevStack's Apache site, and the real python-glanceclient, python-openstackclient and curl; then the uwsgi
front with mod_proxy_uwsgi, uWSGI, and real keystone and placement (uwsgi_front.py, services_front.py).

Every flow runs straight to glance first and then through each path with the shim; the results
must be the same. The request ids on the shim's log lines must be the ones in glance's own log and
the ones glance answered with. Run it through tests/e2e/run, which installs what it needs.

Environment: E2E_MIB (payload of the client flows, default 50), E2E_BIG_GIB (the large image, default
2), E2E_LONG_PAUSE (seconds of the long breakpoint, default 70), E2E_ONLY (comma-separated scenario
names to run).
"""

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import services_front  # noqa: E402
import uwsgi_front  # noqa: E402
from harness import (CLEAN_ENV, ROOT, SHIM, Apache, Glance, Shim, Stack, apache_snippet, free_port,  # noqa: E402
                     venv, wait_until)

MIB = int(os.environ.get("E2E_MIB", "50"))
BIG_GIB = float(os.environ.get("E2E_BIG_GIB", "2"))
LONG_PAUSE = int(os.environ.get("E2E_LONG_PAUSE", "70"))
ONLY = set(filter(None, os.environ.get("E2E_ONLY", "").split(",")))
STALL_AFTER = 2  # seconds, the --stall-after every shim here runs with

passed = []
failed = []


def ok(msg):
    passed.append(msg)
    print(f"ok    {msg}", flush=True)


def check(cond, msg, detail=""):
    if not cond:
        raise AssertionError(f"{msg}{': ' + str(detail) if detail else ''}")
    ok(msg)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def md5_file(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def make_payload(path, mib):
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for i in range(int(mib)):
            # Every MiB differs, so a misplaced chunk cannot go unnoticed.
            f.write(i.to_bytes(8, "little") + block[8:])


# ---------------------------------------------------------------------------------------------
# Clients


class Client:
    """python-glanceclient, python-openstackclient and curl against one image endpoint."""

    def __init__(self, gen, url, tmp, cacert=None):
        self.gen, self.url, self.tmp = gen, url.rstrip("/"), tmp
        self.bin = os.path.join(venv(gen), "bin")
        # https endpoints: the CA every client is told to trust.
        self.tls = ["--os-cacert", cacert] if cacert else []
        self.curl_tls = ["--cacert", cacert] if cacert else []

    def run(self, cmd, stdin=subprocess.DEVNULL, check_rc=True, timeout=600):
        p = subprocess.run(cmd, env=CLEAN_ENV, stdin=stdin, capture_output=True, timeout=timeout)
        if check_rc and p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:6])} ... exited {p.returncode}: "
                                 f"{p.stderr.decode(errors='replace')[-800:]}")
        return p

    def glance(self, *args, stdin=subprocess.DEVNULL, check_rc=True):
        # The token is never checked (the fake auth filter); glanceclient just needs one.
        return self.run([os.path.join(self.bin, "glance"), "--os-image-url", self.url,
                         "--os-auth-token", "e2e-token", *self.tls, *args], stdin=stdin, check_rc=check_rc)

    def osc(self, *args):
        return self.run([os.path.join(self.bin, "openstack"), "--os-auth-type", "none",
                         "--os-endpoint", self.url, *self.tls, *args])

    def curl(self, method, path, *args, body_to=None):
        """-> (status, {lower-case header: value}, body bytes)."""
        out = body_to or os.path.join(self.tmp, "curl.body")
        headers = os.path.join(self.tmp, "curl.headers")
        self.run(["curl", "-sS", "-X", method, "-D", headers, "-o", out, "--max-time", "600",
                  "-H", "X-Auth-Token: e2e-token", *self.curl_tls, *args, self.url + path])
        with open(headers, "rb") as f:
            blocks = f.read().decode("latin-1").split("\r\n\r\n")
        final = [b for b in blocks if b.startswith("HTTP/") and not b.split(" ", 2)[1].startswith("1")][-1]
        lines = final.split("\r\n")
        status = int(lines[0].split(" ")[1])
        hdrs = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        body = b""
        if body_to is None:
            with open(out, "rb") as f:
                body = f.read()
        return status, hdrs, body


def table(stdout):
    """glanceclient's `| Property | Value |` table -> dict."""
    rows = {}
    for line in stdout.decode().splitlines():
        parts = [p.strip() for p in line.split("|")]
        if len(parts) >= 4 and parts[1] and parts[1] not in ("Property", "Field"):
            rows[parts[1]] = parts[2]
    return rows


# ---------------------------------------------------------------------------------------------
# Flows: each returns facts that must be the same whichever path the requests took.


def flow_glance_cli(c, src):
    facts = {}
    want_sha, want_size, want_md5 = sha256_file(src), os.path.getsize(src), md5_file(src)
    a = table(c.glance("image-create", "--name", "e2e-file", "--disk-format", "raw",
                       "--container-format", "bare", "--file", src).stdout)
    with open(src, "rb") as f:  # from a pipe: no size known, chunked like glanceclient always is
        b = table(c.glance("image-create", "--name", "e2e-pipe", "--disk-format", "raw",
                           "--container-format", "bare", stdin=f).stdout)
    ids = [a["id"], b["id"]]
    for label, img in (("file", a), ("pipe", b)):
        shown = table(c.glance("image-show", img["id"]).stdout)
        facts[f"create_{label}"] = (shown["status"], shown["size"], shown["checksum"])
        check((shown["status"], int(shown["size"]), shown["checksum"]) == ("active", want_size, want_md5),
              f"glance image-create ({label}): active, {want_size} bytes, checksum right", shown)
        out = os.path.join(c.tmp, f"dl-{label}")
        c.glance("image-download", "--file", out, img["id"])
        facts[f"download_{label}"] = sha256_file(out)
        check(facts[f"download_{label}"] == want_sha, f"glance image-download ({label}): sha256 equal")
        os.remove(out)
    listed = c.glance("image-list").stdout.decode()
    facts["list"] = all(i in listed for i in ids)
    check(facts["list"], "glance image-list shows both images")
    c.glance("image-update", "--name", "e2e-renamed", "--property", "e2e_prop=yes", ids[0])
    shown = table(c.glance("image-show", ids[0]).stdout)
    facts["update"] = (shown["name"], shown.get("e2e_prop"))
    check(facts["update"] == ("e2e-renamed", "yes"), "glance image-update (JSON-patch PATCH) applied", shown)
    c.glance("image-delete", *ids)
    gone = [c.glance("image-show", i, check_rc=False).returncode != 0 for i in ids]
    facts["delete"] = all(gone)
    check(facts["delete"], "glance image-delete: both gone")
    return facts


def flow_osc(c, src):
    facts = {}
    out = c.osc("image", "create", "--file", src, "--disk-format", "raw", "--container-format", "bare",
                "-f", "json", "e2e-osc").stdout
    image = json.loads(out)
    saved = os.path.join(c.tmp, "osc-saved")
    c.osc("image", "save", "--file", saved, image["id"])
    facts["save"] = sha256_file(saved)
    check(facts["save"] == sha256_file(src), "openstack image create + save: sha256 equal")
    os.remove(saved)
    listed = json.loads(c.osc("image", "list", "-f", "json").stdout)
    facts["list"] = any(i["ID"] == image["id"] for i in listed)
    check(facts["list"], "openstack image list shows it")
    c.osc("image", "delete", image["id"])
    listed = json.loads(c.osc("image", "list", "-f", "json").stdout)
    facts["delete"] = not any(i["ID"] == image["id"] for i in listed)
    check(facts["delete"], "openstack image delete: gone")
    return facts


def flow_curl(c, src, client_url):
    """Raw HTTP: Location on create, Content-MD5 and Range on download, PUT with Content-Length."""
    facts = {}
    small = os.path.join(c.tmp, "small.bin")
    with open(src, "rb") as f, open(small, "wb") as g:
        g.write(f.read(3 << 20))
    status, h, body = c.curl("POST", "/v2/images", "-H", "Content-Type: application/json", "--data",
                             '{"name": "e2e-curl", "disk_format": "raw", "container_format": "bare"}')
    image = json.loads(body)
    facts["create"] = status
    check(status == 201, "POST /v2/images -> 201")
    location = h.get("location", "")
    check(location == f"{client_url}/v2/images/{image['id']}",
          "Location names the URL the client used (Host kept end to end)", location)
    status, _, _ = c.curl("PUT", f"/v2/images/{image['id']}/file", "-H", "Expect:",
                          "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{small}")
    facts["upload"] = status
    check(status == 204, "PUT .../file with Content-Length -> 204")
    out = os.path.join(c.tmp, "curl-dl")
    status, h, _ = c.curl("GET", f"/v2/images/{image['id']}/file", body_to=out)
    facts["download"] = (status, h.get("content-md5"), sha256_file(out))
    check(status == 200 and h.get("content-md5") == md5_file(small),
          "GET .../file -> 200 with glance's Content-MD5", h)
    check(facts["download"][2] == sha256_file(small), "download sha256 equal")
    status, h, body = c.curl("GET", f"/v2/images/{image['id']}/file", "-H", "Range: bytes=100-1123")
    with open(small, "rb") as f:
        f.seek(100)
        want = f.read(1024)
    facts["range"] = (status, h.get("content-range"), body == want)
    check(status == 206 and body == want, "Range download -> 206 with the right 1024 bytes", (status, h))
    status, _, _ = c.curl("DELETE", f"/v2/images/{image['id']}")
    facts["delete"] = status
    check(status == 204, "DELETE -> 204")
    os.remove(small)
    return facts


def run_flows(c, src, client_url, flows=("glance", "osc", "curl")):
    facts = {}
    if "glance" in flows:
        facts["glance"] = flow_glance_cli(c, src)
    if "osc" in flows:
        facts["osc"] = flow_osc(c, src)
    if "curl" in flows:
        facts["curl"] = flow_curl(c, src, client_url)
    return facts


def same_as_direct(direct, through, label):
    for flow, want in direct.items():
        check(through.get(flow) == want, f"{label}: {flow} flow gives what it gives straight to glance",
              f"direct {want} vs {through.get(flow)}")


# ---------------------------------------------------------------------------------------------
# The log checks


def check_correlation(shim, mark, glance, label):
    """Every request the shim completed: its id is the one glance echoed and the one in glance's log."""
    lines = [l for l in shim.since(mark) if l.get("message") == "completed"]
    check(lines, f"{label}: the shim logged the requests")
    log = glance.log_text()
    checked = 0
    for l in lines:
        if not l.get("path", "").startswith("/v2/") or l.get("status", 500) >= 500:
            continue  # /, /versions carry no id; glance does not echo on its own errors
        checked += 1
        if l.get("upstream_id") != l["id"]:
            raise AssertionError(f"{label}: glance answered {l.get('upstream_id')} for shim id {l['id']} ({l['path']})")
        if l["id"] not in log:
            raise AssertionError(f"{label}: {l['id']} ({l['method']} {l['path']}) is not in glance's log")
    check(checked > 5, f"{label}: all {checked} /v2 requests carry the same id in the shim's log, in "
                       f"glance's x-openstack-request-id and in glance's own log")


def inspector_shows(shim, glance, label):
    """`openstack image create` is on the shim's inspector under the id glance logged, and no token is."""
    listed, _ = shim.api("/api/requests")
    log = glance.log_text()
    found = None
    served = []
    for r in listed["recent"]:
        if (r["method"], r["target"], r["status"]) != ("POST", "/v2/images", 201):
            continue
        detail, text = shim.api(f"/api/requests/{r['serial']}")
        served.append(text)
        body = detail["request"]["body"]["json"] or {}
        if body.get("name") == "e2e-osc" and found is None:
            found = detail  # the newest
    check(found is not None, f"{label}: the inspector lists `openstack image create` (POST /v2/images, 201)")
    check(found["id"] in log and found["upstream_id"] == found["id"],
          f"{label}: under the id in glance's log and x-openstack-request-id: {found['id']}")
    check(found["response"]["body"]["json"]["name"] == "e2e-osc",
          f"{label}: with glance's JSON answer, pretty-printable")
    tokens = [h for text in served for h in json.loads(text)["request"]["headers"] if h[0] == "x-auth-token"]
    check(tokens and all(h[1] == "<masked>" for h in tokens) and not any("e2e-token" in t for t in served),
          f"{label}: the inspector never serves the token ({len(tokens)} masked X-Auth-Token headers)")


def capture_replay_har(c, shim, glance, capture, tmp, label):
    """`openstack image set --property` is captured; replayed with an edited body it sets the edited
    property under a new id glance logs; a 64 MiB upload's replay is refused with the reason; the
    session's HAR validates and carries glance's ids."""
    created = json.loads(c.osc("image", "create", "e2e-replay", "--disk-format", "raw",
                               "--container-format", "bare", "-f", "json").stdout)
    image = created["id"]
    c.osc("image", "set", "--property", "k=v", image)
    target = f"/v2/images/{image}"

    def captured():
        """Every whole record in the capture, read from the format's description: the first
        line's JSON, each head as text, each body's bytes as `text` (and `json` if they parse)."""
        records = []
        for name in sorted(os.listdir(capture)):
            if not name.endswith(".rec"):
                continue
            with open(os.path.join(capture, name), "rb") as f:
                data = f.read()
            at = 0
            while (nl := data.find(b"\n", at)) >= 0:
                if not data[at:nl].strip(b"\0 "):
                    at = nl + 1
                    continue
                record = json.loads(data[at:nl])
                pos = nl + 1
                for part in ("request_head", "response_head", "request_body", "response_body"):
                    if record.get(part) is None:
                        continue
                    n = record[part] if part.endswith("head") else record[part]["len"]
                    raw = data[pos:pos + n]
                    pos += n
                    if part.endswith("head"):
                        record[part] = raw.decode("latin-1")
                        continue
                    record[part]["text"] = raw.decode("utf-8", "replace")
                    try:
                        record[part]["json"] = json.loads(raw)
                    except ValueError:
                        pass
                if data[pos:pos + 1] != b"\n":
                    break  # torn
                records.append(record)
                at = pos + 1
        return records
    wait_until("the PATCH in the capture", lambda: any(
        l["method"] == "PATCH" and l["target"] == target for l in captured()), 10)
    patch = [l for l in captured() if l["method"] == "PATCH" and l["target"] == target][-1]
    check(patch["status"] == 200 and "e2e-token" not in json.dumps(patch),
          f"{label}: `openstack image set --property k=v` is captured (200), its token masked")
    patch_ops = patch.get("request_body", {}).get("json") or []
    check(any(op.get("path") == "/k" for op in patch_ops),
          f"{label}: the JSON-patch body is in the capture as it was sent ({patch.get('request_body')})")
    mode = os.stat(capture).st_mode & 0o777
    check(mode == 0o700, f"{label}: the capture directory is 0700 ({mode:o})")

    listed, _ = shim.api("/api/requests")
    original = [r for r in listed["recent"] if r["method"] == "PATCH" and r["target"] == target][0]
    edited = json.dumps([{"op": "replace", "path": "/k", "value": "edited"}])
    status, started = shim.replay({"of": str(original["serial"]), "body": edited})
    check(status == 202, f"{label}: the PATCH is replayed with an edited body ({status} {started})")
    new_id = started["id"]
    wait_until("the replay's completion", lambda: any(
        l.get("message") == "completed" and l.get("id") == new_id for l in shim.lines()), 30)
    done = [l for l in shim.lines() if l.get("message") == "completed" and l.get("id") == new_id][-1]
    check(done["status"] == 200 and new_id != original["id"],
          f"{label}: the replay completed with 200 under a new id {new_id}")
    check(new_id in glance.log_text(), f"{label}: glance's log shows the replay's id {new_id}")
    shown = json.loads(c.osc("image", "show", image, "-f", "json").stdout)
    props = shown.get("properties") or {}
    check(props.get("k") == "edited", f"{label}: the image carries the edited property (k={props.get('k')!r})")

    upload = os.path.join(tmp, "64mib.bin")
    make_payload(upload, 64)
    big = json.loads(c.osc("image", "create", "e2e-replay-64", "--disk-format", "raw", "--container-format",
                           "bare", "--file", upload, "-f", "json").stdout)
    listed, _ = shim.api("/api/requests")
    put = [r for r in listed["recent"] if r["method"] == "PUT" and r["target"] == f"/v2/images/{big['id']}/file"][0]
    status, refused = shim.replay({"of": put["id"]})
    message = refused.get("message", "")
    check(status == 409 and "its 64.0 MiB body was streamed, not kept" in message and "--capture-body" in message,
          f"{label}: a replay of the 64 MiB upload is refused with the reason: {message}")

    har = os.path.join(tmp, "session.har")
    out = subprocess.run([SHIM, "har", capture, "-o", har], capture_output=True, env=CLEAN_ENV)
    check(out.returncode == 0, f"{label}: glance-shim har DIR writes the session ({out.stderr.decode()[-200:]})")
    valid = subprocess.run([os.path.join(ROOT, "tests", "har", "run"), har], capture_output=True)
    check(valid.returncode == 0, f"{label}: the session's HAR validates against the HAR 1.2 schema",
          (valid.stdout + valid.stderr).decode()[-400:])
    with open(har) as f:
        entries = json.load(f)["log"]["entries"]
    log = glance.log_text()
    ids = {e["_upstream_request_id"] for e in entries if e.get("_upstream_request_id")}
    check(new_id in ids and original["id"] in ids and all(i in log for i in (new_id, original["id"])),
          f"{label}: the HAR carries glance's ids ({len(ids)} of {len(entries)} entries), the replay's "
          f"and the original's among them")


def arrival_before_answer(shim, mark, label):
    """Each completed request's arrival line precedes its completion line."""
    lines = shim.since(mark)
    arrived = {}
    for i, l in enumerate(lines):
        if l.get("message") == "arrived":
            arrived.setdefault(l["id"], i)
    for i, l in enumerate(lines):
        if l.get("message") == "completed" and arrived.get(l["id"], i + 1) > i:
            raise AssertionError(f"{label}: no arrival line before the completion of {l['id']}")
    ok(f"{label}: every request's arrival line came before its completion")


# ---------------------------------------------------------------------------------------------
# Scenarios


def breakpoint_check(c, shim, glance, src, pause, label):
    """SIGSTOP glance in the middle of an upload, send a second request while it is stopped, and
    check the shim shows both waiting, then both complete with intact bytes after SIGCONT."""
    status, _, body = c.curl("POST", "/v2/images", "-H", "Content-Type: application/json", "--data",
                             '{"name": "e2e-pause", "disk_format": "raw", "container_format": "bare"}')
    image = json.loads(body)["id"]
    mark = shim.mark()
    results = {}

    def upload():
        results["put"] = c.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--limit-rate", "10M",
                                "-X", "PUT", "-H", "X-Auth-Token: x", "-H", "Expect:",
                                "-H", "Content-Type: application/octet-stream", "-H", "Transfer-Encoding: chunked",
                                "--data-binary", f"@{src}", f"{c.url}/v2/images/{image}/file"]).stdout.decode()

    def get():
        results["get"] = c.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "X-Auth-Token: x",
                                f"{c.url}/v2/images/{image}"]).stdout.decode()

    t_put = threading.Thread(target=upload)
    t_put.start()
    put_line = shim.wait_for("the upload's arrival", lambda l: l.get("message") == "arrived"
                             and l.get("method") == "PUT", since=mark)
    time.sleep(1)  # let a part of the body through before the "breakpoint"
    os.kill(glance.serving_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        t_get = threading.Thread(target=get)
        t_get.start()
        get_line = shim.wait_for("the second request's arrival", lambda l: l.get("message") == "arrived"
                                 and l.get("method") == "GET" and image in l.get("path", ""), since=mark)
        ok(f"{label}: both requests appear in the shim's log while glance is stopped")
        for what, line in (("upload", put_line), ("second request", get_line)):
            notice = shim.wait_for(f"a stall notice for the {what}", lambda l, i=line["id"]: l.get("id") == i
                                   and "probably paused at a breakpoint" in l.get("message", ""),
                                   timeout=STALL_AFTER + 3, since=mark)
            check(notice["waited_s"] >= STALL_AFTER, f"{label}: stall notice for the {what} "
                  f"(after {notice['waited_s']} s, --stall-after {STALL_AFTER}s)")
        remaining = pause - (time.monotonic() - stopped_at)
        if remaining > 0:
            time.sleep(remaining)
    finally:
        os.kill(glance.serving_pid, signal.SIGCONT)
    held = time.monotonic() - stopped_at
    t_put.join(600)
    t_get.join(600)
    check(results.get("put") == "204" and results.get("get") == "200",
          f"{label}: after a {held:.0f} s pause the upload ended 204 and the second request 200", results)
    out = os.path.join(c.tmp, "pause-dl")
    c.curl("GET", f"/v2/images/{image}/file", body_to=out)
    check(sha256_file(out) == sha256_file(src), f"{label}: the image uploaded across the pause is intact")
    os.remove(out)
    c.curl("DELETE", f"/v2/images/{image}")


def big_image(c, big, label):
    start = time.monotonic()
    img = table(c.glance("image-create", "--name", "e2e-big", "--disk-format", "raw", "--container-format",
                         "bare", "--file", big).stdout)
    up = time.monotonic() - start
    out = os.path.join(c.tmp, "big-dl")
    start = time.monotonic()
    c.glance("image-download", "--file", out, img["id"])
    down = time.monotonic() - start
    size = os.path.getsize(big)
    check(sha256_file(out) == sha256_file(big),
          f"{label}: {size / 2**30:.1f} GiB image up ({size / up / 1e6:.0f} MB/s) and down "
          f"({size / down / 1e6:.0f} MB/s) with equal sha256")
    os.remove(out)
    c.glance("image-delete", img["id"])


def long_request_id(c, direct_c, image_path, label):
    long_id = "req-" + "x" * 76
    status, _, _ = direct_c.curl("GET", image_path, "-H", f"X-OpenStack-Request-ID: {long_id}")
    print(f"info  straight to glance, an 80-character X-OpenStack-Request-ID gets {status} (glance bug)")
    status, h, _ = c.curl("GET", image_path, "-H", f"X-OpenStack-Request-ID: {long_id}")
    check(status == 200 and h.get("x-openstack-request-id", "").startswith("req-")
          and len(h["x-openstack-request-id"]) == 40,
          f"{label}: an over-long client request id does not become a glance 500", (status, h))


def gen32(tmp, src, big):
    """glance 32, the eventlet `glance-api` a developer runs by hand."""
    stack = Stack()
    try:
        glance = stack.add(Glance(32, "eventlet", os.path.join(tmp, "g32")).start(free_port()))
        direct = Client(32, glance.url, tmp)
        print(f"\n== glance 32 (eventlet, workers = 0) on {glance.url}", flush=True)
        baseline = run_flows(direct, src, glance.url)

        capture = os.path.join(tmp, "capture32")
        shim = stack.add(Shim(tmp, "shim32").start(free_port(), glance.port, "--stall-after", f"{STALL_AFTER}s",
                                                   "--capture", capture))
        print(f"\n== client -> glance-shim {shim.url} -> glance", flush=True)
        mark = shim.mark()
        c = Client(32, shim.url, tmp)
        same_as_direct(baseline, run_flows(c, src, shim.url), "client -> shim")
        check_correlation(shim, mark, glance, "client -> shim")
        arrival_before_answer(shim, mark, "client -> shim")
        long_request_id(c, direct, "/v2/images", "client -> shim")

        # deploy/apache/glance-shim.conf, as a developer would install it.
        card = stack.add(Apache(os.path.join(tmp, "a32")).start(free_port(), shim.port, apache_snippet(shim.port)))
        print(f"\n== Apache {card.url} -> glance-shim {shim.url} -> glance (in front)", flush=True)
        mark = shim.mark()
        same_as_direct(baseline, run_flows(Client(32, card.url, tmp), src, card.url), "Apache -> shim")
        check_correlation(shim, mark, glance, "Apache -> shim")
        inspector_shows(shim, glance, "Apache -> shim")
        print("\n== capture, replay with an edited body, HAR (Apache -> shim)", flush=True)
        capture_replay_har(Client(32, card.url, tmp), shim, glance, capture, tmp, "Apache -> shim")

        takeover_port = free_port()
        apache = stack.add(Apache(os.path.join(tmp, "a32t")).start(free_port(), takeover_port))
        site = apache.site_digest()
        shim_t = stack.add(Shim(tmp, "shim32t").start(takeover_port, glance.port, "--stall-after", f"{STALL_AFTER}s"))
        print(f"\n== Apache {apache.url} -> its backend port {takeover_port}, taken over by glance-shim -> glance",
              flush=True)
        mark = shim_t.mark()
        same_as_direct(baseline, run_flows(Client(32, apache.url, tmp), src, apache.url), "takeover")
        check_correlation(shim_t, mark, glance, "takeover")
        check(apache.site_digest() == site, "takeover: Apache's site is untouched")

        print("\n== client -> glance-shim over TLS (--tls-cert/--tls-key) -> glance", flush=True)
        cert, key, ca = make_certificates(tmp)
        shim_tls = stack.add(Shim(tmp, "shim32tls").start(free_port(), glance.port, "--tls-cert", cert,
                                                          "--tls-key", key))
        url = f"https://localhost:{shim_tls.port}"
        mark = shim_tls.mark()
        c_tls = Client(32, url, tmp, cacert=ca)
        same_as_direct({k: baseline[k] for k in ("glance", "osc")}, run_flows(c_tls, src, url, ("glance", "osc")),
                       "TLS client -> shim")
        check_correlation(shim_tls, mark, glance, "TLS client -> shim")
        listening = shim_tls.wait_for("the listening line", lambda l: l.get("message") == "listening")
        check(listening.get("tls") is True, "TLS client -> shim: the shim served TLS, with the certificate and "
                                            "key in one PEM file as DevStack keeps them")

        print("\n== breakpoint: glance 32 stopped mid-upload, 5 s", flush=True)
        breakpoint_check(c, shim, glance, src, 5, "client -> shim")

        print(f"\n== {BIG_GIB:g} GiB through the shim", flush=True)
        big_image(c, big, "client -> shim")
    finally:
        stack.close()


def gen25(tmp, src, big):
    """glance 25 (Zed, the release the DevStack recipe was written for): its eventlet `glance-api`
    with workers = 0, Zed's python-openstackclient 6.0.0."""
    stack = Stack()
    try:
        glance = stack.add(Glance(25, "eventlet", os.path.join(tmp, "g25")).start(free_port()))
        direct = Client(25, glance.url, tmp)
        print(f"\n== glance 25 (Zed; eventlet, workers = 0) on {glance.url}", flush=True)
        baseline = run_flows(direct, src, glance.url)

        shim = stack.add(Shim(tmp, "shim25").start(free_port(), glance.port, "--stall-after", f"{STALL_AFTER}s"))
        print(f"\n== client -> glance-shim {shim.url} -> glance 25", flush=True)
        mark = shim.mark()
        c = Client(25, shim.url, tmp)
        same_as_direct(baseline, run_flows(c, src, shim.url), "glance 25: client -> shim")
        check_correlation(shim, mark, glance, "glance 25: client -> shim")

        takeover_port = free_port()
        apache = stack.add(Apache(os.path.join(tmp, "a25t")).start(free_port(), takeover_port))
        site = apache.site_digest()
        shim_t = stack.add(Shim(tmp, "shim25t").start(takeover_port, glance.port, "--stall-after", f"{STALL_AFTER}s"))
        print(f"\n== Apache {apache.url} -> its backend port {takeover_port}, taken over by glance-shim -> glance 25",
              flush=True)
        mark = shim_t.mark()
        same_as_direct(baseline, run_flows(Client(25, apache.url, tmp), src, apache.url), "glance 25: takeover")
        check_correlation(shim_t, mark, glance, "glance 25: takeover")
        check(apache.site_digest() == site, "glance 25: takeover: Apache's site is untouched")

        print("\n== breakpoint: glance 25 stopped mid-upload, 5 s", flush=True)
        breakpoint_check(c, shim, glance, src, 5, "glance 25: client -> shim")
    finally:
        stack.close()


def gen33(tmp, src, big):
    """glance 33: uWSGI as DevStack runs it, then gunicorn as a debugger does."""
    stack = Stack()
    try:
        state = os.path.join(tmp, "g33")
        uwsgi_port = free_port()
        uwsgi = stack.add(Glance(33, "uwsgi", state).start(uwsgi_port))
        direct = Client(33, uwsgi.url, tmp)
        print(f"\n== glance 33 under uWSGI (http-socket, DevStack's devstack@g-api) on {uwsgi.url}", flush=True)
        baseline = run_flows(direct, src, uwsgi.url)

        # DevStack: Apache proxies /image to uWSGI's port.
        devstack_apache = stack.add(Apache(os.path.join(tmp, "a33")).start(free_port(), uwsgi_port))
        site = devstack_apache.site_digest()
        expect_direct = Client(33, devstack_apache.url, tmp)
        expect_status = expect_100(expect_direct, src)
        print(f"info  Apache straight to uWSGI, a curl upload with Expect: 100-continue gets {expect_status} "
              f"(uWSGI never answers 100; README 'Testing against a real glance')")

        shim = stack.add(Shim(tmp, "shim33").start(free_port(), uwsgi_port, "--stall-after", f"{STALL_AFTER}s"))
        card = stack.add(Apache(os.path.join(tmp, "a33c")).start(free_port(), shim.port, apache_snippet(shim.port)))
        print(f"\n== Apache {card.url} -> glance-shim {shim.url} -> uWSGI glance (in front)", flush=True)
        c = Client(33, card.url, tmp)
        mark = shim.mark()
        same_as_direct(baseline, run_flows(c, src, card.url), "Apache -> shim -> uWSGI")
        check_correlation(shim, mark, uwsgi, "Apache -> shim -> uWSGI")
        inspector_shows(shim, uwsgi, "Apache -> shim -> uWSGI")
        check(expect_100(c, src) == 204, "Apache -> shim -> uWSGI: curl upload with Expect: 100-continue -> 204")
        long_request_id(c, direct, "/v2/images", "Apache -> shim -> uWSGI")

        print(f"\n== breakpoint: the uWSGI worker stopped mid-upload behind Apache, {LONG_PAUSE} s", flush=True)
        breakpoint_check(c, shim, uwsgi, src, LONG_PAUSE, "Apache -> shim -> uWSGI")
        stack.things.remove(card)
        card.stop()
        stack.things.remove(shim)
        shim.stop()

        # The debugging recipe: stop devstack@g-api, run glance under the debugger on 9292's stand-in,
        # and let the shim answer on the port Apache already targets. Nothing in Apache is edited.
        uwsgi.stop()
        stack.things.remove(uwsgi)
        debug = stack.add(Glance(33, "gunicorn", state).start(free_port()))
        shim_t = stack.add(Shim(tmp, "shim33t").start(uwsgi_port, debug.port, "--stall-after", f"{STALL_AFTER}s"))
        print(f"\n== takeover: Apache {devstack_apache.url} -> glance-shim on uWSGI's port {uwsgi_port} -> "
              f"gunicorn glance {debug.url} (--timeout 0)", flush=True)
        c = Client(33, devstack_apache.url, tmp)
        mark = shim_t.mark()
        same_as_direct(baseline, run_flows(c, src, devstack_apache.url), "takeover (gunicorn)")
        check_correlation(shim_t, mark, debug, "takeover (gunicorn)")
        check(devstack_apache.site_digest() == site, "takeover: Apache's site is untouched")

        print("\n== client -> glance-shim -> gunicorn glance", flush=True)
        direct_shim = Client(33, shim_t.url, tmp)
        same_as_direct({"glance": baseline["glance"]}, run_flows(direct_shim, src, shim_t.url, ("glance",)),
                       "client -> shim -> gunicorn")

        print(f"\n== {BIG_GIB:g} GiB: Apache -> shim -> gunicorn glance", flush=True)
        big_image(c, big, "Apache -> shim -> gunicorn")

        print("\n== the debugger restarts", flush=True)
        debugger_restart(c, debug, shim_t, devstack_apache, tmp)
    finally:
        stack.close()


def make_certificates(tmp):
    """A CA and a certificate for localhost signed by it, made with openssl; the certificate and its
    key go into one PEM file, the way DevStack keeps /opt/stack/data/devstack-cert.pem."""
    d = os.path.join(tmp, "pki")
    os.makedirs(d, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=glance-shim e2e CA", "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
        "-out", "server.csr")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
    combined = os.path.join(d, "devstack-cert.pem")
    with open(combined, "w") as out:
        for part in ("server.pem", "server.key"):
            with open(os.path.join(d, part)) as f:
                out.write(f.read())
    return combined, combined, os.path.join(d, "ca.pem")


def expect_100(c, src):
    """curl PUT of 2 MiB with Expect: 100-continue (curl adds it itself to any body over 1 MiB)."""
    status, _, body = c.curl("POST", "/v2/images", "-H", "Content-Type: application/json", "--data",
                             '{"name": "e2e-expect", "disk_format": "raw", "container_format": "bare"}')
    image = json.loads(body)["id"]
    part = os.path.join(c.tmp, "2mib")
    with open(src, "rb") as f, open(part, "wb") as g:
        g.write(f.read(2 << 20))
    status, _, _ = c.curl("PUT", f"/v2/images/{image}/file", "-H", "Expect: 100-continue",
                          "-H", "Content-Type: application/octet-stream", "--data-binary", f"@{part}")
    c.curl("DELETE", f"/v2/images/{image}")
    return status


def debugger_restart(c, debug, shim, apache, tmp):
    port = debug.port
    debug.stop()
    status, h, body = c.curl("GET", "/v2/images")
    check(status == 502 and h.get("content-type") == "application/json",
          "glance stopped: Apache relays the shim's 502 with a JSON body", (status, h))
    message = json.loads(body)["message"]
    check(f"127.0.0.1:{port}" in message and "debug glance-api running" in message,
          "the 502 names the upstream and asks whether the debug glance-api runs", message)
    dead = Apache(os.path.join(tmp, "a-dead")).start(free_port(), free_port())
    try:
        status, h, _ = Client(33, dead.url, tmp).curl("GET", "/v2/images")
        print(f"info  without the shim, Apache answers a stopped glance with {status} {h.get('content-type')}")
    finally:
        dead.stop()
    debug.start(port)
    status, _, _ = c.curl("GET", "/v2/images")
    check(status == 200, "glance started again: the next request succeeds, nothing done to the shim")

    shim.stop()
    shim.start(shim.port, port, "--stall-after", f"{STALL_AFTER}s", "--wait-upstream", "30s")
    debug.stop()
    result = {}
    started = time.monotonic()
    t = threading.Thread(target=lambda: result.update(r=c.curl("GET", "/v2/images")))
    t.start()
    shim.wait_for("a held request", lambda l: "Holding requests" in l.get("message", ""))
    debug.start(port)
    t.join(60)
    status = result.get("r", (None,))[0]
    check(status == 200, f"--wait-upstream 30s: a request sent while glance was down completed once it was "
                         f"back ({time.monotonic() - started:.1f} s)", result)


def main():
    # A CI timeout or Ctrl-C must still run every `finally` that stops glance, Apache and the shim
    # (they run in their own sessions and would outlive the suite).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not os.access(SHIM, os.X_OK):
        sys.exit(f"no {SHIM}: run `cargo build --release` (tests/e2e/run does)")
    tmp = tempfile.mkdtemp(prefix="glance-shim-e2e-")
    os.chmod(tmp, 0o755)  # Apache's children run as www-data and read nothing here, but may traverse
    src = os.path.join(tmp, "payload.bin")
    big = os.path.join(tmp, "big.bin")
    make_payload(src, MIB)
    make_payload(big, BIG_GIB * 1024)
    started = time.monotonic()
    for name, scenario in (("gen25", gen25), ("gen32", gen32), ("gen33", gen33),
                           ("uwsgi", lambda tmp, src, big: uwsgi_front.scenario(tmp, check)),
                           ("services", lambda tmp, src, big: services_front.scenario(tmp, check))):
        if ONLY and name not in ONLY:
            continue
        try:
            scenario(tmp, src, big)
        except Exception as e:
            failed.append(f"{name}: {e}")
            print(f"FAIL  {name}: {e}", flush=True)
            traceback.print_exc()
    print(f"\n{len(passed)} checks passed, {len(failed)} scenario(s) failed, "
          f"{time.monotonic() - started:.0f} s; logs in {tmp}")
    if failed:
        for f in failed:
            print(f"FAIL  {f}")
        sys.exit(1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
