#!/usr/bin/env python3
"""Soak: mixed load through glance-shim for a while, with the upstream restarted on a schedule.

Load, all at once:
- small GETs from 8 keep-alive clients;
- a download and an upload of 64 MiB at a time, each checked for its byte count;
- clients that give up in the middle of a download or an upload;
- the upstream killed and started again every RESTART seconds (the shim runs with --wait-upstream, so
  requests sent while it is down are held, not failed).

Reports every error that is not expected (a transfer cut by an upstream restart is expected; so is a
client's own abort), and the shim's RSS and open descriptors over time. Exits 1 on any unexpected
error, or when RSS or descriptors grew over the run instead of staying flat.

Usage: soak.py [--seconds 600] [--restart 60]   (run through tests/soak/run, which builds what it needs)
"""

import argparse
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHIM = os.path.join(ROOT, "target", "release", "glance-shim")
UPSTREAM = os.path.join(ROOT, "target", "release", "examples", "bench-upstream")
MIB = 1 << 20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.unexpected = []
        self.restarts = []  # (start, end) of every upstream outage

    def add(self, what, n=1):
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def error(self, what):
        with self.lock:
            self.unexpected.append(f"{time.strftime('%H:%M:%S')} {what}")

    def overlaps_restart(self, start, end):
        """True when [start, end] overlaps an upstream outage (the kill itself counts as one)."""
        with self.lock:
            return any(s - 0.5 <= end and start <= (e or end) for s, e in self.restarts)


def small_requests(port, stats, stop):
    conn = None
    while not stop.is_set():
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("GET", "/small")
            res = conn.getresponse()
            res.read()
            if res.status == 200:
                stats.add("small ok")
            elif res.status == 502 and stats.overlaps_restart(start, time.monotonic()):
                # In flight when the upstream was killed: a request that may have reached it is
                # never retried, so the client hears that it closed the connection.
                stats.add("small GET in flight at an upstream kill: 502 (expected)")
            else:
                stats.error(f"small GET: status {res.status}")
        except (OSError, http.client.HTTPException) as e:
            stats.error(f"small GET: {e!r}")
            conn = None


def transfers(port, stats, stop, tmp):
    payload = os.path.join(tmp, "payload.bin")
    with open(payload, "wb") as f:
        f.write(os.urandom(MIB) * 64)
    while not stop.is_set():
        for kind in ("down", "up"):
            start = time.monotonic()
            if kind == "down":
                cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                       f"http://127.0.0.1:{port}/synthetic?bytes={64 * MIB}"]
            else:
                cmd = ["curl", "-sS", "-o", "-", "-w", " %{http_code}", "-H", "Expect:", "-T", payload,
                       f"http://127.0.0.1:{port}/upload"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            end = time.monotonic()
            out = p.stdout.split()
            ok = (kind == "down" and out[:2] == ["200", str(64 * MIB)]) or \
                 (kind == "up" and p.stdout.endswith(" 200") and f'"bytes": {64 * MIB}' in p.stdout)
            if ok:
                stats.add(f"transfer {kind} ok")
            elif stats.overlaps_restart(start, end):
                stats.add(f"transfer {kind} cut by an upstream restart (expected)")
            else:
                stats.error(f"transfer {kind}: curl exit {p.returncode}, {p.stdout[-80:]!r} {p.stderr[-200:]!r}")


def aborts(port, stats, stop):
    while not stop.is_set():
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            if stats.counts.get("abort", 0) % 2 == 0:
                s.sendall(f"GET /synthetic?bytes={256 * MIB} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
                s.recv(MIB)
            else:
                s.sendall(f"PUT /upload HTTP/1.1\r\nHost: soak\r\nContent-Length: {64 * MIB}\r\n\r\n".encode())
                s.sendall(b"x" * MIB)
            s.close()
            stats.add("abort")
        except OSError as e:
            stats.error(f"abort client: {e!r}")
        time.sleep(0.2)


def sample(pid):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
    return rss // 1024, len(os.listdir(f"/proc/{pid}/fd"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--restart", type=int, default=60, help="seconds between upstream restarts")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="glance-shim-soak-")
    up_port, shim_port = free_port(), free_port()
    procs = {}

    def start_upstream():
        procs["up"] = subprocess.Popen([UPSTREAM, str(up_port)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        wait_port(up_port)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stats = Stats()
    stop = threading.Event()
    try:
        start_upstream()
        shim = subprocess.Popen([SHIM, "--listen", str(shim_port), "--upstream", str(up_port), "--wait-upstream",
                                 "20s", "--log-file", os.path.join(tmp, "shim.log")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs["shim"] = shim
        wait_port(shim_port)
        workers = [threading.Thread(target=small_requests, args=(shim_port, stats, stop)) for _ in range(8)]
        workers += [threading.Thread(target=transfers, args=(shim_port, stats, stop, tmp)),
                    threading.Thread(target=aborts, args=(shim_port, stats, stop))]
        for w in workers:
            w.daemon = True
            w.start()
        started = time.monotonic()
        next_restart = started + args.restart
        timeline = []
        while time.monotonic() - started < args.seconds:
            time.sleep(2)
            if shim.poll() is not None:
                stats.error(f"glance-shim exited with {shim.returncode}")
                break
            rss, fds = sample(shim.pid)
            timeline.append((round(time.monotonic() - started), rss, fds))
            if time.monotonic() >= next_restart:
                with stats.lock:
                    stats.restarts.append((time.monotonic(), None))
                procs["up"].kill()
                procs["up"].wait()
                time.sleep(1)  # an upstream that is really gone for a moment
                start_upstream()
                with stats.lock:
                    stats.restarts[-1] = (stats.restarts[-1][0], time.monotonic())
                stats.add("upstream restart")
                next_restart += args.restart
        stop.set()
        for w in workers:
            w.join(120)
    finally:
        stop.set()
        for p in procs.values():
            p.kill()
            p.wait()

    print(f"soak: {args.seconds} s, upstream restarted every {args.restart} s")
    for what, n in sorted(stats.counts.items()):
        print(f"  {n:8d}  {what}")
    print("  time(s)  RSS(MiB)  open fds")
    step = max(1, len(timeline) // 15)
    for t, rss, fds in timeline[::step] + timeline[-1:]:
        print(f"  {t:7d}  {rss:8d}  {fds:8d}")
    failed = list(stats.unexpected)
    if len(timeline) >= 4:
        # Flat: the second half never goes far above the first half's peak.
        half = len(timeline) // 2
        first_rss, first_fds = max(r for _, r, _ in timeline[:half]), max(f for _, _, f in timeline[:half])
        last_rss, last_fds = max(r for _, r, _ in timeline[half:]), max(f for _, _, f in timeline[half:])
        if last_rss > first_rss + 8:
            failed.append(f"RSS grew: {first_rss} MiB in the first half, {last_rss} MiB in the second")
        if last_fds > first_fds + 16:
            failed.append(f"open descriptors grew: {first_fds} in the first half, {last_fds} in the second")
    if failed:
        print(f"soak: {len(failed)} unexpected error(s):")
        for e in failed[:30]:
            print(f"  {e}")
        sys.exit(1)
    shutil.rmtree(tmp, ignore_errors=True)
    print("soak: no unexpected errors; RSS and descriptors flat")


if __name__ == "__main__":
    main()
