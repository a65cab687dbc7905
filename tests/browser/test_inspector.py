#!/usr/bin/env python3
"""The inspector page in a real browser (headless Chromium driven by Playwright).

Starts a fake glance on 127.0.0.1 that can hold a request as a paused debugger would, the release
build of glance-shim in front of it with --inspect, and Chromium on the inspector's page. Then it
sends requests through the shim and checks what the page shows. Prints PASS/FAIL per check and
exits non-zero on any failure. Standard library and playwright only; run it with tests/browser/run.
"""
import argparse
import http.client
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "har"))
import validate  # noqa: E402 - tests/har/validate.py: the HAR 1.2 schema check

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "browser" / "out"
PAGE_SRC = ROOT / "src" / "inspect" / "page.html"
TOKEN = "gAAAAA-secret-token-value"
PASSWORD = "s3cret-passw0rd-value"
APACHE_TIMEOUT = 30  # seconds: the Timeout of the Apache configuration the shim is pointed at
IMAGE_ID = "5d2f6a3e-8b7c-4e21-9a0f-3c6b1d2e4f70"
UPLOAD = 3 * 1024 * 1024
DOWNLOAD = 5 * 1024 * 1024
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

results = []


def check(name, ok, detail=""):
    results.append((name, bool(ok)))
    print(("PASS  " if ok else "FAIL  ") + name + (f"  [{detail}]" if detail else ""), flush=True)
    return bool(ok)


def wait_for(fn, timeout, interval=0.05):
    """fn() until it returns something truthy or timeout seconds pass; returns the last value."""
    end = time.monotonic() + timeout
    while True:
        v = fn()
        if v or time.monotonic() >= end:
            return v
        time.sleep(interval)


# ---------------------------------------------------------------- the fake glance


class Glance(BaseHTTPRequestHandler):
    """Answers like glance: JSON with a Content-Length, kept-alive connections (HTTP/1.1), the request
    id echoed. Holds /v2/images/held until the test sets server.release (a paused debugger), and
    closes the connection without an answer on .../members (a crashed worker)."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Head and body are written separately: without this, Nagle and delayed ACKs add 40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def handle_any(self):
        n = int(self.headers.get("Content-Length") or 0)
        while n > 0:
            n -= len(self.rfile.read(min(n, 1 << 16)) or b"x" * n)
        path = urllib.parse.urlsplit(self.path).path
        rid = self.headers.get("X-OpenStack-Request-ID") or f"req-{uuid.uuid4()}"
        self.server.seen.append((self.command, path, {k.lower(): v for k, v in self.headers.items()}))
        status, ctype, data = 200, "application/json", None
        if path.startswith("/v2/images/held") and self.headers.get("X-Auth-Token") == "expired":
            status, payload = 401, {"error": {"code": 401, "title": "Unauthorized",
                                              "message": "The request you have made requires authentication."}}
        elif path.startswith("/v2/images/held"):
            self.server.held_seen.set()
            self.server.release.wait(120)
            payload = {"id": "held", "name": "cirros-0.6.2-x86_64-disk", "status": "active",
                       "disk_format": "qcow2", "visibility": "public", "size": 21430272}
            if self.headers.get("X-Debug"):
                payload["debug"] = self.headers["X-Debug"]
        elif path.endswith("/members"):
            self.close_connection = True
            return
        elif path == "/v2/images" and self.command == "POST":
            status, payload = 201, {"id": IMAGE_ID, "name": "debug-image", "status": "queued",
                                    "file": f"/v2/images/{IMAGE_ID}/file"}
        elif path == "/v2/images":
            payload = {"images": [{"id": str(uuid.uuid4()), "name": f"image-{i}", "status": "active"}
                                  for i in range(3)], "first": "/v2/images", "schema": "/v2/schemas/images"}
        elif path == "/v2/schemas/image":
            payload = {"name": "image", "properties": {"id": {"type": "string"}, "name": {"type": ["null", "string"]}}}
        elif path == "/versions":
            payload = {"versions": [{"id": "v2.16", "status": "CURRENT"}]}
        elif path.endswith("/file") and self.command == "GET":
            ctype, data = "application/octet-stream", bytes(range(256)) * (DOWNLOAD // 256)
        elif path.startswith("/v2/images/" + IMAGE_ID) and self.command in ("PUT", "DELETE"):
            status, data = 204, b""
        else:
            status = 404
            payload = {"code": 404, "title": "Not Found", "message": f"No image found with ID {path.rsplit('/', 1)[-1]}"}
        if data is None:
            data = json.dumps(payload).encode()
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Openstack-Request-Id", rid)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any


def start_glance():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Glance)
    srv.daemon_threads = True
    srv.release = threading.Event()
    srv.held_seen = threading.Event()
    srv.seen = []
    threading.Thread(target=srv.serve_forever, name="fake-glance", daemon=True).start()
    return srv


# ---------------------------------------------------------------- the shim


class Shim:
    def __init__(self, binary, upstream_port):
        self.lines = []
        # As with --takeover: the Apache in front (its configuration, not a running Apache) gives up
        # on a held request after its Timeout, which the in-flight row counts down.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        listen_port = sock.getsockname()[1]
        sock.close()
        self.apache_dir = tempfile.mkdtemp(prefix="glance-shim-browser-apache-")
        apache_conf = os.path.join(self.apache_dir, "apache2.conf")
        with open(apache_conf, "w") as f:
            f.write(f"Timeout {APACHE_TIMEOUT}\n<VirtualHost *:80>\n"
                    f"ProxyPass \"/image\" \"http://127.0.0.1:{listen_port}\" retry=0\n</VirtualHost>\n")
        self.proc = subprocess.Popen(
            [str(binary), "--listen", f"127.0.0.1:{listen_port}", "--upstream", f"127.0.0.1:{upstream_port}",
             "--inspect", "127.0.0.1:0", "--stall-after", "1s", "--log-format", "json",
             "--apache-config", apache_conf],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.ready = queue.Queue()
        # Drain stderr all the time: the shim waits for a paused log reader, so a full pipe would stall it.
        threading.Thread(target=self._read, name="shim-stderr", daemon=True).start()
        try:
            line = self.ready.get(timeout=20)
        except queue.Empty:
            line = None
        if line is None:
            raise RuntimeError("glance-shim printed no 'listening' line:\n" + self.tail())
        self.listen = line.get("listen")
        self.inspector = line.get("inspector")
        if not self.listen or not self.inspector:
            raise RuntimeError(f"the 'listening' line lacks 'listen' or 'inspector': {line}")
        host, port = self.listen.rsplit(":", 1)
        self.host, self.port = host, int(port)
        u = urllib.parse.urlsplit(self.inspector)
        self.inspect_host, self.inspect_port = u.hostname, u.port
        self.origin = f"{u.scheme}://{u.netloc}"

    def _read(self):
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(text)
            try:
                obj = json.loads(text)
            except ValueError:
                continue
            if isinstance(obj, dict) and obj.get("message") == "listening":
                self.ready.put(obj)
        self.ready.put(None)

    def tail(self, n=30):
        return "\n".join(self.lines[-n:])

    def stop(self):
        shutil.rmtree(self.apache_dir, ignore_errors=True)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def through_shim(shim, method, path, headers=None, body=None, timeout=60):
    conn = http.client.HTTPConnection(shim.host, shim.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def inspector_get(shim, path, timeout=10):
    conn = http.client.HTTPConnection(shim.inspect_host, shim.inspect_port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict((k.lower(), v) for k, v in resp.getheaders()), resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def read_events(shim, seconds):
    """The first `seconds` of /api/events?since=0, as text."""
    conn = http.client.HTTPConnection(shim.inspect_host, shim.inspect_port, timeout=seconds)
    chunks = []
    try:
        conn.request("GET", "/api/events?since=0")
        resp = conn.getresponse()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                b = resp.read1(65536)
            except (TimeoutError, OSError):
                break
            if not b:
                break
            chunks.append(b)
    finally:
        conn.close()
    return b"".join(chunks).decode("utf-8", "replace")


# ---------------------------------------------------------------- the checks


def static_checks():
    """page.html obeys the rules the shim's Content-Security-Policy relies on."""
    html = PAGE_SRC.read_text()
    scripts = re.findall(r"<script\b([^>]*)>", html)
    styles = re.findall(r"<style\b([^>]*)>", html)
    check("0. page.html has exactly one <script> and one <style>, neither with attributes",
          scripts == [""] and styles == [""], f"script tags {scripts!r}, style tags {styles!r}")
    bad = [p for p in (r"\son[a-z]+\s*=", r"style\s*=", r"innerHTML", r"outerHTML", r"insertAdjacentHTML",
                       r"document\.write", r"\beval\s*\(", r"new Function", r"<link(?![^>]*href=\"data:)",
                       r"<img", r"<iframe", r"<object", r"<embed") if re.search(p, html)]
    css = html.split("<style>", 1)[-1].split("</style>", 1)[0]
    bad += [p for p in (r"@import", r"\burl\(") if re.search(p, css)]
    check("0. page.html has no inline handlers, style attributes, HTML strings, eval or external resources",
          not bad, f"found {bad}" if bad else "")


def run(args):
    binary = ROOT / "target" / "release" / "glance-shim"
    if not binary.exists():
        check("glance-shim is built", False, f"{binary} is missing: cargo build --release --bin glance-shim")
        return
    static_checks()
    OUT.mkdir(parents=True, exist_ok=True)
    glance = start_glance()
    shim = None
    senders = []
    try:
        shim = Shim(binary, glance.server_address[1])
        print(f"fake glance on 127.0.0.1:{glance.server_address[1]}, shim on {shim.listen}, "
              f"inspector at {shim.inspector}", flush=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            try:
                browse(args, shim, glance, browser, senders)
            finally:
                glance.release.set()
                browser.close()
    finally:
        glance.release.set()
        for t in senders:
            t.join(10)
        if shim:
            shim.stop()
            if not all(ok for _, ok in results):
                print("---- the shim's last log lines ----\n" + shim.tail(), flush=True)
        glance.shutdown()
        glance.server_close()


def browse(args, shim, glance, browser, senders):
    console_errors, page_errors, foreign = [], [], []
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page_errors.append(str(e)))

    seen = set()

    def on_request(url):
        u = urllib.parse.urlsplit(url)
        if u.scheme == "data":
            return
        seen.add(u.path)
        if f"{u.scheme}://{u.netloc}" != shim.origin:
            foreign.append(url)
    page.on("request", lambda req: on_request(req.url))
    # Playwright does not report every request (EventSource's, for one); the DevTools protocol does.
    cdp = page.context.new_cdp_session(page)
    cdp.on("Network.requestWillBeSent", lambda ev: on_request(ev["request"]["url"]))
    cdp.send("Network.enable")

    resp = page.goto(shim.inspector)
    csp = (resp.headers.get("content-security-policy") or "") if resp else ""
    check("0. the page is served with the Content-Security-Policy", "default-src 'none'" in csp, csp[:80])
    live = wait_for(lambda: page.inner_text("#conn").strip() == "live", 5)
    check("0. the page connects to the event stream (shows 'live')", live, page.inner_text("#conn"))
    shim_text = page.inner_text("#shim")
    check("0. the header shows the listen and upstream addresses",
          shim.listen in shim_text and str(glance.server_address[1]) in shim_text, shim_text)

    # 1. a request held by the paused glance shows up in flight, with a rising counter, then stalled
    held_result = {}

    def send_held():
        body = json.dumps({"name": "cirros-0.6.2-x86_64-disk", "password": PASSWORD,
                           "tags": ["debug", "breakpoint"], "min_disk": 1})
        held_result["sent"] = time.monotonic()
        try:
            held_result["status"], held_result["body"] = through_shim(
                shim, "PATCH", "/v2/images/held",
                {"X-Auth-Token": TOKEN, "Content-Type": "application/json", "Accept": "application/json",
                 "User-Agent": "python-glanceclient"}, body)
        except Exception as e:  # noqa: BLE001 - reported through the checks
            held_result["error"] = repr(e)
    t = threading.Thread(target=send_held, name="held-request", daemon=True)
    senders.append(t)
    t.start()
    wait_for(lambda: "sent" in held_result, 5, 0.005)
    row = page.locator("#inflight tr.row", has_text="/v2/images/held")
    shown = wait_for(lambda: row.count() == 1 and row.is_visible(), 5, 0.02)
    took = time.monotonic() - held_result["sent"]
    check("1. the held request appears in the in-flight table within 1 s", shown and took <= 1.0, f"{took:.2f} s")
    if not shown:
        return
    serial = row.get_attribute("data-serial")
    early_stalled = "stalled" in (row.get_attribute("class") or "")
    h1 = float(row.locator(".held").inner_text().split()[0])
    time.sleep(1.5)
    h2 = float(row.locator(".held").inner_text().split()[0])
    check("1. its held-for counter rises", 1.0 <= h2 - h1 <= 2.5, f"{h1:.1f} s, 1.5 s later {h2:.1f} s")
    stalled = wait_for(lambda: "stalled" in (row.get_attribute("class") or ""), 4)
    since = time.monotonic() - held_result["sent"]
    label = row.inner_text()
    bg = row.evaluate("r => getComputedStyle(r).backgroundColor")
    apache = row.locator(".pill.apache")
    left = [float(t.split()[-2]) for t in [apache.inner_text()] if apache.count() == 1 and t.split()[-1] == "s"]
    time.sleep(1.2)
    left += [float(t.split()[-2]) for t in [apache.inner_text()] if apache.count() == 1 and t.split()[-1] == "s"]
    check("1. its row counts down to Apache's Timeout (read from its configuration)",
          len(left) == 2 and APACHE_TIMEOUT - 5 < left[1] < left[0] <= APACHE_TIMEOUT,
          f"{left} (Timeout {APACHE_TIMEOUT})")
    check("1. it is highlighted as stalled after --stall-after (1 s)",
          stalled and not early_stalled and "probably paused at a breakpoint" in label
          and bg not in ("rgba(0, 0, 0, 0)", "rgb(255, 255, 255)"),
          f"not stalled at first sight, stalled {since:.1f} s after sending, background {bg}")

    # other requests, finished while the held one waits (for the filter and the screenshot)
    others = [("GET", "/versions", None, 200), ("GET", "/v2/images?limit=20&sort_key=name", None, 200),
              ("GET", "/v2/schemas/image", None, 200), ("GET", "/v2/images/missing", None, 404),
              ("POST", "/v2/images", json.dumps({"name": "debug-image", "disk_format": "qcow2",
                                                 "container_format": "bare"}), 201),
              ("PUT", f"/v2/images/{IMAGE_ID}/file", b"\0" * UPLOAD, 204),
              ("GET", f"/v2/images/{IMAGE_ID}/file", None, 200),
              ("GET", f"/v2/images/{IMAGE_ID}/members", None, 502),
              ("DELETE", f"/v2/images/{IMAGE_ID}", None, 204)]
    got = []
    for method, path, body, _ in others:
        headers = {"X-Auth-Token": TOKEN, "Accept": "application/json", "User-Agent": "python-glanceclient"}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        try:
            st, _ = through_shim(shim, method, path, headers, body)
        except (OSError, http.client.HTTPException) as e:
            st = repr(e)
        got.append(st)
    check("   the other requests get glance's answers (and a 502 for the crash)",
          got == [s for _, _, _, s in others], f"{got}")
    recent_rows = page.locator("#recent tr.row:visible")
    wait_for(lambda: recent_rows.count() == len(others), 3)

    # 3. the detail view of the held request
    row.click()
    detail = page.locator("#detail")
    loaded = wait_for(lambda: detail.is_visible() and "x-auth-token" in page.inner_text("#d-reqh"), 3)
    check("3. clicking the row opens the detail view", loaded)
    if not loaded:
        return
    headers = dict(tuple(c.inner_text() for c in r.locator("td").all()[:2])
                   for r in page.locator("#d-reqh tr").all())
    check("3. the token header shows as <masked>", headers.get("x-auth-token") == "<masked>",
          f"x-auth-token: {headers.get('x-auth-token')!r}")
    pre = page.locator("#d-reqb pre.json")
    text = pre.inner_text() if pre.count() else ""
    try:
        shown_json = json.loads(text)
    except ValueError:
        shown_json = None
    check("3. the JSON body is pretty-printed with the password masked",
          text.count("\n") >= 4 and "\n  \"name\"" in text and shown_json is not None
          and shown_json.get("password") == "<masked>" and shown_json.get("tags") == ["debug", "breakpoint"],
          f"{text.count(chr(10)) + 1} lines, password {shown_json and shown_json.get('password')!r}")
    curl = page.inner_text("#curl")
    check("3. copy-as-curl uses $OS_TOKEN",
          "$OS_TOKEN" in curl and "-X PATCH" in curl and f"http://{shim.listen}/v2/images/held" in curl
          and "--data-binary" in curl and TOKEN not in curl, curl.replace("\n", " ")[:160])
    page.click("#copy-curl")
    note = wait_for(lambda: page.inner_text("#copy-note").strip(), 3)
    check("3. the copy-as-curl button works or falls back without an error", note and not page_errors, note)
    page.click("#copy-id")
    wait_for(lambda: page.inner_text("#copy-note").strip(), 3)

    # 6. the screenshot: recent requests, the stalled one in flight, its detail open
    time.sleep(0.4)
    shot = OUT / "inspector.png"
    page.mouse.move(700, 880)
    page.evaluate("""() => { document.getElementById('copy-box').hidden = true;
        document.getElementById('copy-note').textContent = ''; document.activeElement.blur(); }""")
    page.screenshot(path=str(shot))

    leaks = []
    if TOKEN in page.content():
        leaks.append("page HTML (in flight)")
    _, _, listing = inspector_get(shim, "/api/requests")
    _, _, one = inspector_get(shim, f"/api/requests/{serial}")
    events = read_events(shim, 1.5)
    for name, body in (("/api/requests", listing), (f"/api/requests/{serial}", one), ("/api/events", events)):
        if TOKEN in body:
            leaks.append(name + " (token)")
        if PASSWORD in body:
            leaks.append(name + " (password)")

    # 2. glance resumes: the request finishes with its status and timings
    glance.release.set()
    done_row = page.locator(f"#recent tr.row[data-serial='{serial}']")
    finished = wait_for(lambda: done_row.count() == 1 and done_row.locator(".status").inner_text() == "200", 3)
    t.join(10)
    cells = done_row.locator("td").all_inner_texts() if done_row.count() else []
    total = done_row.locator(".total").inner_text() if finished else ""
    hdrs = done_row.locator(".hdrs").inner_text() if finished else ""
    timing_re = r"^\d+(\.\d+)? (ms|s)$"
    check("2. after glance resumes it shows status 200 in the recent table",
          finished and held_result.get("status") == 200
          and page.locator(f"#inflight tr.row[data-serial='{serial}']").count() == 0,
          f"client got {held_result.get('status')}, row {cells}")
    check("2. with its total time and time to glance's headers",
          re.match(timing_re, total) and re.match(timing_re, hdrs) and float(total.split()[0]) > 0,
          f"total {total!r}, headers {hdrs!r}")
    check("2. with its arrival time as HH:MM:SS.mmm and the id glance logs",
          cells and re.match(r"^\d\d:\d\d:\d\d\.\d{3}$", cells[0]) and any(c.startswith("req-") for c in cells),
          f"{cells[:1]}")
    crash = page.locator("#recent tr.row", has_text="/members")
    check("2. a request that did not complete is visibly marked",
          crash.count() == 1 and "failed" in (crash.get_attribute("class") or "")
          and crash.locator(".bad").count() == 1 and "upstream_broke_off" in crash.inner_text(),
          " ".join(crash.inner_text().split()) if crash.count() == 1 else f"{crash.count()} rows")
    refreshed = wait_for(lambda: "200" in page.inner_text("#d-summary")
                         and "x-openstack-request-id" in page.inner_text("#d-resph"), 3)
    check("2. the open detail view refreshes with the response", refreshed)
    if TOKEN in page.content():
        leaks.append("page HTML (done)")
    _, _, one = inspector_get(shim, f"/api/requests/{serial}")
    if TOKEN in one or PASSWORD in one:
        leaks.append(f"/api/requests/{serial} (done)")
    check("3. the real token and password appear nowhere in the page or the API", not leaks,
          f"leaked in {leaks}" if leaks else "page HTML, /api/requests, /api/requests/N, /api/events")

    # 4. the filter
    page.click("#detail-close")
    every = len(others) + 1
    n = lambda: recent_rows.count()  # noqa: E731
    wait_for(lambda: n() == every, 3)
    before = n()
    outcomes = {}
    for query, want in (("schemas", 1), ("status:404", 1), ("IMAGES", 8), ("method:patch", 1), ("/file", 2),
                        ("status:20", 8), ("broke", 1), ("no-such-thing", 0), ("", every)):
        page.fill("#filter", query)
        wait_for(lambda: n() == want, 2)  # noqa: B023 - called at once
        outcomes[query or "(cleared)"] = n()
    expected = {"schemas": 1, "status:404": 1, "IMAGES": 8, "method:patch": 1, "/file": 2, "status:20": 8,
                "broke": 1, "no-such-thing": 0, "(cleared)": every}
    check("4. the filter narrows the recent list and restores it when cleared",
          before == every and outcomes == expected, f"{before} rows; {outcomes}")
    page.fill("#filter", "status:404")
    wait_for(lambda: n() == 1, 2)
    only = page.locator("#recent tr.row:visible").all_inner_texts()
    check("4. status:404 leaves the 404", len(only) == 1 and "/v2/images/missing" in only[0],
          " | ".join(" ".join(t.split()) for t in only) or "no row")

    # The HAR button downloads what the filter shows, and it is valid HAR 1.2.
    with page.expect_download() as dl:
        page.click("#har")
    path = OUT / "filtered.har"
    dl.value.save_as(path)
    har = json.loads(path.read_text())
    found = validate.problems(har)
    urls = [e["request"]["url"] for e in har["log"]["entries"]]
    check("7. 'Export HAR' with status:404 downloads that one request as valid HAR 1.2",
          not found and len(urls) == 1 and urls[0].endswith("/v2/images/missing"),
          "; ".join(found[:3]) or ", ".join(urls))
    page.fill("#filter", "")
    with page.expect_download() as dl:
        page.click("#har")
    path = OUT / "session.har"
    dl.value.save_as(path)
    har = json.loads(path.read_text())
    found = validate.problems(har)
    text = path.read_text()
    leaked = [s for s in (TOKEN, PASSWORD) if s in text]
    ids = {e["_request_id"] for e in har["log"]["entries"]}
    check("7. unfiltered, every request, glance's ids, no secret, valid HAR 1.2",
          not found and not leaked and len(ids) == every and all(i.startswith("req-") for i in ids),
          "; ".join(found[:3]) or f"{len(ids)} ids; leaked {leaked}")

    # 8. replay: edit a field, send it again, compare; a 401 asks for a fresh token
    page.fill("#filter", "")
    page.locator("#recent tr.row", has_text="/v2/images/held").first.click()
    wait_for(lambda: page.locator("#d-reqh tr").count() > 0, 3)
    check("8. the page took the key from its address and dropped it from the address bar",
          "key=" not in page.url and not page.locator("#replay").is_disabled(), page.url)
    before = len(glance.seen)
    page.click("#edit-replay")
    heads = page.input_value("#e-headers")
    page.fill("#e-headers", heads + "\nX-Debug: from-the-page")
    page.click("#e-send")
    sent = wait_for(lambda: "sent again as req-" in page.inner_text("#replay-note"), 5)
    new_id = page.inner_text("#replay-note").rsplit(" ", 1)[-1]
    got = [h for (m, p, h) in glance.seen[before:] if p == "/v2/images/held"]
    check("8. 'edit and replay' sends the edited field with the original token and a new id",
          sent and len(got) == 1 and got[0].get("x-debug") == "from-the-page"
          and got[0].get("x-auth-token") == TOKEN and got[0].get("x-openstack-request-id") == new_id,
          f"{page.inner_text('#replay-note')!r}; glance got {[(h.get('x-debug'), h.get('x-openstack-request-id')) for h in got]}")
    shown = wait_for(lambda: page.locator("#compare").is_visible() and "/debug" in page.inner_text("#cmp"), 5)
    check("8. the replay is shown beside the original: status and the JSON difference marked",
          shown and "replay of" in page.inner_text("#d-summary"), page.inner_text("#cmp")[:200].replace("\n", " | "))
    page.screenshot(path=str(OUT / "replay.png"))
    page.click("#edit-replay")
    heads = page.input_value("#e-headers")
    page.fill("#e-headers", re.sub(r"(?im)^x-auth-token:.*$", "X-Auth-Token: expired", heads))
    page.click("#e-send")
    asked = wait_for(lambda: page.locator("#expired").is_visible() and "401" in page.inner_text("#expired"), 5)
    check("8. a 401 says the token has probably expired and asks for a fresh one", asked,
          page.inner_text("#expired")[:120] if asked else page.inner_text("#replay-note"))
    before = len(glance.seen)
    page.fill("#x-token", "fresh-token-from-the-page")
    page.click("#x-send")
    wait_for(lambda: any(p == "/v2/images/held" for (m, p, h) in glance.seen[before:]), 5)
    got = [h for (m, p, h) in glance.seen[before:] if p == "/v2/images/held"]
    check("8. the fresh token is sent, and the replay gets 200",
          len(got) == 1 and got[0].get("x-auth-token") == "fresh-token-from-the-page"
          and wait_for(lambda: page.inner_text("#d-summary").split("\n")[1].strip() == "200", 5),
          page.inner_text("#d-summary")[:80].replace("\n", " | "))
    leaks = [s for s in (TOKEN, PASSWORD, "fresh-token-from-the-page") if s in page.content()]
    check("8. no token is in the page after replays", not leaks, str(leaks))

    # 5. a clean console and no request anywhere but the inspector
    time.sleep(0.3)
    check("5. the browser console has no errors", not console_errors and not page_errors,
          "; ".join(console_errors + page_errors)[:300])
    check("5. no request left the inspector's origin", not foreign and "/api/events" in seen,
          ", ".join(foreign[:5]) if foreign else "only " + ", ".join(sorted({re.sub(r"/\d+$", "/N", p) for p in seen})))

    check("6. a screenshot was saved", shot.exists() and shot.stat().st_size > 10000, str(shot.relative_to(ROOT)))
    if args.update_docs:
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copyfile(shot, docs / "inspector.png")
        print(f"      copied to {(docs / 'inspector.png').relative_to(ROOT)}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--update-docs", action="store_true", help="also copy the screenshot to docs/inspector.png")
    args = ap.parse_args()
    try:
        run(args)
    except Exception:  # noqa: BLE001 - any crash is a failure, reported as one
        traceback.print_exc()
        check("the test ran to its end", False)
    failed = [name for name, ok in results if not ok]
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed", flush=True)
    sys.exit(1 if failed or not results else 0)


if __name__ == "__main__":
    main()
