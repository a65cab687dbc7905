#!/usr/bin/env python3
"""bench/fronts.py [--rounds N] [--seconds S] - the latency the uwsgi front adds at one connection, beside
the HTTP front's, as the server in front sees it.

nginx (1 worker) plays Apache: one server forwards to the upstream directly (the baseline), one to
glance-shim's HTTP front (proxy_pass, keep-alive, as Apache's mod_proxy_http), one to glance-shim's
uwsgi front on a unix socket (uwsgi_pass, a connection per request, as mod_proxy_uwsgi), and one to
the HTTP front with a connection per request too, which tells the protocol's cost from the front's. Both shims
run with their defaults (log to a file, inspector on) in front of the same upstream (bench/upstream.rs).
`wrk -t1 -c1` drives each in turn, interleaved over the rounds; the figure is the median p50 over the
rounds, minus the baseline's. Needs nginx and wrk (.ci/run does not run it: it is a benchmark).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from run import free_port, wait_port, wrk  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=8)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "glance-shim", "--example",
                    "bench-upstream"], cwd=ROOT, check=True)
    shim = os.path.join(ROOT, "target", "release", "glance-shim")
    work = tempfile.mkdtemp(prefix="glance-shim-fronts-")
    os.chmod(work, 0o755)  # nginx's worker (nobody) reaches the socket through it
    procs = []
    try:
        up = free_port()
        procs.append(subprocess.Popen([os.path.join(ROOT, "target", "release", "examples", "bench-upstream"),
                                       str(up)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(up, procs[-1])
        http_port, sock = free_port(), os.path.join(work, "shim.socket")
        common = ["--upstream", str(up), "--inspect", "127.0.0.1:0", "--stall-after", "5s"]
        procs.append(subprocess.Popen([shim, "--listen", str(http_port), "--log-file", os.path.join(work, "http.log"),
                                       *common], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(http_port, procs[-1])
        procs.append(subprocess.Popen([shim, "--listen", sock, "--uwsgi", "--log-file",
                                       os.path.join(work, "uwsgi.log"), *common],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(200):
            if os.path.exists(sock):
                break
            subprocess.run(["sleep", "0.05"])
        ports = {"direct": free_port(), "HTTP front": free_port(), "HTTP front, a connection per request": free_port(),
                 "uwsgi front": free_port()}
        d = os.path.join(work, "nginx")
        os.makedirs(d)
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    uwsgi_temp_path {d}/uwsgi;
    upstream direct {{ server 127.0.0.1:{up}; keepalive 16; }}
    upstream shim {{ server 127.0.0.1:{http_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{ports["direct"]};
        location / {{ proxy_pass http://direct; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
    server {{
        listen 127.0.0.1:{ports["HTTP front"]};
        location / {{ proxy_pass http://shim; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
    server {{
        listen 127.0.0.1:{ports["HTTP front, a connection per request"]};
        location / {{ proxy_pass http://127.0.0.1:{http_port}; }}
    }}
    server {{
        listen 127.0.0.1:{ports["uwsgi front"]};
        location / {{ include /etc/nginx/uwsgi_params; uwsgi_pass unix:{sock}; }}
    }}
}}
""")
        procs.append(subprocess.Popen(["nginx", "-p", d, "-c", conf], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        for port in ports.values():
            wait_port(port, procs[-1])
        for name, port in ports.items():
            code = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                   f"http://127.0.0.1:{port}/small"], capture_output=True, text=True).stdout
            if code != "200":
                sys.exit(f"{name}: GET /small answered {code}; logs in {work}")
        for port in ports.values():  # warm up
            wrk(port, 1, 2, threads=1)
        results = {name: [] for name in ports}
        for r in range(args.rounds):
            for name, port in ports.items():
                results[name].append(wrk(port, 1, args.seconds, threads=1))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        base = statistics.median(x["p50_ms"] for x in results["direct"])
        print(f"\nnginx -> upstream directly: p50 {base:.3f} ms (the baseline)\n")
        print("| nginx -> glance-shim -> upstream | p50 | p99 | added to p50 | req/s |")
        print("|---|---|---|---|---|")
        for name in list(ports)[1:]:
            p50 = statistics.median(x["p50_ms"] for x in results[name])
            p99 = statistics.median(x["p99_ms"] for x in results[name])
            rps = statistics.median(x["rps"] for x in results[name])
            print(f"| {name} | {p50:.3f} ms | {p99:.3f} ms | +{p50 - base:.3f} ms | {rps:,.0f} |")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if sys.exc_info()[0] is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
