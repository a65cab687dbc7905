"""A WSGI app that answers with what its server gave it, for comparing uWSGI (behind Apache's
mod_proxy_uwsgi) with gunicorn behind glance-shim's uwsgi front, request for request.

  GET|POST|PUT ANY/environ...  -> 200 JSON: the WSGI variables an app reads, the request body's length
                                  and sha256; a Location built from SCRIPT_NAME, as placement builds it
  GET ANY/download?bytes=N     -> N bytes streamed with no Content-Length
"""

import hashlib
import json
from urllib.parse import parse_qs

# What the shim adds on its way; compared apart.
ADDED = {"HTTP_VIA", "HTTP_X_FORWARDED_FOR", "HTTP_X_FORWARDED_PROTO", "HTTP_X_FORWARDED_HOST",
         "HTTP_X_OPENSTACK_REQUEST_ID"}


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.endswith("/download"):
        n = int(parse_qs(environ.get("QUERY_STRING", ""))["bytes"][0])
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        return stream(n)
    digest, length = hashlib.sha256(), 0
    wsgi_input = environ["wsgi.input"]
    remaining = int(environ.get("CONTENT_LENGTH") or 0)
    while remaining > 0:
        block = wsgi_input.read(min(remaining, 1 << 20))
        if not block:
            break
        digest.update(block)
        length += len(block)
        remaining -= len(block)
    seen = {k: v for k, v in environ.items()
            if k in ("SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "REQUEST_METHOD", "CONTENT_TYPE",
                     "CONTENT_LENGTH", "SERVER_PROTOCOL", "wsgi.url_scheme")
            or (k.startswith("HTTP_") and k not in ADDED)}
    added = {k: v for k, v in environ.items() if k in ADDED}
    body = json.dumps({"environ": seen, "added": added, "body_len": length,
                       "body_sha256": digest.hexdigest()}, sort_keys=True).encode()
    status = "201 Created" if environ["REQUEST_METHOD"] == "POST" else "200 OK"
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Location", environ.get("SCRIPT_NAME", "") + "/created")])
    return [body]


def stream(n):
    block = bytes(range(256)) * 256  # 64 KiB
    while n > 0:
        part = block[:min(n, len(block))]
        n -= len(part)
        yield part
