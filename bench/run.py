#!/usr/bin/env python3
"""Side-by-side benchmark: the same load straight to the upstream and through each proxy, interleaved in
one run, repeated, combined by median, printed as ratios to "no proxy".

Run it through bench/run.sh, which builds and installs what it needs. Figures per peer:
  small GET req/s and p50/p99 latency (wrk, 1, 16 and 64 connections); at one connection, the latency
  each proxy adds to no proxy's, which is what a developer sending one request at a time feels,
  MB/s for a large download of a file the upstream reads as glance's file store does, an upload with
  Content-Length and a chunked upload (curl), each checked for its byte count so a proxy that drops
  data cannot look fast; and a download from a synthetic upstream that costs nothing per byte,
  the proxy's CPU per small request (its whole process tree, from /proc), and its peak RSS.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.01)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def status_mib(pid, field):
    """A memory figure of /proc/PID/status (`VmHWM`, `VmRSS`), in MiB; None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler:
    """The largest VmRSS of `pid` seen every 10 ms while the block runs: the proxy's memory during a
    transfer, which its VmHWM (the peak of the whole run, small-request load included) bounds from
    above."""

    def __init__(self, pid):
        self.pid, self.peak, self.done = pid, None, threading.Event()

    def __enter__(self):
        def sample():
            while not self.done.is_set():
                rss = status_mib(self.pid, "VmRSS")
                if rss is not None:
                    self.peak = max(self.peak or 0, rss)
                self.done.wait(0.01)
        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


class Peer:
    """A proxy under test: start() returns the port clients should use; stop() ends it."""

    name = "?"

    def __init__(self, upstream_port, workdir):
        self.upstream_port = upstream_port
        self.workdir = workdir
        self.proc = None

    def start(self):
        raise NotImplementedError

    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        """Kills the peer and every process it started (nginx's worker, socat's children)."""
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None


class Direct(Peer):
    name = "no proxy"

    def start(self):
        return self.upstream_port


class GlanceShim(Peer):
    name = "glance-shim"

    def __init__(self, upstream_port, workdir, binary, log=True, name=None, inspect=True, capture=False):
        super().__init__(upstream_port, workdir)
        self.binary = binary
        self.log = log
        self.inspect = inspect
        self.capture = capture
        if capture:
            self.name = "glance-shim, capture on"
        if not log:
            self.name = "glance-shim, log off"
        if not inspect:
            self.name = "glance-shim, inspect off"
        if name:
            self.name = name

    def start(self):
        port = free_port()
        log = os.path.join(self.workdir, "glance-shim.log")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        if not self.log:
            env["RUST_LOG"] = "off"
        # The inspector on a port of its own: the default one may be taken, which would quietly
        # measure a shim without it.
        inspect = f"127.0.0.1:{free_port()}" if self.inspect else "off"
        self.capture_dir = tempfile.mkdtemp(prefix="capture-", dir=self.workdir) if self.capture else None
        self.proc = subprocess.Popen(
            [self.binary, "--listen", str(port), "--upstream", str(self.upstream_port), "--log-file", log,
             "--inspect", inspect]
            + (["--capture", self.capture_dir] if self.capture else []),
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_port(port, self.proc)
        return port

    def stop(self):
        """Also removes the run's capture: left behind, up to --capture-max of it per run piles up."""
        super().stop()
        if getattr(self, "capture_dir", None):
            shutil.rmtree(self.capture_dir, ignore_errors=True)


TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_split(root):
    """CPU time of `root` and every process under it, the children it already reaped included
    (socat's per-connection processes), as (user, system) seconds: what the proxy costs, whatever its
    shape. The system part is what its syscalls and wake-ups cost in the kernel."""
    user = system = 0
    seen, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime: fields 14-17 of proc(5), 11-14 after the command.
        user += int(fields[11]) + int(fields[13])
        system += int(fields[12]) + int(fields[14])
        todo.extend(children(pid))
    return user / TICK, system / TICK


def children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                pass
    return out


class Nginx(Peer):
    """nginx as a streaming reverse proxy: 1 worker, no buffering either way, upstream keep-alive."""
    name = "nginx"

    def start(self):
        port = free_port()
        d = os.path.join(self.workdir, "nginx")
        os.makedirs(d, exist_ok=True)
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    upstream glance {{ server 127.0.0.1:{self.upstream_port}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        client_max_body_size 0;
        location / {{
            proxy_pass http://glance;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
""")
        self.proc = subprocess.Popen(["nginx", "-p", d, "-c", conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(port, self.proc)
        return port

    def pid(self):
        kids = children(self.proc.pid) if self.proc else []
        return kids[0] if kids else None  # the one worker does the proxying


class HAProxy(Peer):
    """HAProxy in mode http, keep-alive and connection reuse to the upstream, logging to a file."""
    name = "HAProxy"

    def start(self):
        port = free_port()
        d = os.path.join(self.workdir, "haproxy")
        os.makedirs(d, exist_ok=True)
        conf = os.path.join(d, "haproxy.cfg")
        with open(conf, "w") as f:
            f.write(f"""global
    maxconn 4096
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    option http-keep-alive
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend bench
    bind 127.0.0.1:{port}
    default_backend glance
backend glance
    http-reuse always
    server up 127.0.0.1:{self.upstream_port}
""")
        log = open(os.path.join(d, "access.log"), "ab")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", conf], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_port(port, self.proc)
        return port


class Socat(Peer):
    """socat forwarding bytes, a process per connection; its log has a line per connection (it knows
    nothing of requests)."""
    name = "socat"

    def start(self):
        port = free_port()
        log = os.path.join(self.workdir, "socat.log")
        self.proc = subprocess.Popen(
            ["socat", "-d", "-d", "-lf", log, f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=1024",
             f"TCP:127.0.0.1:{self.upstream_port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(port, self.proc)
        return port


class HyperAlone(Peer):
    """bench/hyper_alone.rs: hyper's server and hyper-util's pooled client on one tokio thread,
    forwarding each request as it came and doing nothing else: what the shim's libraries add by
    themselves."""
    name = "hyper alone"

    def __init__(self, upstream_port, workdir, binary):
        super().__init__(upstream_port, workdir)
        self.binary = binary

    def start(self):
        port = free_port()
        self.proc = subprocess.Popen([self.binary, str(port), str(self.upstream_port)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(port, self.proc)
        return port


class Mitmdump(Peer):
    """mitmproxy's mitmdump in reverse mode, streaming bodies (stream_large_bodies=1, without which it
    holds every body in memory), the flow lines it prints going to a file."""
    name = "mitmdump"

    def __init__(self, upstream_port, workdir, binary):
        super().__init__(upstream_port, workdir)
        self.binary = binary

    def start(self):
        port = free_port()
        log = open(os.path.join(self.workdir, "mitmdump.log"), "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--mode", f"reverse:http://127.0.0.1:{self.upstream_port}", "--listen-host",
             "127.0.0.1", "--listen-port", str(port), "--set", "stream_large_bodies=1", "--set",
             "keep_host_header=true", "--set", "connection_strategy=lazy"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_port(port, self.proc, timeout=30)
        return port


def nginx_upstream(workdir, upload_file):
    """The upstream as nginx with 1 worker, the second harness: the same small JSON answer (taken from
    bench/upstream.rs) with `return 200`, the large file with sendfile, and an upload location that
    reads the whole body through a Lua body reader (libnginx-mod-http-lua; a chunked body is read into
    nginx's temporary file first, as the module cannot stream it) and answers {"bytes": N}.
    It has no synthetic download. Returns (process, port)."""
    with open(os.path.join(HERE, "upstream.rs")) as f:
        small = re.search(r'const SMALL: &\[u8\] = br#"(.*)"#;', f.read()).group(1)
    port = free_port()
    d = os.path.join(workdir, "nginx-upstream")
    os.makedirs(d, exist_ok=True)
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""load_module /usr/lib/nginx/modules/ndk_http_module.so;
load_module /usr/lib/nginx/modules/ngx_http_lua_module.so;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    sendfile on;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        client_max_body_size 0;
        location = /small {{ default_type application/json; return 200 '{small}'; }}
        location = /file {{ default_type application/octet-stream; alias {upload_file}; }}
        location = /upload {{
            content_by_lua_block {{
                local n = 0
                local sock = ngx.req.socket()
                if sock then
                    while true do
                        local data, err, partial = sock:receive(65536)
                        if data then n = n + #data elseif partial then n = n + #partial end
                        if not data then break end
                    end
                else
                    -- A chunked body, which this Lua module cannot stream: read whole, then counted.
                    ngx.req.read_body()
                    local data = ngx.req.get_body_data()
                    if data then
                        n = #data
                    else
                        local f = io.open(ngx.req.get_body_file() or "", "rb")
                        if f then n = f:seek("end"); f:close() end
                    end
                end
                ngx.header["Content-Type"] = "application/json"
                ngx.print('{{"bytes": ' .. n .. '}}')
            }}
        }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-p", d, "-c", conf], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, port


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port, conns, seconds, threads=2):
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency",
         f"http://127.0.0.1:{port}/small"],
        capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        lat[pct] = float(m.group(1)) * UNITS[m.group(2)]
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if errors or socket_errors:
        raise RuntimeError(f"wrk saw errors: {out}")
    return {"rps": rps, "p50_ms": lat["50"], "p99_ms": lat["99"], "requests": requests}


def curl_download(port, path, nbytes):
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download}",
         f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True).stdout.split()
    code, size, speed = out[0], int(out[1]), float(out[2])
    if code != "200" or size != nbytes:
        raise RuntimeError(f"download: HTTP {code}, {size} of {nbytes} bytes")
    return speed / 1e6


def curl_upload(port, path, nbytes, chunked):
    args = ["curl", "-sS", "-H", "Expect:", "-w", "\n%{http_code} %{size_upload} %{speed_upload}"]
    if chunked:
        # From stdin, curl cannot know the size: Transfer-Encoding: chunked, like glanceclient.
        args += ["-T", "-", f"http://127.0.0.1:{port}/upload"]
        with open(path, "rb") as f:
            out = subprocess.run(args, stdin=f, capture_output=True, text=True, check=True).stdout
    else:
        args += ["-T", path, f"http://127.0.0.1:{port}/upload"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    body, stats = out.rsplit("\n", 1)
    code, _, speed = stats.split()
    received = json.loads(body).get("bytes")
    if code != "200" or received != nbytes:
        raise RuntimeError(f"upload ({'chunked' if chunked else 'length'}): HTTP {code}, upstream read "
                           f"{received} of {nbytes} bytes")
    return float(speed) / 1e6


def metrics(args, upload_file):
    """Every figure, as (key, function of port) pairs, in the order they are taken."""
    out = []
    for c in args.connections:
        # wrk needs a connection per thread: one connection is wrk -t1 -c1.
        threads = min(args.wrk_threads, c)
        out.append((f"small_c{c}", lambda port, c=c, t=threads: wrk(port, c, args.seconds, t)))
    out.append(("down_MBps", lambda port: curl_download(port, "/file", args.bytes)))
    out.append(("up_MBps", lambda port: curl_upload(port, upload_file, args.bytes, chunked=False)))
    out.append(("chunked_up_MBps", lambda port: curl_upload(port, upload_file, args.bytes, chunked=True)))
    if args.upstream_kind == "rust":
        out.append(("synthetic_down_MBps",
                    lambda port: curl_download(port, f"/synthetic?bytes={args.bytes}", args.bytes)))
    return out


def one_run(peers, args, upload_file, rotate):
    """Starts every peer, then takes each figure for every peer back to back (so a change in the
    machine's load affects both sides of a ratio alike), then records peak RSS and stops them."""
    ports = {p.name: p.start() for p in peers}
    try:
        for p in peers:
            wrk(ports[p.name], 16, 1)  # warm up connections and caches
        order = peers[rotate % len(peers):] + peers[: rotate % len(peers)]
        result = {p.name: {} for p in peers}
        for key, take in metrics(args, upload_file):
            for p in order:
                root = p.proc.pid if p.proc else None
                cpu0 = tree_cpu_split(root) if root else None
                pid = p.pid()
                if key.endswith("MBps") and pid:
                    with RssSampler(pid) as rss:
                        value = take(ports[p.name])
                    if rss.peak is not None:
                        seen = result[p.name].get("transfer_rss_MiB") or 0
                        result[p.name]["transfer_rss_MiB"] = max(seen, rss.peak)
                else:
                    value = take(ports[p.name])
                if isinstance(value, dict):
                    c = key.split("_c")[1]
                    result[p.name][f"rps_c{c}"] = value["rps"]
                    result[p.name][f"p50_ms_c{c}"] = value["p50_ms"]
                    result[p.name][f"p99_ms_c{c}"] = value["p99_ms"]
                    # The proxy's CPU per request served (wrk's count), in microseconds.
                    cpu = [b - a for a, b in zip(cpu0, tree_cpu_split(root))] if root else None
                    per_request = (lambda t: t / value["requests"] * 1e6) if root else (lambda t: None)
                    result[p.name][f"cpu_us_c{c}"] = per_request(sum(cpu)) if root else None
                    result[p.name][f"cpu_sys_us_c{c}"] = per_request(cpu[1]) if root else None
                else:
                    result[p.name][key] = value
        for p in peers:
            pid = p.pid()
            result[p.name]["peak_rss_MiB"] = status_mib(pid, "VmHWM") if pid else None
        return result
    finally:
        for p in peers:
            p.stop()


def startup_ms(binary, trials=20):
    """Median time from spawning glance-shim to its port accepting connections."""
    times = []
    for _ in range(trials):
        port = free_port()
        start = time.perf_counter()
        proc = subprocess.Popen([binary, "--listen", str(port), "--upstream", "1"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.05):
                    break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - start > 5:
                    raise RuntimeError("glance-shim did not start")
                time.sleep(0.0005)
        times.append((time.perf_counter() - start) * 1000)
        proc.kill()
        proc.wait()
    return statistics.median(times)


# "glance-shim, bare" (no log, no inspector: the header rules, the id and the record alone) is not in the
# default set (`--peers` adds it). "hyper alone" is: what the libraries cost with nothing of the shim's.
PEERS = ["glance-shim", "glance-shim, log off", "glance-shim, inspect off", "glance-shim, capture on", "hyper alone",
         "nginx", "HAProxy", "socat", "mitmdump"]
ALL_PEERS = PEERS + ["glance-shim, bare"]

# --guards BEFORE: the shim against the build before a change, as the default and with --capture, in the
# same run. req/s and MB/s are the median of the ratios new / before within each run; a ratio of
# small-request req/s swings by up to 30% from run to run on a shared 2-core machine, hence 0.8, which
# catches only a gross regression (bench/cost.sh pairs answer finer questions). The RSS limit is absolute:
# README promises 12 MiB during a large transfer.
GUARD_RPS = [("rps_c16", 0.8), ("rps_c64", 0.8)]
GUARD_TRANSFER = 0.95
GUARD_TRANSFER_RSS_MIB = 12


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per figure")
    ap.add_argument("--bytes", type=int, default=1 << 30, help="size of each large transfer")
    ap.add_argument("--connections", type=int, nargs="+", default=[1, 16, 64],
                    help="wrk -c for the small GETs; at 1, the latency each proxy adds is printed too")
    ap.add_argument("--wrk-threads", type=int, default=2, help="wrk -t for the small GETs")
    ap.add_argument("--peers", nargs="+", default=PEERS, choices=ALL_PEERS, help="proxies to compare")
    ap.add_argument("--shim", default=os.path.join(ROOT, "target/release/glance-shim"))
    ap.add_argument("--build", action="append", default=[], metavar="NAME=PATH",
                    help="another glance-shim binary to measure beside the others, e.g. the build "
                         "before a change (repeatable)")
    ap.add_argument("--build-capture", action="store_true",
                    help="with each --build NAME, also measure it with --capture DIR as the peer "
                         "'glance-shim NAME, capture on'")
    ap.add_argument("--guards", metavar="NAME",
                    help="compare the shim, and the shim with --capture, against --build NAME (and its "
                         "capture peer): req/s at c16 and c64 >= 0.8x, transfers >= 0.95x, RSS in "
                         "transfers <= 12 MiB; print each with PASS or FAIL and exit 1 on a FAIL")
    ap.add_argument("--hyper-alone-bin", default=os.path.join(ROOT, "target/release/examples/bench-hyper-alone"),
                    help="the peer 'hyper alone' (bench/hyper_alone.rs)")
    ap.add_argument("--upstream", default=os.path.join(ROOT, "target/release/examples/bench-upstream"))
    ap.add_argument("--upstream-kind", choices=["rust", "nginx"], default="rust",
                    help="the upstream: bench/upstream.rs, or nginx with 1 worker and a Lua upload reader "
                         "(the second harness; no synthetic download)")
    ap.add_argument("--mitmdump", default=os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "glance-shim-bench",
        "venv-mitmproxy", "bin", "mitmdump"))
    ap.add_argument("--json", default=os.path.join(HERE, "results/latest.json"))
    ap.add_argument("--floor", action="store_true",
                    help="exit 1 unless glance-shim reaches the floor: transfers >= 0.7x and small "
                         "GETs >= 0.35x no proxy")
    args = ap.parse_args()
    if args.guards:
        # Checked before the run rather than after it: a guard that was not measured must not pass.
        needs = [(args.guards in [b.split("=", 1)[0] for b in args.build], f"--build {args.guards}=PATH"),
                 (args.build_capture, "--build-capture"),
                 ({"glance-shim", "glance-shim, capture on"} <= set(args.peers),
                  "the peers 'glance-shim' and 'glance-shim, capture on'"),
                 ({16, 64} <= set(args.connections), "--connections with 16 and 64")]
        missing = [what for ok, what in needs if not ok]
        if missing:
            ap.error(f"--guards {args.guards} needs " + ", ".join(missing))

    for tool in ("wrk", "curl"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is needed (bench/run.sh installs it)")
    workdir = tempfile.mkdtemp(prefix="glance-shim-bench-")
    os.chmod(workdir, 0o755)
    upstream_port = free_port()
    upload_file = os.path.join(workdir, "image.bin")
    with open(upload_file, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(args.bytes >> 20):
            f.write(block)
        f.write(block[: args.bytes % (1 << 20)])
    if args.upstream_kind == "nginx":
        upstream, upstream_port = nginx_upstream(workdir, upload_file)
    else:
        upstream = subprocess.Popen([args.upstream, str(upstream_port)], stdout=subprocess.DEVNULL,
                                    env={**os.environ, "BENCH_FILE": upload_file})
    make = {
        "glance-shim": lambda: GlanceShim(upstream_port, workdir, args.shim),
        "glance-shim, log off": lambda: GlanceShim(upstream_port, workdir, args.shim, log=False),
        "glance-shim, inspect off": lambda: GlanceShim(upstream_port, workdir, args.shim, inspect=False),
        "glance-shim, capture on": lambda: GlanceShim(upstream_port, workdir, args.shim, capture=True),
        "glance-shim, bare": lambda: GlanceShim(upstream_port, workdir, args.shim, log=False, inspect=False,
                                                name="glance-shim, bare"),
        "nginx": lambda: Nginx(upstream_port, workdir),
        "HAProxy": lambda: HAProxy(upstream_port, workdir),
        "socat": lambda: Socat(upstream_port, workdir),
        "mitmdump": lambda: Mitmdump(upstream_port, workdir, args.mitmdump),
        "hyper alone": lambda: HyperAlone(upstream_port, workdir, args.hyper_alone_bin),
    }
    try:
        wait_port(upstream_port, upstream)
        peers = [Direct(upstream_port, workdir)] + [make[name]() for name in args.peers]
        for build in args.build:
            name, path = build.split("=", 1)
            peers.append(GlanceShim(upstream_port, workdir, os.path.abspath(path), name=f"glance-shim {name}"))
            if args.build_capture:
                peers.append(GlanceShim(upstream_port, workdir, os.path.abspath(path), capture=True,
                                        name=f"glance-shim {name}, capture on"))
        runs = {p.name: [] for p in peers}
        for i in range(args.runs):
            print(f"run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            for name, r in one_run(peers, args, upload_file, i).items():
                runs[name].append(r)
        start_ms = startup_ms(args.shim)
    finally:
        if args.upstream_kind == "nginx":
            os.killpg(upstream.pid, signal.SIGKILL)
        else:
            upstream.kill()
        upstream.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    keys = list(runs["no proxy"][0].keys())
    def median(rs, k):
        values = [r.get(k) for r in rs]
        return statistics.median(values) if None not in values else None

    med = {name: {k: median(rs, k) for k in keys + ["transfer_rss_MiB"]} for name, rs in runs.items()}

    def ratio(name, k, base="no proxy"):
        """Median over runs of the ratio taken within each run."""
        if base not in runs:
            return None
        pairs = [(r[k], d[k]) for r, d in zip(runs[name], runs[base])]
        if any(a is None or not b for a, b in pairs):
            return None
        return statistics.median(a / b for a, b in pairs)

    def added(name, k, base="no proxy"):
        """Median over runs of the difference taken within each run: the latency a proxy adds."""
        pairs = [(r[k], d[k]) for r, d in zip(runs[name], runs[base])]
        if any(a is None or b is None for a, b in pairs):
            return None
        return statistics.median(a - b for a, b in pairs)

    # The first figure under load (c16 by default) is the one the p99 column and the floor are about.
    loaded = next((c for c in args.connections if c > 1), args.connections[0])
    cols = [(f"rps_c{c}", f"GET c{c}") for c in args.connections] + \
           [(f"p99_ms_c{loaded}", f"p99 c{loaded}"),
            ("down_MBps", "1 GiB down"), ("up_MBps", "1 GiB up"), ("chunked_up_MBps", "chunked up")] + \
           ([("synthetic_down_MBps", "synthetic down")] if args.upstream_kind == "rust" else [])

    def table(base):
        lines = ["| peer | " + " | ".join(c[1] for c in cols) + " | peak RSS | RSS in transfers |",
                 "|" + "---|" * (len(cols) + 3)]
        for name in med:
            if name == base and base != "no proxy":
                continue
            cells = []
            for k, _ in cols:
                if name == "no proxy" and base == "no proxy":
                    unit = " ms" if "p99" in k else (" req/s" if "rps" in k else " MB/s")
                    cells.append(f"{med[name][k]:.0f}{unit}")
                else:
                    r = ratio(name, k, base)
                    cells.append("-" if r is None else f"{r:.2f}" + ("x" if "p99" in k else ""))
            for k in ("peak_rss_MiB", "transfer_rss_MiB"):
                rss = med[name].get(k)
                cells.append(f"{rss:.1f} MiB" if rss else "-")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def added_table():
        lines = ["| peer | added p50 c1 | added p99 c1 | req/s c1 vs nginx |", "|---|---|---|---|"]
        for name in med:
            if name == "no proxy":
                cells = [f"{med[name][k]:.3f} ms" for k in ("p50_ms_c1", "p99_ms_c1")]
            else:
                cells = ["-" if d is None else f"{d:+.3f} ms"
                         for d in (added(name, "p50_ms_c1"), added(name, "p99_ms_c1"))]
            r = ratio(name, "rps_c1", "nginx")
            cells.append("-" if r is None else f"{r:.2f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    print(f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {args.upstream_kind} upstream, median of "
          f"{args.runs} runs. Each figure "
          f"is a ratio to no proxy in the same run (p99: multiple of no proxy's latency):\n")
    print(table("no proxy"))
    if "nginx" in med:
        print("\nThe same as ratios to nginx:\n")
        print(table("nginx"))
    if 1 in args.connections:
        print(f"\nAt one connection (wrk -t1 -c1), the latency each proxy adds to no proxy's, median of {args.runs} "
              "runs of the difference within a run (no proxy's row: its own latency), and req/s as a ratio to nginx's:\n")
        print(added_table())
    print(f"\nCPU per small request, the proxy's whole process tree (/proc/PID/stat), median of {args.runs} runs "
          "(in brackets, the part of it in the kernel):\n")
    cpu_keys = [f"cpu_us_c{c}" for c in args.connections]
    head = " | ".join(f"c{c}" for c in args.connections)
    lines = [f"| peer | {head} |" + (" ratio to nginx |" if "nginx" in med else ""),
             "|" + "---|" * (len(cpu_keys) + 1 + ("nginx" in med))]
    for name in med:
        if name == "no proxy":
            continue
        cells = [f"{med[name][k]:.1f} us ({med[name][k.replace('cpu_', 'cpu_sys_')]:.1f})"
                 if med[name].get(k) is not None else "-" for k in cpu_keys]
        if "nginx" in med:
            rs = [ratio(name, k, "nginx") for k in cpu_keys]
            cells.append(" / ".join("-" if r is None else f"{r:.2f}" for r in rs))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"\nglance-shim start-up to listening: {start_ms:.1f} ms (median of 20)")
    if "glance-shim, log off" in med:
        costs = ", ".join(f"{(1 - ratio('glance-shim', f'rps_c{c}', 'glance-shim, log off')) * 100:.1f}% at c{c}"
                          for c in args.connections)
        print(f"logging cost (two lines per request to a file, against RUST_LOG=off), in req/s: {costs}")
    if "glance-shim, inspect off" in med:
        costs = ", ".join(f"{(1 - ratio('glance-shim', k, 'glance-shim, inspect off')) * 100:.1f}% in {k}"
                          for k in keys if k.startswith("rps_") or k.endswith("MBps"))
        print(f"inspector cost (on, the default, against --inspect off): {costs}")
    if "glance-shim, capture on" in med:
        costs = ", ".join(f"{(1 - ratio('glance-shim, capture on', k, 'glance-shim')) * 100:.1f}% in {k}"
                          for k in keys if k.startswith("rps_") or k.endswith("MBps"))
        print(f"capture cost (--capture DIR, against the default): {costs}")

    guard_failures = []
    if args.guards:
        print(f"\nGuards against glance-shim {args.guards}, median of {args.runs} runs (new / before: the median "
              "of the ratios within each run):\n")
        lines = ["| guard | new | before | new / before | limit | |", "|---|---|---|---|---|---|"]
        for new in ("glance-shim", "glance-shim, capture on"):
            old = new.replace("glance-shim", f"glance-shim {args.guards}", 1)
            limits = GUARD_RPS + [(k, GUARD_TRANSFER) for k in keys if k.endswith("_MBps")]
            for k, limit in limits:
                unit = "req/s" if k.startswith("rps_") else "MB/s"
                r = ratio(new, k, old)
                ok = r is not None and r >= limit
                lines.append(f"| {new}: {k} | {med[new][k]:.0f} {unit} | {med[old][k]:.0f} {unit} | "
                             f"{'-' if r is None else f'{r:.2f}'} | >= {limit} | {'PASS' if ok else 'FAIL'} |")
                if not ok:
                    guard_failures.append(f"{new}: {k}")
            rss, rss_before = med[new]["transfer_rss_MiB"], med[old]["transfer_rss_MiB"]
            ok = rss is not None and rss <= GUARD_TRANSFER_RSS_MIB
            lines.append(f"| {new}: transfer_rss_MiB | {'-' if rss is None else f'{rss:.1f} MiB'} | "
                         f"{'-' if rss_before is None else f'{rss_before:.1f} MiB'} | - | "
                         f"<= {GUARD_TRANSFER_RSS_MIB} MiB | {'PASS' if ok else 'FAIL'} |")
            if not ok:
                guard_failures.append(f"{new}: transfer_rss_MiB")
        print("\n".join(lines))

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cores": os.cpu_count(),
                   "startup_ms": start_ms, "runs": runs, "median": med,
                   "ratio_to_direct": {n: {k: ratio(n, k) for k in keys} for n in med},
                   "ratio_to_nginx": {n: {k: ratio(n, k, "nginx") for k in keys} for n in med},
                   "added_to_direct_ms": {n: {k: added(n, k) for k in keys if k.startswith(("p50_", "p99_"))}
                                          for n in med}}, f, indent=1)
    print(f"saved {args.json}", file=sys.stderr)

    if args.floor:
        shim = "glance-shim"
        failed = [f"{k} {ratio(shim, k):.2f} < {floor}" for k, floor in
                  [("down_MBps", 0.7), ("up_MBps", 0.7), ("chunked_up_MBps", 0.7),
                   (f"rps_c{loaded}", 0.35)] if ratio(shim, k) < floor]
        if failed:
            sys.exit("below the floor: " + "; ".join(failed))
        print("floor reached: transfers >= 0.7x, small GETs >= 0.35x no proxy")
    if guard_failures:
        sys.exit("guards failed: " + "; ".join(guard_failures))


if __name__ == "__main__":
    main()
