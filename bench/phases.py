#!/usr/bin/env python3
"""bench/phases.py CALLGRIND_OUT REQUESTS [IDLE [BODY_BYTES]] - instructions per request split by phase, from a callgrind
output file (bench/callgrind.sh writes one and calls this). A phase's figure is the inclusive count of
the functions that do it (their callees included); "rest" is what no phase claims: the runtime, the
body wrappers, allocation and copies outside the phases. Inlined functions are only seen if the binary
has line tables (bench/callgrind.sh builds one in target/profiling)."""

import re
import sys
from collections import defaultdict

# Each phase: functions whose inclusive count is the phase's; a call from one claimed function to
# another is counted once, in the caller.
PHASES = [
    ("server parse (request head)", [r"<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::parse$"]),
    ("header rules and id", [r"^glance_shim::headers::(for_upstream|remove_hop_by_hop)$",
                             r"^glance_shim::correlation::assign$"]),
    ("upstream write (request head)", [r"<hyper::proto::h1::role::Client as hyper::proto::h1::Http1Transaction>::encode$"]),
    ("upstream parse (response head)", [r"<hyper::proto::h1::role::Client as hyper::proto::h1::Http1Transaction>::parse$"]),
    ("response write (response head)", [r"<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::encode$"]),
    ("log lines", [r"as tracing_subscriber::layer::Layer<S>>::on_event$", r"^glance_shim::logging::.*::on_event$"]),
    ("inspector record", [r"^glance_shim::inflight::Registry::(open|answered|finish_inspect|copy_head)$",
                          r"^glance_shim::kept::Keeper::(head|finish)$", r"^glance_shim::events::"]),
    ("capture", [r"^glance_shim::capture::Capture::record$"]),
    ("body reads (hyper: the request body from the client, the response body from glance)",
     [r"^hyper::proto::h1::conn::Conn<I,B,T>::poll_read_body$"]),
    ("body wrappers (the shim's per-frame bookkeeping and copies)",
     [r"^<glance_shim::body::(RequestBody|ResponseBody) as http_body::Body>::poll_frame$"]),
]


def parse(path):
    """Self and inclusive instruction counts per function name."""
    names = {}
    inclusive = defaultdict(int)
    calls = defaultdict(int)
    fn = callee = None
    pending_call = False
    total = 0

    def name(kind, rest):
        m = re.match(r"\((\d+)\)(?: (.*))?", rest)
        if not m:
            return rest
        key = (kind, m.group(1))
        if m.group(2) is not None:
            names[key] = m.group(2)
        return names.get(key, rest)

    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("fn="):
                fn = name("fn", line[3:])
            elif line.startswith(("cfn=", "cfi=", "cfl=")):
                if line.startswith("cfn="):
                    callee = name("fn", line[4:])
            elif line.startswith("calls="):
                pending_call = True
            elif line and (line[0].isdigit() or line[0] in "+-*"):
                parts = line.split()
                cost = int(parts[1]) if len(parts) > 1 else 0
                if pending_call:
                    inclusive[fn] += cost  # the callee's inclusive cost, charged to the caller
                    if callee != fn:
                        calls[(fn, callee)] += cost
                    pending_call = False
                else:
                    inclusive[fn] += cost
                    total += cost
            elif line.startswith("summary:") or line.startswith("totals:"):
                pass
    return inclusive, calls, total


def main():
    path, requests = sys.argv[1], int(sys.argv[2])
    idle = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    body = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    frames = body / 65536 * requests if body else 0
    inclusive, calls, total = parse(path)
    work = total - idle
    claims = {fn: phase for phase, patterns in PHASES for fn in inclusive
              if fn and any(re.search(p, fn) for p in patterns)}
    # What a claimed function spends in calls to another claimed one is counted in the caller only.
    inner = defaultdict(int)
    for (caller, callee), cost in calls.items():
        if caller in claims and callee in claims:
            inner[callee] += cost
    print("| phase | instructions per request | share |" + (" per 64 KiB of body |" if frames else ""))
    print("|---|---|---|" + ("---|" if frames else ""))
    per_frame = (lambda n: f" {n / frames:,.0f} |") if frames else (lambda n: "")
    claimed = 0
    for phase, patterns in PHASES:
        n = sum(inclusive[fn] - inner[fn] for fn, ph in claims.items() if ph == phase)
        claimed += n
        print(f"| {phase} | {n / requests:,.0f} | {n / work * 100:.1f}% |" + per_frame(n))
    print(f"| rest (runtime, body writes, socket calls, allocation) | {(work - claimed) / requests:,.0f} | "
          f"{(work - claimed) / work * 100:.1f}% |" + per_frame(work - claimed))
    print(f"| all | {work / requests:,.0f} | 100% |" + per_frame(work))


if __name__ == "__main__":
    main()
