#!/usr/bin/env python3
"""Side-by-side benchmark: the same load straight to the upstream and through each proxy, interleaved in
one run, repeated, combined by median, printed as ratios to "no proxy".

Run it through bench/run.sh, which builds and installs what it needs. Figures per peer:
  small GET req/s and p50/p99 latency (wrk, 16 and 64 connections),
  MB/s for a large download of a file the upstream reads as glance's file store does, an upload with
  Content-Length and a chunked upload (curl), each checked for its byte count so a proxy that drops
  data cannot look fast; and a download from a synthetic upstream that costs nothing per byte,
  the proxy's peak RSS.
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


def peak_rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


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
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None


class Direct(Peer):
    name = "no proxy"

    def start(self):
        return self.upstream_port


class GlanceShim(Peer):
    name = "glance-shim"

    def __init__(self, upstream_port, workdir, binary, extra=()):
        super().__init__(upstream_port, workdir)
        self.binary = binary
        self.extra = list(extra)

    def start(self):
        port = free_port()
        log = os.path.join(self.workdir, "glance-shim.log")
        self.proc = subprocess.Popen(
            [self.binary, "--listen", str(port), "--upstream", str(self.upstream_port),
             "--log-file", log, *self.extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port, self.proc)
        return port


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
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    if errors or socket_errors:
        raise RuntimeError(f"wrk saw errors: {out}")
    return {"rps": rps, "p50_ms": lat["50"], "p99_ms": lat["99"]}


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
        out.append((f"small_c{c}", lambda port, c=c: wrk(port, c, args.seconds)))
    out.append(("down_MBps", lambda port: curl_download(port, "/file", args.bytes)))
    out.append(("up_MBps", lambda port: curl_upload(port, upload_file, args.bytes, chunked=False)))
    out.append(("chunked_up_MBps", lambda port: curl_upload(port, upload_file, args.bytes, chunked=True)))
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
                value = take(ports[p.name])
                if isinstance(value, dict):
                    c = key.split("_c")[1]
                    result[p.name][f"rps_c{c}"] = value["rps"]
                    result[p.name][f"p50_ms_c{c}"] = value["p50_ms"]
                    result[p.name][f"p99_ms_c{c}"] = value["p99_ms"]
                else:
                    result[p.name][key] = value
        for p in peers:
            pid = p.pid()
            result[p.name]["peak_rss_MiB"] = peak_rss_mib(pid) if pid else None
        return result
    finally:
        for p in peers:
            p.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per figure")
    ap.add_argument("--bytes", type=int, default=1 << 30, help="size of each large transfer")
    ap.add_argument("--connections", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--shim", default=os.path.join(ROOT, "target/release/glance-shim"))
    ap.add_argument("--upstream", default=os.path.join(ROOT, "target/release/examples/bench-upstream"))
    ap.add_argument("--json", default=os.path.join(HERE, "results/latest.json"))
    ap.add_argument("--floor", action="store_true",
                    help="exit 1 unless glance-shim reaches the floor: transfers >= 0.7x and small "
                         "GETs >= 0.35x no proxy")
    args = ap.parse_args()

    for tool in ("wrk", "curl"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is needed (bench/run.sh installs it)")
    workdir = tempfile.mkdtemp(prefix="glance-shim-bench-")
    upstream_port = free_port()
    upload_file = os.path.join(workdir, "image.bin")
    with open(upload_file, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(args.bytes >> 20):
            f.write(block)
        f.write(block[: args.bytes % (1 << 20)])
    upstream = subprocess.Popen([args.upstream, str(upstream_port)], stdout=subprocess.DEVNULL,
                                env={**os.environ, "BENCH_FILE": upload_file})
    try:
        wait_port(upstream_port, upstream)

        peers = [Direct(upstream_port, workdir), GlanceShim(upstream_port, workdir, args.shim)]
        runs = {p.name: [] for p in peers}
        for i in range(args.runs):
            print(f"run {i + 1}/{args.runs} ...", file=sys.stderr, flush=True)
            for name, r in one_run(peers, args, upload_file, i).items():
                runs[name].append(r)
    finally:
        upstream.kill()
        upstream.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    keys = list(runs["no proxy"][0].keys())
    med = {name: {k: (statistics.median([r[k] for r in rs]) if rs[0][k] is not None else None)
                  for k in keys} for name, rs in runs.items()}

    def ratio(name, k):
        """Median over runs of the ratio taken within each run."""
        pairs = [(r[k], d[k]) for r, d in zip(runs[name], runs["no proxy"])]
        if any(a is None or not b for a, b in pairs):
            return None
        return statistics.median(a / b for a, b in pairs)

    cols = [(f"rps_c{c}", f"GET c{c}") for c in args.connections] + \
           [(f"p99_ms_c{args.connections[0]}", f"p99 c{args.connections[0]}"),
            ("down_MBps", "down"), ("up_MBps", "up"), ("chunked_up_MBps", "chunked up"),
            ("synthetic_down_MBps", "synthetic down")]
    print(f"\nmedians of {args.runs} runs, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}; "
          f"ratios to no proxy in the same run (p99: x times no proxy's latency)\n")
    header = "| peer | " + " | ".join(c[1] for c in cols) + " | peak RSS |"
    print(header)
    print("|" + "---|" * (len(cols) + 2))
    for name in med:
        cells = []
        for k, _ in cols:
            r = ratio(name, k)
            cells.append(f"{med[name][k]:.0f}" if name == "no proxy" else (f"{r:.2f}" + ("x" if "p99" in k else "")))
        rss = med[name]["peak_rss_MiB"]
        cells.append(f"{rss:.1f} MiB" if rss else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n(no proxy row: absolute req/s, p99 ms and MB/s)")

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cores": os.cpu_count(),
                   "runs": runs, "median": med,
                   "ratio_to_direct": {n: {k: ratio(n, k) for k in keys} for n in med}}, f, indent=1)
    print(f"saved {args.json}", file=sys.stderr)

    if args.floor:
        shim = "glance-shim"
        failed = [f"{k} {ratio(shim, k):.2f} < {floor}" for k, floor in
                  [("down_MBps", 0.7), ("up_MBps", 0.7), ("chunked_up_MBps", 0.7),
                   (f"rps_c{args.connections[0]}", 0.35)] if ratio(shim, k) < floor]
        if failed:
            sys.exit("below the floor: " + "; ".join(failed))
        print("floor reached: transfers >= 0.7x, small GETs >= 0.35x no proxy")


if __name__ == "__main__":
    main()
