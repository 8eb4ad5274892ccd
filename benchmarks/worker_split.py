"""How evenly do a few persistent connections spread over the workers?

Squid keeps a few long-lived ICAP connections; whichever worker each lands
on serves all of its requests.  This opens N connections at once to a
gateway with 2 workers, sends the same number of requests on each, and
reads each worker's open connections from the supervisor's /metrics
(``icap_gateway_worker_connections{worker=...}``) while they are still
open: a worker's share of the connections is its share of the requests.
Both modes of ``[server] worker_balance`` run in the same invocation, the
kernel's shared listener (the old behaviour) first:

    python -m benchmarks.worker_split --runs 20

Target (issue 9): with 4 and 8 connections, no worker serves more than
60 % of the requests, in every run.
"""

from __future__ import annotations

import argparse
import re
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.icapwire import ResponseParser
from benchmarks.servers import REPO, ServerUnavailable, free_port, start_gateway

TARGET_SHARE = 0.6
MODES = ("kernel", "least-loaded")
_GAUGE = re.compile(r'^icap_gateway_worker_connections\{worker="(\d+)"\} (\S+)$', re.M)

_REQ_HDR = b"GET http://example.com/split HTTP/1.1\r\nHost: example.com\r\n\r\n"
_RES_HDR = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"


def respmod_request(port: int) -> bytes:
    """A small RESPMOD the gateway answers 204 (clean, Allow: 204)."""
    head = (
        f"RESPMOD icap://127.0.0.1:{port}/respmod ICAP/1.0\r\nHost: 127.0.0.1:{port}\r\nAllow: 204\r\n"
        f"Encapsulated: req-hdr=0, res-hdr={len(_REQ_HDR)}, res-body={len(_REQ_HDR) + len(_RES_HDR)}\r\n\r\n"
    ).encode()
    return head + _REQ_HDR + _RES_HDR + b"5\r\nhello\r\n0\r\n\r\n"


def worker_connections(metrics_port: int) -> dict[int, int]:
    """Open connections of each worker, from the supervisor's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {int(worker): int(float(value)) for worker, value in _GAUGE.findall(text)}


def _wait_total(metrics_port: int, total: int, timeout: float = 10.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = worker_connections(metrics_port)
        if sum(counts.values()) == total or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def one_run(port: int, metrics_port: int, connections: int, requests: int) -> tuple[list[int], int]:
    """Open ``connections`` at once, send ``requests`` on each; (connections
    each worker held, most first; requests answered).  Every connection
    carried the same requests, so the first is also a share of requests."""
    request = respmod_request(port)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(connections)]
    answered = 0
    try:
        parsers = [ResponseParser() for _ in socks]
        for _ in range(requests):
            for s in socks:
                s.sendall(request)
            for s, parser in zip(socks, parsers, strict=True):
                got: list[object] = []
                while not got:
                    data = s.recv(65536)
                    if not data:
                        raise ConnectionError("the gateway closed a persistent connection")
                    got.extend(parser.feed(data))
                answered += len(got)
        counts = _wait_total(metrics_port, connections)
    finally:
        for s in socks:
            s.close()
    _wait_total(metrics_port, 0)  # the next run starts from empty workers
    return sorted(counts.values(), reverse=True), answered


@dataclass
class SplitResult:
    mode: str
    connections: int
    splits: list[list[int]] = field(default_factory=list)  # connections per worker, most first, per run
    answered: int = 0

    @property
    def worst_share(self) -> float:
        return max((s[0] / sum(s) for s in self.splits if sum(s)), default=1.0)

    @property
    def met(self) -> bool:
        return self.worst_share <= TARGET_SHARE

    def summary(self) -> str:
        seen = Counter("/".join(map(str, split)) for split in self.splits)
        shown = ", ".join(f"{split} x{count}" for split, count in seen.most_common())
        return (f"{self.mode:>12}  {self.connections} connections: {shown}; worst {self.worst_share:.0%} "
                f"-> {'met' if self.met else 'missed'} (<= {TARGET_SHARE:.0%})")


def connection_rate(port: int, seconds: float) -> float:
    """New connections per second, one at a time, each carrying one OPTIONS:
    what the hand-off through the supervisor costs a connection."""
    request = (f"OPTIONS icap://127.0.0.1:{port}/respmod ICAP/1.0\r\nHost: 127.0.0.1:{port}\r\n"
               "Encapsulated: null-body=0\r\n\r\n").encode()
    done = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(request)
            parser = ResponseParser()
            got: list[object] = []
            while not got:
                data = s.recv(65536)
                if not data:
                    raise ConnectionError("closed before answering OPTIONS")
                got.extend(parser.feed(data))
        done += 1
    return done / (time.perf_counter() - start)


def measure(mode: str, connection_counts: Sequence[int], runs: int, requests: int,
            rules: Path = REPO / "rules", rate_seconds: float = 0.0) -> tuple[list[SplitResult], float]:
    for attempt in range(3):  # a free port may be taken before the gateway binds it
        metrics_port = free_port()
        extra: dict[str, dict[str, object]] = {
            "server": {"workers": 2, "worker_balance": mode},
            "monitoring": {"metrics_listen": f"tcp:{metrics_port}:interface=127.0.0.1"},
        }
        try:
            server = start_gateway(rules, extra)
            break
        except ServerUnavailable:
            if attempt == 2:
                raise
    try:
        deadline = time.monotonic() + 60
        while len(worker_connections(metrics_port)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        _wait_ready(metrics_port)
        results = []
        for n in connection_counts:
            result = SplitResult(mode, n)
            for _ in range(runs):
                split, answered = one_run(server.port, metrics_port, n, requests)
                result.splits.append(split)
                result.answered += answered
            results.append(result)
        rate = connection_rate(server.port, rate_seconds) if rate_seconds else 0.0
        return results, rate
    finally:
        server.stop()


def _wait_ready(metrics_port: int, timeout: float = 60.0) -> None:
    """Every worker ready: a run while one is still loading its rules would
    measure the start, not the balance."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as r:
                if r.status == 200 and b"2 of 2" in r.read():
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("the workers did not become ready")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker_split", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per connection count and mode (20)")
    parser.add_argument("--requests", type=int, default=5, help="requests per connection per run (5)")
    parser.add_argument("--connections", default="4,8", help="connection counts (4,8)")
    parser.add_argument("--connect-seconds", type=float, default=3.0,
                        help="also measure new connections per second for this long (3; 0 skips)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"[server] worker_balance values ({','.join(MODES)})")
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.connections.split(",")]
    all_met = True
    for mode in args.modes.split(","):
        results, rate = measure(mode, counts, args.runs, args.requests, rate_seconds=args.connect_seconds)
        for result in results:
            print(result.summary(), flush=True)
            if mode == "least-loaded":
                all_met &= result.met
        if rate:
            print(f"{mode:>12}  new connections, one OPTIONS each, one at a time: {rate:,.0f}/s", flush=True)
    return 0 if all_met else 1


if __name__ == "__main__":
    raise SystemExit(main())
