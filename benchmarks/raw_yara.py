"""The raw YARA limit: yara-python in this process, one thread per core.

No ICAP, no sockets: each thread builds a unique body (the same bodies the
load generator sends, token included), undoes its Content-Encoding as the
gateway must, and scans it.  yara-python releases the GIL while it scans, so
threads use every core.  Its scans/s is the ceiling a scanning gateway on
this machine can approach; the gateway's target is 0.9 of it.
"""

from __future__ import annotations

import os
import threading
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from benchmarks.bodies import Body, decode, mean_lengths
from benchmarks.icapwire import token
from benchmarks.loadgen import Rates, percentile
from benchmarks.procinfo import machine_busy_seconds
from benchmarks.rulesets import compile_yara
from benchmarks.scenarios import make_bodies


@dataclass
class RawResult(Rates):
    threads: int
    completed: int
    duration: float
    body_length: float  # mean over the bodies
    decoded_length: float
    p50_ms: float | None
    p99_ms: float | None
    cpu: float
    matches: int
    machine_cpu: float = 0.0  # the whole machine's busy CPU seconds in the window


def run_raw(rules_path: Path, scenario: str, *, threads: int | None = None,
            warmup: float = 0.5, duration: float = 5.0, body_file: str | None = None,
            rules: object | None = None) -> RawResult:
    rules = rules if rules is not None else compile_yara(rules_path)
    bodies = make_bodies(scenario, body_file)
    n = threads or os.cpu_count() or 1
    t0 = time.monotonic() + 0.05
    lo, hi = t0 + warmup, t0 + warmup + duration
    lats = [array("d") for _ in range(n)]
    matched = [0] * n

    def work(i: int, bodies: list[Body] = bodies) -> None:
        seq = 0
        lat = lats[i]
        while True:
            seq += 1
            body = bodies[seq % len(bodies)]
            data = decode(body, body.wire(token(100 + i, seq)))
            start = time.monotonic()
            if start >= hi:
                return
            if rules.match(data=data):  # type: ignore[attr-defined]
                matched[i] += 1
            end = time.monotonic()
            if lo <= end <= hi:
                lat.append(end - start)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    while time.monotonic() < t0:
        time.sleep(0.001)
    for w in workers:
        w.start()
    while time.monotonic() < lo:
        time.sleep(0.005)
    cpu0 = sum(os.times()[:2])
    busy0 = machine_busy_seconds()
    for w in workers:
        w.join()
    cpu1 = sum(os.times()[:2])
    busy1 = machine_busy_seconds()
    all_lat = sorted(x for a in lats for x in a)
    p50, p99 = percentile(all_lat, 0.5), percentile(all_lat, 0.99)
    length, decoded = mean_lengths(bodies)
    return RawResult(
        threads=n,
        completed=len(all_lat),
        duration=duration,
        body_length=length,
        decoded_length=decoded,
        p50_ms=p50 * 1e3 if p50 is not None else None,
        p99_ms=p99 * 1e3 if p99 is not None else None,
        cpu=cpu1 - cpu0,
        matches=sum(matched),
        machine_cpu=busy1 - busy0,
    )
