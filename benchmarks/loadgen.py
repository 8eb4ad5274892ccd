"""The ICAP load generator: persistent connections, N in flight, several processes.

Each client process runs a ``selectors`` loop over its share of the
connections; each connection has one request in flight at a time (ICAP has
no pipelining in practice), so concurrency is the number of connections.
Requests are pre-framed buffer lists sent with ``sendmsg`` (no body copies);
responses go through the small incremental parser in ``icapwire``.

Timing: all processes share CLOCK_MONOTONIC.  The parent hands every child
the same start instant; requests completing during the warm-up are not
counted, then those completing inside the measurement window are.  When the
window closes, requests in flight are drained (bounded) so the server is left
idle for the next scenario.  Each child measures its own CPU time inside the
window, which is what the generator costs.
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import socket
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from benchmarks.bodies import Body, bodies_name, mean_lengths
from benchmarks.icapwire import (
    ProtocolError,
    RequestTemplate,
    Response,
    ResponseParser,
    options_request,
    token,
)
from benchmarks.scenarios import make_bodies, method

SEND_IOV = 64  # buffers per sendmsg call
RECV_SIZE = 256 * 1024


@dataclass(frozen=True)
class LoadSpec:
    host: str
    port: int
    service: str
    scenario: str
    concurrency: int = 8
    clients: int = 2  # generator processes
    preview: int | None = None  # bytes of preview, None: no preview
    warmup: float = 1.0
    duration: float = 5.0
    drain: float = 10.0  # at most this long to finish requests in flight after the window
    body_file: str | None = None
    authorization: str | None = None  # ICAP Authorization value ("Bearer KEY"), None: none sent


@dataclass
class WorkerResult:
    completed: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    latencies: bytes = b""  # array('d') of seconds, requests completed in the window
    cpu: float = 0.0  # CPU seconds this process used inside the window
    reconnects: int = 0
    blocked: int = 0  # completed answers carrying an HTTP 403 (a block page)
    # requests completed in the window on each connection, by its local port: the
    # server side of the port tells which worker process served them
    per_port: dict[int, int] = field(default_factory=dict)


class Rates:
    """Throughput of a measured window: requests (or scans) and body bytes."""

    completed: int
    duration: float
    body_length: float
    decoded_length: float

    @property
    def rps(self) -> float:
        return self.completed / self.duration

    @property
    def mbps(self) -> float:
        """Body bytes on the wire, MB/s (10^6)."""
        return self.completed * self.body_length / self.duration / 1e6

    @property
    def decoded_mbps(self) -> float:
        return self.completed * self.decoded_length / self.duration / 1e6


@dataclass
class LoadResult(Rates):
    spec: LoadSpec
    body_name: str
    body_length: float  # mean over the bodies (one unless --body-file is a directory)
    decoded_length: float
    completed: int
    errors: int
    statuses: dict[int, int]
    error_samples: list[str]
    duration: float
    p50_ms: float | None
    p99_ms: float | None
    generator_cpu: float  # CPU seconds of all generator processes in the window
    reconnects: int
    blocked: int = 0
    per_port: dict[int, int] = field(default_factory=dict)

    @property
    def generator_cores(self) -> float:
        return self.generator_cpu / self.duration

    @property
    def generator_us_per_request(self) -> float | None:
        return self.generator_cpu / self.completed * 1e6 if self.completed else None


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class _Conn:
    """One persistent connection with at most one request in flight."""

    __slots__ = (
        "after", "client", "inflight", "out", "parser", "port", "sock", "started",
        "waiting_continue", "writing",
    )

    def __init__(self, client: _Client) -> None:
        self.client = client
        self.sock = client.connect()
        self.port = int(self.sock.getsockname()[1])
        self.parser = ResponseParser()
        self.out: deque[memoryview] = deque()
        self.after: list[bytes | memoryview] = []
        self.started = 0.0
        self.waiting_continue = False
        self.inflight = False
        self.writing = False

    def start(self, now: float) -> None:
        c = self.client
        c.seq += 1
        first, after = c.build(c.seq)
        if c.small:
            # one buffer per small request: fewer iovecs, one copy of ~1 KiB
            self.out.append(memoryview(b"".join(first)))
        else:
            self.out.extend(memoryview(b) for b in first)
        self.after = after
        self.waiting_continue = bool(after)
        self.started = now
        self.inflight = True
        self.flush()

    def flush(self) -> None:
        out = self.out
        while out:
            try:
                n = self.sock.sendmsg(list(islice(out, SEND_IOV)))
            except BlockingIOError:
                break
            except OSError as e:  # reset by the server: it answered and closed, or crashed
                self.client.fail(self, f"send: {e}")
                return
            while n:
                head = out[0]
                if n >= len(head):
                    n -= len(head)
                    out.popleft()
                else:
                    out[0] = head[n:]
                    n = 0
        if bool(out) != self.writing:
            self.writing = bool(out)
            self.client.want_write(self, self.writing)

    def readable(self, now: float) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self.client.fail(self, f"recv: {e}")
            return
        if not data:
            self.client.fail(self, "server closed the connection")
            return
        try:
            for resp in self.parser.feed(data):
                if resp.status == 100:
                    if not self.waiting_continue:
                        raise ProtocolError("unexpected 100 Continue")
                    self.waiting_continue = False
                    self.out.extend(memoryview(b) for b in self.after)
                    self.after = []
                    self.flush()
                    continue
                if self.out and not self.waiting_continue:
                    # a final answer before the whole request was sent: the
                    # connection is out of step, start afresh
                    self.client.fail(self, f"early {resp.status} before the request was sent")
                    return
                self.out.clear()
                self.after = []
                self.waiting_continue = False
                self.inflight = False
                self.client.done(self, resp, now)
        except ProtocolError as e:
            self.client.fail(self, f"protocol: {e}")


class _Client:
    """One generator process's event loop."""

    def __init__(self, spec: LoadSpec, index: int, bodies: list[Body]) -> None:
        self.spec = spec
        self.index = index
        self.templates = [RequestTemplate(spec.host, spec.port, spec.service, b, spec.preview,
                                          method(spec.scenario), spec.authorization)
                          for b in bodies]
        self.template = self.templates[0]
        self.small = self.template.body_length <= 64 * 1024
        self.sel = selectors.DefaultSelector()
        self.seq = 0
        self.result = WorkerResult()
        self.latencies = array("d")
        self.window = (0.0, 0.0)
        self.running = True
        self.on_done: Callable[[_Conn, Response, float], None] | None = None
        self.conns: list[_Conn] = []

    def build(self, seq: int) -> tuple[list[bytes | memoryview], list[bytes | memoryview]]:
        if len(self.templates) > 1:  # several files: take them in turn
            self.template = self.templates[seq % len(self.templates)]
            self.small = self.template.body_length <= 64 * 1024
        return self.template.build(seq, token(self.index, seq))

    def connect(self) -> socket.socket:
        s = socket.create_connection((self.spec.host, self.spec.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        return s

    def add(self, conn: _Conn) -> None:
        self.conns.append(conn)
        self.sel.register(conn.sock, selectors.EVENT_READ, conn)

    def want_write(self, conn: _Conn, write: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        self.sel.modify(conn.sock, events, conn)

    def record_error(self, message: str) -> None:
        self.result.errors += 1
        if len(self.result.error_samples) < 5:
            self.result.error_samples.append(message)

    def fail(self, conn: _Conn, message: str) -> None:
        now = time.monotonic()
        if self.window[0] <= now:
            self.record_error(message)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        self.conns.remove(conn)
        if not self.running:
            return
        self.result.reconnects += 1
        try:
            fresh = _Conn(self)
        except OSError as e:
            self.record_error(f"reconnect: {e}")
            time.sleep(0.05)  # back off rather than spin against a dead server
            return
        self.add(fresh)
        fresh.start(now)

    def done(self, conn: _Conn, resp: Response, now: float) -> None:
        lo, hi = self.window
        if lo <= now <= hi:
            if resp.status in (200, 204):
                self.result.completed += 1
                self.latencies.append(now - conn.started)
                self.result.per_port[conn.port] = self.result.per_port.get(conn.port, 0) + 1
                if resp.http_status == 403:
                    self.result.blocked += 1
            else:
                self.record_error(f"ICAP status {resp.status}")
            self.result.statuses[resp.status] = self.result.statuses.get(resp.status, 0) + 1
        if self.on_done is not None:
            self.on_done(conn, resp, now)
        elif self.running:
            conn.start(now)

    def loop(self, until: float) -> None:
        while self.conns:
            now = time.monotonic()
            if now >= until:
                return
            for key, mask in self.sel.select(min(0.2, until - now)):
                conn: _Conn = key.data
                if conn not in self.conns:
                    continue  # replaced by fail() during this batch
                if mask & selectors.EVENT_WRITE:
                    conn.flush()
                if mask & selectors.EVENT_READ and conn in self.conns:
                    conn.readable(time.monotonic())

    def busy(self) -> bool:
        return any(c.inflight for c in self.conns)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _worker(spec: LoadSpec, index: int, nconns: int, pipe: Any) -> None:
    """A generator process: connect, wait for the start instant, load, report."""
    try:
        client = _Client(spec, index, make_bodies(spec.scenario, spec.body_file))
        for _ in range(nconns):
            client.add(_Conn(client))
    except Exception as e:  # tell the parent instead of hanging it
        pipe.send(("error", f"{type(e).__name__}: {e}"))
        return
    pipe.send(("ready", None))
    t0 = pipe.recv()
    lo = t0 + spec.warmup
    hi = lo + spec.duration
    client.window = (lo, hi)
    while time.monotonic() < t0:
        time.sleep(0.001)
    now = time.monotonic()
    for conn in list(client.conns):
        conn.start(now)
    client.loop(lo)
    cpu0 = sum(os.times()[:2])
    client.loop(hi)
    cpu1 = sum(os.times()[:2])
    # drain: no new requests, wait (bounded) for the ones in flight
    client.running = False
    deadline = time.monotonic() + spec.drain
    while client.busy() and time.monotonic() < deadline:
        client.loop(min(deadline, time.monotonic() + 0.2))
    for conn in client.conns:
        conn.sock.close()
    client.result.latencies = client.latencies.tobytes()
    client.result.cpu = cpu1 - cpu0
    pipe.send(("result", client.result))


def run_load(spec: LoadSpec, during: Callable[[float, float], None] | None = None) -> LoadResult:
    """Run ``spec``; ``during(window_start, window_end)`` runs in the parent meanwhile
    (e.g. to sample the server's RSS and CPU) and must return after the window."""
    ctx = multiprocessing.get_context("spawn")
    clients = max(1, min(spec.clients, spec.concurrency))
    pipes = []
    procs = []
    for i, n in enumerate(_split(spec.concurrency, clients)):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(spec, i, n, child), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        for pipe in pipes:
            if not pipe.poll(120):
                raise RuntimeError("a generator process did not start within 120 s")
            kind, payload = pipe.recv()
            if kind == "error":
                raise RuntimeError(f"generator process failed: {payload}")
        t0 = time.monotonic() + 0.05
        for pipe in pipes:
            pipe.send(t0)
        lo = t0 + spec.warmup
        if during is not None:
            during(lo, lo + spec.duration)
        results: list[WorkerResult] = []
        for pipe in pipes:
            if not pipe.poll(spec.warmup + spec.duration + spec.drain + 60):
                raise RuntimeError("a generator process did not report")
            kind, payload = pipe.recv()
            if kind != "result":
                raise RuntimeError(f"generator process failed: {payload}")
            results.append(payload)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    lat: list[float] = []
    statuses: dict[int, int] = {}
    samples: list[str] = []
    for r in results:
        a = array("d")
        a.frombytes(r.latencies)
        lat.extend(a)
        for k, v in r.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
        samples.extend(r.error_samples)
    lat.sort()
    per_port: dict[int, int] = {}
    for r in results:
        per_port.update(r.per_port)  # ports of one host's connections are distinct
    bodies = make_bodies(spec.scenario, spec.body_file)
    length, decoded = mean_lengths(bodies)
    p50, p99 = percentile(lat, 0.50), percentile(lat, 0.99)
    return LoadResult(
        spec=spec,
        body_name=bodies_name(bodies),
        body_length=length,
        decoded_length=decoded,
        completed=sum(r.completed for r in results),
        errors=sum(r.errors for r in results),
        statuses=statuses,
        error_samples=samples[:5],
        duration=spec.duration,
        p50_ms=p50 * 1e3 if p50 is not None else None,
        p99_ms=p99 * 1e3 if p99 is not None else None,
        generator_cpu=sum(r.cpu for r in results),
        reconnects=sum(r.reconnects for r in results),
        blocked=sum(r.blocked for r in results),
        per_port=per_port,
    )


def options(host: str, port: int, service: str, timeout: float = 5.0) -> Response:
    """One OPTIONS request on a fresh connection (also a readiness probe)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(options_request(host, port, service))
        parser = ResponseParser()
        while True:
            data = s.recv(65536)
            if not data:
                raise ProtocolError("connection closed before the OPTIONS response")
            for resp in parser.feed(data):
                return resp


def wait_ready(host: str, port: int, service: str, timeout: float,
               alive: Callable[[], bool] = lambda: True) -> Response:
    """Poll OPTIONS until the server answers 200 (or ``timeout``/``alive()`` says stop)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline and alive():
        try:
            resp = options(host, port, service, timeout=2.0)
            if resp.status == 200:
                return resp
            last = ProtocolError(f"OPTIONS answered {resp.status}")
        except (OSError, ProtocolError) as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"no OPTIONS 200 from {host}:{port}/{service}: {last}")


def stream_request(template: RequestTemplate, total: int, block: bytes,
                   seq: int = 1) -> Iterable[bytes | memoryview]:
    """Buffers of one request whose body is ``total`` bytes of repeated ``block``
    plus a token, produced lazily so the generator never holds the body."""
    yield template.head(seq)
    tok = token(999, seq)
    left = total - len(tok)
    mv = memoryview(block)
    while left > 0:
        n = min(left, len(block))
        yield b"%x\r\n" % n
        yield mv[:n]
        yield b"\r\n"
        left -= n
    yield b"%x\r\n" % len(tok) + tok + b"\r\n0\r\n\r\n"
