#!/usr/bin/env python3
"""Validates HAR archives against the HAR 1.2 JSON schema, and checks what the schema cannot say.

    validate.py FILE...            validate archives written by glance-shim (or anyone)
    validate.py --live --shim BIN  start BIN in front of a small upstream, send it requests of every
                                   kind, and validate what its inspector's /api/har gives

The schema is npm's har-schema 2.0.0 (the schema har-validator uses), fetched from the npm registry and
checked against its published sha512; the validator is PyPI's jsonschema, with format checks. Beyond
the schema, HAR 1.2 says (and har-schema does not check):
- `timings.send`, `wait` and `receive` are >= 0, the others >= 0 or -1, and `time` is their sum;
- custom fields start with an underscore.
"""

import argparse
import base64
import hashlib
import http.client
import io
import json
import os
import pathlib
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jsonschema
import referencing

SCHEMA_VERSION = "2.0.0"
SCHEMA_URL = f"https://registry.npmjs.org/har-schema/-/har-schema-{SCHEMA_VERSION}.tgz"
SCHEMA_SHA512 = "Oqluz6zhGX8cyRaTQlFMPw80bSJVG2x/cFb8ZPhUILGgHka9SsokCCOQgpveePerqidZOrT14ipqfJb7ILcW5Q=="
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "glance-shim-har"


def schemas():
    """har-schema's files by name, fetched once into the cache."""
    lib = CACHE / f"har-schema-{SCHEMA_VERSION}"
    if not (lib / "har.json").exists():
        raw = urllib.request.urlopen(SCHEMA_URL, timeout=60).read()
        digest = base64.b64encode(hashlib.sha512(raw).digest()).decode()
        if digest != SCHEMA_SHA512:
            sys.exit(f"validate.py: {SCHEMA_URL} does not match its published sha512")
        lib.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            for member in tar.getmembers():
                if member.name.startswith("package/lib/") and member.name.endswith(".json"):
                    (lib / pathlib.Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return {p.name: json.loads(p.read_text()) for p in lib.glob("*.json")}


def validator():
    docs = schemas()
    registry = referencing.Registry().with_resources(
        (doc["$id"].rstrip("#"), referencing.Resource.from_contents(doc, referencing.jsonschema.DRAFT6))
        for doc in docs.values())
    cls = jsonschema.Draft6Validator
    return cls(docs["har.json"], registry=registry, format_checker=cls.FORMAT_CHECKER), docs


# The objects whose own fields HAR names, and the schema file that names them.
OBJECTS = {
    "log": "log.json", "creator": "creator.json", "entry": "entry.json", "request": "request.json",
    "response": "response.json", "postData": "postData.json", "content": "content.json",
    "timings": "timings.json", "cache": "cache.json", "header": "header.json", "query": "query.json",
}


def problems(har):
    """Every way `har` breaks HAR 1.2, as strings (none when it is valid)."""
    v, docs = validator()
    out = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(har)]
    if out:
        return out

    def own_fields(obj, kind, where):
        known = set(docs[OBJECTS[kind]].get("properties", {}))
        for key in obj:
            if key not in known and not key.startswith("_"):
                out.append(f"{where}: '{key}' is not a HAR field and does not start with '_'")

    log = har["log"]
    own_fields(log, "log", "log")
    own_fields(log["creator"], "creator", "log.creator")
    for i, e in enumerate(log["entries"]):
        at = f"entries[{i}]"
        own_fields(e, "entry", at)
        for kind in ("request", "response", "timings", "cache"):
            own_fields(e[kind], kind, f"{at}.{kind}")
        if "postData" in e["request"]:
            own_fields(e["request"]["postData"], "postData", f"{at}.request.postData")
        own_fields(e["response"]["content"], "content", f"{at}.response.content")
        for m in ("request", "response"):
            for h in e[m]["headers"]:
                own_fields(h, "header", f"{at}.{m}.headers")
        for q in e["request"]["queryString"]:
            own_fields(q, "query", f"{at}.request.queryString")
        t = e["timings"]
        for k in ("send", "wait", "receive"):
            if t[k] < 0:
                out.append(f"{at}.timings.{k} is {t[k]}, below 0")
        for k in ("blocked", "dns", "connect", "ssl"):
            if k in t and t[k] < 0 and t[k] != -1:
                out.append(f"{at}.timings.{k} is {t[k]}: neither >= 0 nor -1")
        total = sum(x for k, x in t.items() if k != "comment" and x > 0)
        if abs(e["time"] - total) > 0.01:
            out.append(f"{at}.time is {e['time']}, the timings add up to {total}")
        if e["time"] < 0:
            out.append(f"{at}.time is below 0")
    return out


def check(har, what):
    found = problems(har)
    if found:
        print(f"FAIL {what}: not valid HAR 1.2:", *found[:20], sep="\n  ")
        return False
    print(f"ok   {what}: valid HAR 1.2, {len(har['log']['entries'])} entries")
    return True


# ---- the live run --------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream(BaseHTTPRequestHandler):
    """A stand-in for glance: JSON answers (one with a token in it), uploads read whole, a download,
    and a request held until `release` is set."""
    protocol_version = "HTTP/1.1"
    release = threading.Event()

    def log_message(self, *args):
        pass

    def answer(self, status, body, ctype="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-openstack-request-id", "req-glance-" + self.path.strip("/").replace("/", "-")[:20])
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client that gave up

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        got = 0
        while got < n:
            got += len(self.rfile.read(min(1 << 16, n - got)))
        return got

    def do_GET(self):
        if self.path.startswith("/hold"):
            Upstream.release.wait(30)
        if self.path.startswith("/download"):
            return self.answer(200, bytes(range(256)) * 4096, "application/octet-stream")
        if self.path.startswith("/missing"):
            return self.answer(404, b'{"message": "no such image"}')
        if self.path.startswith("/moved"):
            self.send_response(302)
            self.send_header("Location", "/v2/images")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self.answer(200, json.dumps({"images": [{"id": "abc", "name": "cirros"}],
                                            "token": "t0ken"}).encode())

    def do_PUT(self):
        n = self.read_body()
        self.send_response(204)
        self.send_header("x-openstack-request-id", f"req-glance-put-{n}")
        self.end_headers()

    def do_PATCH(self):
        self.read_body()
        self.answer(200, b'{"id": "abc", "name": "cirros", "k": "v"}')


def live(shim_bin):
    up = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=up.serve_forever, daemon=True).start()
    listen, inspect = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="glance-shim-har-")
    shim = subprocess.Popen(
        [shim_bin, "--listen", f"127.0.0.1:{listen}", "--upstream", f"127.0.0.1:{up.server_port}",
         "--inspect", f"127.0.0.1:{inspect}", "--log-file", os.path.join(tmp, "shim.log")])
    ok = True
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", inspect), 0.1).close()
                break
            except OSError:
                time.sleep(0.05)

        def call(method, path, body=None, headers=None):
            c = http.client.HTTPConnection("127.0.0.1", listen, timeout=30)
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            r.read()
            c.close()
            return r.status

        token = {"X-Auth-Token": "gAAAAAB-live-token"}
        assert call("GET", "/v2/images?limit=2&sort_key=name", headers=token) == 200
        patch = json.dumps([{"op": "add", "path": "/k", "value": "v"},
                            {"op": "add", "path": "/db_password", "value": "hunter2"}])
        assert call("PATCH", "/v2/images/abc", patch,
                    {**token, "Content-Type": "application/openstack-images-v2.1-json-patch"}) == 200
        assert call("PUT", "/v2/images/abc/file", os.urandom(3 << 20),
                    {**token, "Content-Type": "application/octet-stream"}) == 204
        assert call("GET", "/download") == 200
        assert call("GET", "/missing") == 404
        assert call("GET", "/moved") == 302
        # A client that gives up on a held request: it never gets a response.
        s = socket.create_connection(("127.0.0.1", listen))
        s.sendall(b"GET /hold/gone HTTP/1.1\r\nHost: controller\r\n\r\n")
        time.sleep(0.3)
        s.close()
        # And one still held when the archive is made.
        held = socket.create_connection(("127.0.0.1", listen))
        held.sendall(b"GET /hold/still HTTP/1.1\r\nHost: controller\r\n\r\n")
        time.sleep(0.3)

        raw = urllib.request.urlopen(f"http://127.0.0.1:{inspect}/api/har", timeout=30).read()
        har = json.loads(raw)
        ok &= check(har, "/api/har, every kind of request")
        text = raw.decode()
        for secret in ("gAAAAAB-live-token", "hunter2", "t0ken"):
            if secret in text:
                print(f"FAIL the archive holds the secret {secret!r}")
                ok = False
        outcomes = sorted({str(e["_outcome"]) for e in har["log"]["entries"]})
        statuses = sorted({e["response"]["status"] for e in har["log"]["entries"]})
        print(f"     outcomes {outcomes}, statuses {statuses}")
        if statuses != [0, 200, 204, 302, 404]:
            print("FAIL expected statuses 0, 200, 204, 302 and 404")
            ok = False
        # The checks can fail: the same archive, broken three ways, is refused.
        broken = json.loads(raw)
        e0 = broken["log"]["entries"][0]
        del e0["timings"]["wait"]
        e0["request"]["foo"] = 1
        e0["response"]["status"] = "200"
        found = problems(broken)
        if len(found) < 2:
            print("FAIL a broken archive passed:", found)
            ok = False
        broken = json.loads(raw)
        broken["log"]["entries"][0]["time"] += 5
        broken["log"]["entries"][0]["request"]["foo"] = 1
        if len(problems(broken)) != 2:
            print("FAIL a wrong time or an unprefixed field passed")
            ok = False
        Upstream.release.set()
        held.close()
        filtered = json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{inspect}/api/har?filter=method:patch", timeout=30).read())
        ok &= check(filtered, "/api/har?filter=method:patch")
        if len(filtered["log"]["entries"]) != 1:
            print("FAIL the filter kept", len(filtered["log"]["entries"]), "entries, not 1")
            ok = False
    finally:
        shim.terminate()
        shim.wait(10)
        up.shutdown()
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*")
    ap.add_argument("--live", action="store_true")
    ap.add_argument("--shim", default="target/release/glance-shim")
    args = ap.parse_args()
    ok = True
    for f in args.files:
        ok &= check(json.loads(pathlib.Path(f).read_text()), f)
    if args.live:
        ok &= live(args.shim)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
