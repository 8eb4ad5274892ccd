"""Hostile-peer figures for the connection limits (issue 8, item 4), measured
on a real gateway over loopback.  Every scenario stops by itself.

- ``slowloris``: how long peers sending one byte a second hold a connection:
  dripping the head; sending the head at once and dripping the body; the
  worst case (the head's last byte just before ``head_timeout``, then the
  body dripped).  By design: at most ``head_timeout + read_timeout``.
- ``idle``: N (default 3,000) idle keep-alive connections, each served one
  OPTIONS, against a gateway with default limits; then what new clients see
  (status and latency), and how many of the idle ones are still open.
- ``stalled-reader``: a 32 MiB RESPMOD echoed whole, its answer never read:
  how long the spool file outlives it (``write_timeout`` and socket buffers).
- ``pipeline-flood``: pipelined OPTIONS sent for 20 s, no answer read: what
  the gateway accepted and its RSS.
- ``memory``: N (default 400) requests of 1 MB each, all open at once (the
  body sent, its last chunk held back); the worker's RSS before and at the
  peak, then the answers.

    python -m benchmarks.slow_peers slowloris
    python -m benchmarks.slow_peers idle --connections 3000
    python -m benchmarks.slow_peers memory --uploads 400

The gateway is ``icap-gateway serve`` from this environment (run with
``PYTHONPATH`` set to the tree under test); ``--set section.key=value`` passes
settings on (e.g. ``--set server.workers=1``).
"""

from __future__ import annotations

import argparse
import resource
import socket
import threading
import time
from pathlib import Path

from benchmarks.procinfo import hwm_kib, reset_hwm, rss_kib
from benchmarks.servers import REPO, Server, parse_option, start_gateway

HOST = "127.0.0.1"
REQ_HDR = b"POST http://example.com/upload HTTP/1.1\r\nHost: example.com\r\nContent-Length: %d\r\n\r\n"


def options_request() -> bytes:
    return b"OPTIONS icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\nEncapsulated: null-body=0\r\n\r\n"


def reqmod_head(body_length: int) -> bytes:
    req = REQ_HDR % body_length
    return (b"REQMOD icap://127.0.0.1/reqmod ICAP/1.0\r\nHost: 127.0.0.1\r\nAllow: 204\r\n"
            b"Encapsulated: req-hdr=0, req-body=%d\r\n\r\n" % len(req)) + req


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def status_of(head: bytes) -> str:
    return head.split(b"\r\n", 1)[0].decode(errors="replace") if head else "closed without answer"


# --- slowloris ----------------------------------------------------------------


def drip(port: int, at_once: bytes, dripped: bytes, results: dict[str, tuple[float, str]], name: str,
         pause_before_drip: float, max_hold: float) -> None:
    """Send ``at_once``, wait, then one byte of ``dripped`` a second until the
    server closes (or ``max_hold`` seconds passed: the peer won)."""
    start = time.monotonic()
    with socket.create_connection((HOST, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        answer = b""
        try:
            if at_once:
                sock.sendall(at_once)
            sock.settimeout(pause_before_drip or 1.0)
            if pause_before_drip:
                try:
                    answer = sock.recv(4096)
                except TimeoutError:
                    pass
            sock.settimeout(1.0)
            for i in range(len(dripped)):
                if answer:
                    break
                if time.monotonic() - start > max_hold:
                    results[name] = (time.monotonic() - start, "still open: the peer gave up first")
                    return
                sock.sendall(dripped[i : i + 1])
                try:
                    answer = sock.recv(4096)
                    if not answer:
                        break
                except TimeoutError:
                    continue
            while answer and b"\r\n\r\n" not in answer:
                more = sock.recv(4096)
                if not more:
                    break
                answer += more
        except (BrokenPipeError, ConnectionResetError):
            pass
        results[name] = (time.monotonic() - start, status_of(answer))


def slowloris(server: Server, head_timeout: float, max_hold: float) -> None:
    body = b"x" * 100_000
    head = reqmod_head(len(body))
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    results: dict[str, tuple[float, str]] = {}
    scenarios = {
        "head dripped at 1 B/s": (b"", head + chunked, 0.0),
        "head at once, body dripped at 1 B/s": (head, chunked, 0.0),
        "head all but 1 byte, last byte at head_timeout - 1 s, body dripped": (head[:-1], head[-1:] + chunked,
                                                                              head_timeout - 1),
    }
    threads = [threading.Thread(target=drip, args=(server.port, a, d, results, name, p, max_hold))
               for name, (a, d, p) in scenarios.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in scenarios:
        held, answer = results[name]
        print(f"  {name:70s} held {held:6.1f} s, then: {answer}")


# --- idle flood ---------------------------------------------------------------


def idle_flood(server: Server, connections: int, newcomers: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, connections + 1000)), hard))
    idle: list[socket.socket] = []
    refused = 0
    start = time.monotonic()
    for _ in range(connections):
        sock = socket.create_connection((HOST, server.port), timeout=30)
        sock.sendall(options_request())
        if not status_of(read_head(sock)).startswith("ICAP/1.0 200"):
            refused += 1
        idle.append(sock)
    print(f"  {connections} connections opened and served one OPTIONS each in "
          f"{time.monotonic() - start:.1f} s ({refused} not answered 200)")
    time.sleep(1.0)
    statuses: dict[str, int] = {}
    latencies = []
    for _ in range(newcomers):
        t0 = time.monotonic()
        with socket.create_connection((HOST, server.port), timeout=30) as sock:
            sock.sendall(options_request())
            status = status_of(read_head(sock))
        latencies.append(time.monotonic() - t0)
        statuses[status] = statuses.get(status, 0) + 1
    print(f"  {newcomers} new clients: {statuses}; latency max {max(latencies) * 1000:.1f} ms, "
          f"median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms")
    still_open = 0
    for sock in idle:
        sock.setblocking(False)
        try:
            still_open += sock.recv(1) != b""
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
        sock.close()
    print(f"  idle connections still open at the end: {still_open} of {connections}")


# --- peers that do not read -------------------------------------------------


def stalled_reader(server: Server, size: int, give_up: float) -> None:
    """A RESPMOD of ``size`` bytes without Allow: 204 (echoed whole), whose
    answer is never read: how long its spool file outlives the request."""
    res_hdr = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % size
    head = (b"RESPMOD icap://127.0.0.1/respmod ICAP/1.0\r\nHost: 127.0.0.1\r\n"
            b"Encapsulated: res-hdr=0, res-body=%d\r\n\r\n" % len(res_hdr)) + res_hdr
    block = b"s" * (1024 * 1024)
    spool_dir = server.workdir / "state" / "spool"
    rss_before = rss_kib(server.proc.pid)
    with socket.create_connection((HOST, server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(head)
        for offset in range(0, size, len(block)):
            piece = block[: min(len(block), size - offset)]
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        sock.sendall(b"0\r\n\r\n")
        sent = time.monotonic()
        seen_spool = False
        while time.monotonic() - sent < give_up:
            files = list(spool_dir.glob("body-*")) if spool_dir.exists() else []
            seen_spool = seen_spool or bool(files)
            if seen_spool and not files:
                break
            time.sleep(0.25)
        held = time.monotonic() - sent
        rss_peak = rss_kib(server.proc.pid)
        state = "freed" if seen_spool and not list(spool_dir.glob("body-*")) else "still held"
        print(f"  {size / 2**20:.0f} MiB echo never read: spool {state} {held:.1f} s after the request was "
              f"sent; RSS {rss_before / 1024:.0f} -> {rss_peak / 1024:.0f} MiB")


def pipeline_flood(server: Server, seconds: float) -> None:
    """Pipelined OPTIONS sent for ``seconds`` without reading one answer."""
    pid = server.proc.pid
    rss_before = rss_kib(pid)
    request = options_request() * 100
    sent = 0
    with socket.create_connection((HOST, server.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(0.5)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                sent += sock.send(request)
            except TimeoutError:
                continue  # the gateway stopped reading: our send buffer is full
            except OSError:
                break
        rss_after = rss_kib(pid)
    print(f"  {seconds:.0f} s of pipelined OPTIONS, no answer read: {sent / 2**20:.1f} MiB accepted "
          f"({sent // len(options_request())} requests); gateway RSS {rss_before / 1024:.0f} -> "
          f"{rss_after / 1024:.0f} MiB")


# --- memory -------------------------------------------------------------------


def memory(server: Server, uploads: int, size: int) -> None:
    body = b"m" * size
    head = reqmod_head(size)
    first = head + b"%x\r\n" % size + body + b"\r\n"
    pid = server.proc.pid
    time.sleep(1.0)
    reset_hwm(pid)
    before = rss_kib(pid)
    socks = []
    start = time.monotonic()
    for _ in range(uploads):
        sock = socket.create_connection((HOST, server.port), timeout=60)
        sock.sendall(first)  # everything but the last chunk: the request stays open
        socks.append(sock)
    time.sleep(2.0)  # let the gateway read what is in flight
    peak_open = rss_kib(pid)
    for sock in socks:
        sock.sendall(b"0\r\n\r\n")
    statuses: dict[str, int] = {}
    for sock in socks:
        status = status_of(read_head(sock))
        statuses[status] = statuses.get(status, 0) + 1
        sock.close()
    elapsed = time.monotonic() - start
    print(f"  {uploads} x {size / 1e6:.1f} MB open at once: RSS {before / 1024:.0f} MiB before, "
          f"{peak_open / 1024:.0f} MiB with all open, peak (VmHWM, whole tree) {hwm_kib(pid) / 1024:.0f} MiB; "
          f"answers {statuses} in {elapsed:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", choices=["slowloris", "idle", "memory", "stalled-reader", "pipeline-flood"])
    p.add_argument("--echo-size", type=int, default=32 * 2**20, help="stalled-reader: body bytes")
    p.add_argument("--seconds", type=float, default=20.0, help="pipeline-flood: how long to send")
    p.add_argument("--max-hold", type=float, default=120.0, help="slowloris: give up after this many seconds")
    p.add_argument("--connections", type=int, default=3000, help="idle: idle connections")
    p.add_argument("--newcomers", type=int, default=20, help="idle: new clients after them")
    p.add_argument("--uploads", type=int, default=400, help="memory: requests open at once")
    p.add_argument("--size", type=int, default=1_000_000, help="memory: body bytes of each")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a gateway setting (repeatable)")
    args = p.parse_args(argv)
    # The benchmark config lifts max_connections to 20,000 for load runs:
    # these scenarios measure the shipped defaults.
    extra: dict[str, dict[str, object]] = {"server": {"max_connections": 1000}}
    if args.scenario != "idle":
        extra["server"]["workers"] = 1  # one worker: its RSS and spool are the figure
    for text in args.set:
        section, key, value = parse_option(text)
        extra.setdefault(section, {})[key] = value
    head_timeout = float(extra["server"].get("head_timeout", 30.0))  # type: ignore[arg-type]
    server = start_gateway(Path(REPO / "rules"), extra, service="respmod", tenant=False)
    try:
        print(f"{args.scenario}: gateway settings {extra}")
        if args.scenario == "slowloris":
            slowloris(server, head_timeout, args.max_hold)
        elif args.scenario == "idle":
            idle_flood(server, args.connections, args.newcomers)
        elif args.scenario == "stalled-reader":
            stalled_reader(server, args.echo_size, give_up=args.max_hold)
        elif args.scenario == "pipeline-flood":
            pipeline_flood(server, args.seconds)
        else:
            memory(server, args.uploads, args.size)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
