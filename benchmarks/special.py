"""Memory scenarios: one huge streamed body, and many idle connections.

``huge``: a single RESPMOD whose body (2 GiB by default) is produced lazily
from one repeated random block, so the generator holds a few MiB at most;
the server's RSS is sampled throughout.  A streaming gateway's RSS should
barely move (target: < 64 MiB growth).

``idle``: N persistent connections, each used for one OPTIONS request (so
the server has really accepted and set it up), then left idle; the server's
RSS is read after they settle (target: 10,000 connections in < 300 MiB).
"""

from __future__ import annotations

import random
import resource
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from benchmarks.bodies import MiB
from benchmarks.icapwire import (
    ProtocolError,
    RequestTemplate,
    Response,
    ResponseParser,
    options_request,
)
from benchmarks.loadgen import stream_request
from benchmarks.procinfo import BackgroundSampler, anon_kib, pss_kib, rss_kib, tree


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class HugeResult:
    size: int
    seconds: float
    status: int | None
    error: str | None
    rss_start_mib: float
    rss_peak_mib: float
    anon_start_mib: float = 0.0
    anon_peak_mib: float = 0.0  # RSS without mapped files (a scanned spool file is mapped)

    @property
    def growth_mib(self) -> float:
        return self.rss_peak_mib - self.rss_start_mib

    @property
    def anon_growth_mib(self) -> float:
        return self.anon_peak_mib - self.anon_start_mib

    @property
    def mbps(self) -> float:
        return self.size / self.seconds / 1e6 if self.seconds else 0.0


def run_huge(host: str, port: int, service: str, server_pid: int, size: int,
             timeout: float = 600.0, authorization: str | None = None) -> HugeResult:
    head_tpl = RequestTemplate(host, port, service, _Sized(size), authorization=authorization)
    block = random.Random(4).randbytes(MiB)
    got: list[Response] = []
    error: list[str] = []
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def read() -> None:
        parser = ResponseParser()
        try:
            while not got:
                data = sock.recv(1 << 18)
                if not data:
                    error.append("server closed the connection")
                    return
                got.extend(parser.feed(data))
        except (OSError, ProtocolError) as e:
            error.append(str(e))

    start_rss = rss_kib(server_pid)
    start_anon = anon_kib(server_pid)
    reader = threading.Thread(target=read, daemon=True)
    t0 = time.monotonic()
    with BackgroundSampler(server_pid) as sampler:
        reader.start()
        try:
            for buf in stream_request(head_tpl, size, block):
                if got or error:
                    break  # answered early (refused, or blocked)
                sock.sendall(buf)
        except OSError as e:
            if not got:
                error.append(f"send: {e}")
        reader.join(timeout)
        seconds = time.monotonic() - t0
    sock.close()
    return HugeResult(
        size=size, seconds=seconds, status=got[0].status if got else None,
        error=error[0] if error and not got else None,
        rss_start_mib=start_rss / 1024, rss_peak_mib=sampler.peak_kib / 1024,
        anon_start_mib=start_anon / 1024, anon_peak_mib=sampler.anon_peak_kib / 1024,
    )


class _Sized:
    """A body description with only a length (the huge body is streamed)."""

    encoding = None

    def __init__(self, length: int) -> None:
        self.length = length

    def segments(self, tok: bytes) -> list[memoryview]:  # pragma: no cover - never framed
        raise NotImplementedError


@dataclass
class IdleResult:
    requested: int
    opened: int
    answered: int
    still_alive: int  # of a sample checked at the end
    checked: int
    rss_before_mib: float
    rss_after_mib: float
    error: str | None
    pss_before_mib: float = 0.0
    pss_after_mib: float = 0.0
    processes: int = 1

    @property
    def growth_mib(self) -> float:
        return self.rss_after_mib - self.rss_before_mib

    @property
    def kib_per_connection(self) -> float:
        return self.growth_mib * 1024 / self.opened if self.opened else 0.0


def run_idle(host: str, port: int, service: str, server_pid: int, n: int,
             batch: int = 200, settle: float = 2.0) -> IdleResult:
    raise_nofile()
    rss_before = rss_kib(server_pid)
    pss_before = pss_kib(server_pid)
    req = options_request(host, port, service)
    socks: list[socket.socket] = []
    answered = 0
    error: str | None = None
    sel = selectors.DefaultSelector()
    try:
        while len(socks) < n:
            fresh: list[socket.socket] = []
            for _ in range(min(batch, n - len(socks))):
                s = socket.create_connection((host, port), timeout=10)
                s.setblocking(False)
                fresh.append(s)
            socks.extend(fresh)
            answered += _options_all(sel, fresh, req, timeout=30)
    except OSError as e:
        error = f"after {len(socks)} connections: {e}"
    time.sleep(settle)
    rss_after = rss_kib(server_pid)
    pss_after = pss_kib(server_pid)
    processes = len(tree(server_pid))
    # are they still open and usable?  check a sample
    sample = random.Random(5).sample(socks, min(100, len(socks)))
    alive = _options_all(sel, sample, req, timeout=30) if sample else 0
    for s in socks:
        s.close()
    return IdleResult(
        requested=n, opened=len(socks), answered=answered, still_alive=alive,
        checked=len(sample), rss_before_mib=rss_before / 1024, rss_after_mib=rss_after / 1024,
        error=error, pss_before_mib=pss_before / 1024, pss_after_mib=pss_after / 1024,
        processes=processes,
    )


def _options_all(sel: selectors.BaseSelector, socks: list[socket.socket], req: bytes,
                 timeout: float) -> int:
    """Send OPTIONS on every socket, count the 200s (sockets stay open)."""
    parsers = {}
    for s in socks:
        try:
            s.send(req)  # tiny: fits the empty send buffer in one go
        except OSError:
            continue
        parsers[s] = ResponseParser()
        sel.register(s, selectors.EVENT_READ)
    ok = 0
    deadline = time.monotonic() + timeout
    while parsers and time.monotonic() < deadline:
        for key, _ in sel.select(0.5):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(65536)
                done = list(parsers[s].feed(data)) if data else []
            except (OSError, ProtocolError):
                data, done = b"", []
            if done or not data:
                ok += sum(1 for r in done if r.status == 200)
                sel.unregister(s)
                del parsers[s]
    for s in parsers:
        sel.unregister(s)
    return ok
