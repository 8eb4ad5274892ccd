"""The raw YARA-X limit: yara-x in one worker process per core.

YARA-X holds the GIL while it scans, so threads do not add cores: like the
gateway's ``engine = "yara-x"`` this compiles once, serializes the rules and
scans in worker processes, each scanning the same unique bodies as the load
generator sends (Content-Encoding undone).  Optional target ``rawx``.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import time
from array import array
from pathlib import Path
from typing import Any

from benchmarks.bodies import decode, mean_lengths
from benchmarks.icapwire import token
from benchmarks.loadgen import percentile
from benchmarks.raw_yara import RawResult
from benchmarks.rulesets import EXTERNALS, rule_files
from benchmarks.scenarios import make_bodies


def compile_yarax(path: Path) -> bytes:
    """Serialized YARA-X rules: each file its own namespace, externals as globals."""
    import yara_x

    compiler = yara_x.Compiler(relaxed_re_syntax=True)
    for name, value in EXTERNALS.items():
        compiler.define_global(name, value)
    for namespace, file in rule_files(path).items():
        compiler.new_namespace(namespace)
        compiler.add_source(Path(file).read_text(errors="replace"), origin=file)
    buf = io.BytesIO()
    compiler.build().serialize_into(buf)
    return buf.getvalue()


def _worker(blob: bytes, scenario: str, body_file: str | None, index: int, pipe: Any) -> None:
    import yara_x

    scanner = yara_x.Scanner(yara_x.Rules.deserialize_from(io.BytesIO(blob)))
    bodies = make_bodies(scenario, body_file)
    lat = array("d")
    matched = 0
    seq = 0
    pipe.send("ready")
    lo, hi = pipe.recv()
    cpu0: float | None = None
    while True:
        seq += 1
        body = bodies[seq % len(bodies)]
        data = decode(body, body.wire(token(200 + index, seq)))
        start = time.monotonic()
        if start >= hi:
            break
        if cpu0 is None and start >= lo:
            cpu0 = sum(os.times()[:2])
        if scanner.scan(data).matching_rules:
            matched += 1
        end = time.monotonic()
        if lo <= end <= hi:
            lat.append(end - start)
    cpu1 = sum(os.times()[:2])
    pipe.send((lat.tobytes(), cpu1 - (cpu0 if cpu0 is not None else cpu1), matched))


def run_rawx(blob: bytes, scenario: str, *, processes: int | None = None, warmup: float = 0.5,
             duration: float = 5.0, body_file: str | None = None) -> RawResult:
    ctx = multiprocessing.get_context("spawn")
    n = processes or os.cpu_count() or 1
    length, decoded = mean_lengths(make_bodies(scenario, body_file))
    pipes, procs = [], []
    for i in range(n):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(blob, scenario, body_file, i, child), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    lats: list[float] = []
    cpu = 0.0
    matched = 0
    try:
        for pipe in pipes:  # every worker has its rules loaded before the clock starts
            if not pipe.poll(120):
                raise RuntimeError("a YARA-X worker did not start")
            pipe.recv()
        lo = time.monotonic() + warmup
        hi = lo + duration
        for pipe in pipes:
            pipe.send((lo, hi))
        for pipe in pipes:
            if not pipe.poll(hi - time.monotonic() + 60):
                raise RuntimeError("a YARA-X worker did not report")
            raw, c, m = pipe.recv()
            a = array("d")
            a.frombytes(raw)
            lats.extend(a)
            cpu += c
            matched += m
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    lats.sort()
    p50, p99 = percentile(lats, 0.5), percentile(lats, 0.99)
    return RawResult(
        threads=n, completed=len(lats), duration=duration, body_length=length,
        decoded_length=decoded,
        p50_ms=p50 * 1e3 if p50 is not None else None,
        p99_ms=p99 * 1e3 if p99 is not None else None,
        cpu=cpu, matches=matched,
    )
