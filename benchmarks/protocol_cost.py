"""What the request path costs the gateway per transaction, without YARA
and its thread pool: the ICAP protocol on a real loopback TCP connection,
a synchronous clean verdict, the real metrics and access log.  Each row is
one setting toggled against the gateway as it ships, measured in the same
run, so the ratios hold on a busy machine where absolute figures do not.

    python -m benchmarks.protocol_cost [--requests N] [--rounds R]

Rows (server CPU per transaction, getrusage of the serving process):
  shipped          direct socket writes, access log batched
  twisted-writes   every answer through Twisted's transport.write
                   (an epoll register/unregister per answer)
  line-access-log  the access log written line by line, one write() each
  tenant-tables    per-tenant policy: 100 [tenants.NAME] tables, the
                   bench tenant's among them (the lookup after authentication)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

REQ_HDR = b"GET http://example.com/file.bin HTTP/1.1\r\nHost: example.com\r\n\r\n"
RES_HDR = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1024\r\n\r\n"


def request(body: bytes) -> bytes:
    enc = f"req-hdr=0, res-hdr={len(REQ_HDR)}, res-body={len(REQ_HDR) + len(RES_HDR)}"
    head = ("RESPMOD icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\nAllow: 204\r\n"
            f"Authorization: Bearer bench\r\nEncapsulated: {enc}\r\n\r\n").encode()
    return head + REQ_HDR + RES_HDR + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def _client(port: int, count: int, ready: Any) -> None:
    """Sends ``count`` requests one after another on one connection."""
    body = os.urandom(1024)
    data = request(body)
    sock = socket.create_connection(("127.0.0.1", port))
    ready.wait()
    for _ in range(count):
        sock.sendall(data)
        got = b""
        while not got.endswith(b"\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise RuntimeError("gateway closed the connection")
            got += chunk
    sock.close()


def _serve(variant: str, count: int, out: Any) -> None:
    """One server process per row: the reactor is not restartable."""
    from twisted.internet import reactor
    from twisted.internet.defer import succeed

    from gateway import protocol
    from gateway.blockpage import BlockPage
    from gateway.interfaces import Authenticated, Identity, Tenant, Verdict
    from gateway.protocol import GatewayContext, ICAPFactory
    from gateway.scanning.spool import BodySpool
    from monitoring.accesslog import AccessLog, AccessLogFile
    from monitoring.metrics import GatewayMetrics, metrics_registry
    from monitoring.observer import MonitoringObserver

    class Clean:
        version = "bench"

        def scan(self, body: object, context: object) -> Any:
            return succeed(Verdict("clean", scanned_bytes=1024))

        def scan_then(self, body: object, context: object, on_verdict: Any) -> None:
            on_verdict(Verdict("clean", scanned_bytes=1024))

    class Accept:
        def authenticate(self, credentials: object) -> Authenticated:
            return Authenticated(Tenant(1, "bench"))

    class Drop:
        def record(self, event: object) -> None:
            pass

    if variant == "twisted-writes":
        protocol._direct_transport = lambda transport: None  # type: ignore[assignment]
    workdir = Path(tempfile.mkdtemp(prefix="bench-protocol-"))
    access_file = AccessLogFile(str(workdir / "access.log"),
                                clock=None if variant == "line-access-log" else reactor)
    metrics = GatewayMetrics(metrics_registry(None), max_tenants=10, max_rules=10, clock=reactor)  # folds, as deployed
    observer = MonitoringObserver(metrics, AccessLog(access_file), clock=reactor.seconds)
    ctx = GatewayContext(
        scanner=Clean(), authenticator=Accept(), recorder=Drop(), observer=observer,  # type: ignore[arg-type]
        new_spool=lambda: BodySpool(1 << 20, workdir), block_page=BlockPage(), clock=reactor,  # type: ignore[arg-type]
        identify=lambda headers, peer: Identity(None, peer),
    )
    if variant == "tenant-tables":
        import tomllib

        from gateway.config import parse_config
        from gateway.policy import PolicyTable

        tables = "".join(f'[tenants.t{i}]\nmax_scan_size = "{i + 1} MiB"\n' for i in range(99))
        tables += '[tenants.bench]\nsupport_contact = "bench"\nskip_types = []\n'
        ctx.policy_for = PolicyTable(parse_config(tomllib.loads(tables), "bench"), ctx.block_page)
    factory = ICAPFactory(ctx)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    ready = multiprocessing.Event()
    client = multiprocessing.Process(target=_client, args=(port.getHost().port, count, ready))
    client.start()
    before: list[float] = []

    def start() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        before.extend((usage.ru_utime + usage.ru_stime, time.monotonic()))
        ready.set()

    def check() -> None:
        if client.is_alive():
            reactor.callLater(0.01, check)  # type: ignore[attr-defined]
            return
        usage = resource.getrusage(resource.RUSAGE_SELF)
        access_file.close()
        out.send((usage.ru_utime + usage.ru_stime - before[0], time.monotonic() - before[1]))
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callLater(0.2, start)  # type: ignore[attr-defined]
    reactor.callLater(0.3, check)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def measure(variant: str, count: int) -> tuple[float, float]:
    parent, child = multiprocessing.Pipe()
    proc = multiprocessing.Process(target=_serve, args=(variant, count, child))
    proc.start()
    cpu, wall = parent.recv()
    proc.join()
    return cpu / count * 1e6, count / wall


VARIANTS = ("shipped", "twisted-writes", "line-access-log", "tenant-tables")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="each row runs this often, interleaved (median)")
    opts = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    for _ in range(opts.rounds):
        for variant in VARIANTS:
            results[variant].append(measure(variant, opts.requests))
    base = statistics.median(cpu for cpu, _ in results["shipped"])
    print(f"{'row':<16} {'CPU us/tx':>10} {'req/s':>8} {'CPU x shipped':>14}")
    for variant in VARIANTS:
        cpu = statistics.median(c for c, _ in results[variant])
        rate = statistics.median(r for _, r in results[variant])
        print(f"{variant:<16} {cpu:>10.1f} {rate:>8.0f} {cpu / base:>14.2f}")


if __name__ == "__main__":
    main()
