"""What ICAPS costs against plain ICAP: handshakes and transactions per second.

    .venv/bin/python -m benchmarks.tls_cost [--seconds 5] [--clients 4] [--size 1024] [--rounds 2]

One gateway process (one worker, the bundled rules, no keys) listens on a
plain ``tcp:`` and an ``ssl:`` port at once (a throw-away ECDSA P-256
certificate), so both rows of each pair are measured by the same server
within seconds.  Each pair runs ``--clients`` threads sending RESPMOD with a
clean body of ``--size`` bytes and ``Allow: 204``:

- persistent: every client keeps one connection (as Squid does);
- new connection per request: connect (and handshake), one request, close.

For each row: transactions per second, and the gateway's CPU milliseconds
per transaction (utime + stime from /proc, so the clients' own TLS work, on
the same machine, is not counted).  The handshake's cost to the gateway is
the difference of CPU per transaction between the two new-connection rows.
A last pair times a single client's connect (+ handshake) alone.  Bounded:
a few seconds per row.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.servers import free_port, gateway_config
from tests.tlscerts import issue, make_ca

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def respmod(port: int, body: bytes) -> bytes:
    req = b"GET http://example.com/f HTTP/1.1\r\nHost: example.com\r\n\r\n"
    res = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return (f"RESPMOD icap://{HOST}:{port}/respmod ICAP/1.0\r\nHost: {HOST}\r\nAllow: 204\r\n"
            f"Encapsulated: req-hdr=0, res-hdr={len(req)}, res-body={len(req) + len(res)}\r\n\r\n").encode() + \
        req + res + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


def read_answer(sock: socket.socket) -> None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before an answer")
        buffer += data
    if not buffer.startswith(b"ICAP/1.0 204"):
        raise ConnectionError(f"unexpected answer {buffer[:40]!r}")


class Client:
    def __init__(self, port: int, tls: ssl.SSLContext | None) -> None:
        self.port, self.tls = port, tls

    def connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.tls.wrap_socket(sock, server_hostname=HOST) if self.tls else sock


def run(client: Client, request: bytes, clients: int, seconds: float, persistent: bool,
        pid: int) -> tuple[float, float]:
    """(transactions per second, gateway CPU ms per transaction)."""
    counts = [0] * clients
    stop = threading.Event()

    def worker(index: int) -> None:
        sock = client.connect() if persistent else None
        while not stop.is_set():
            if not persistent:
                sock = client.connect()
            assert sock is not None
            sock.sendall(request)
            read_answer(sock)
            counts[index] += 1
            if not persistent:
                sock.close()
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    total = sum(counts)
    return total / elapsed, 1000 * cpu / max(total, 1)


def connect_latency(connect: Callable[[], socket.socket], count: int = 300) -> float:
    """Median ms of a connect (and handshake) alone, one client."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        sock = connect()
        times.append(time.perf_counter() - t0)
        sock.close()
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per row")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024, help="body bytes")
    parser.add_argument("--rounds", type=int, default=2,
                        help="each row this many times, interleaved; the best of each is shown (noise on a shared "
                        "machine only ever slows a row down)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    (workdir / "state").mkdir()
    ca = make_ca(workdir)
    cert = issue(ca, workdir, "gateway", server=True)
    plain_port, tls_port = free_port(), free_port()
    listen = [f"tcp:{plain_port}:interface={HOST}",
              f"ssl:{tls_port}:privateKey={cert.key}:certKey={cert.cert}:interface={HOST}"]
    config = gateway_config(workdir, {"server": {"listen": listen, "workers": 1},
                                      "scan": {"rules": str(REPO / "rules")}})
    log = open(workdir / "gateway.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection((HOST, tls_port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = (workdir / "gateway.log").read_text()[-2000:]
                    raise SystemExit(f"gateway did not start: {tail}") from None
                time.sleep(0.2)
        tls_context = ssl.create_default_context(cafile=str(ca.cert))
        plain, tls = Client(plain_port, None), Client(tls_port, tls_context)
        with tls.connect() as probe:
            negotiated = f"{probe.version()} {probe.cipher()[0]}"
        body = os.urandom(args.size)
        print(f"gateway pid {proc.pid}, {args.clients} clients, {args.seconds:.0f} s per row, "
              f"{args.size}-byte clean RESPMOD bodies; TLS: {negotiated}, ECDSA P-256 certificate")
        print(f"{'row':<34} {'tx/s':>9} {'gw CPU ms/tx':>13}")
        rows: dict[tuple[str, bool], tuple[float, float]] = {}
        for persistent in (True, False):
            for name in ("plain ICAP", "ICAPS"):
                rows[name, persistent] = (0.0, float("inf"))
            for _ in range(args.rounds):
                for name, client in (("plain ICAP", plain), ("ICAPS", tls)):
                    rate, cpu = run(client, respmod(client.port, body), args.clients, args.seconds, persistent,
                                    proc.pid)
                    best_rate, best_cpu = rows[name, persistent]
                    rows[name, persistent] = (max(rate, best_rate), min(cpu, best_cpu))
            for name in ("plain ICAP", "ICAPS"):
                rate, cpu = rows[name, persistent]
                label = f"{name}, {'persistent' if persistent else 'new connection each'}"
                print(f"{label:<34} {rate:>9.0f} {cpu:>13.3f}")
        for persistent in (True, False):
            (p_rate, p_cpu), (t_rate, t_cpu) = rows["plain ICAP", persistent], rows["ICAPS", persistent]
            print(f"ICAPS/plain, {'persistent' if persistent else 'new connection each'}: "
                  f"tx/s x{t_rate / p_rate:.2f}, gateway CPU per tx x{t_cpu / p_cpu:.2f}")
        handshake_cpu = rows["ICAPS", False][1] - rows["plain ICAP", False][1]
        print(f"handshake cost to the gateway: {handshake_cpu:.3f} ms CPU "
              "(CPU/tx, new-connection rows, ICAPS minus plain)")
        tcp_ms, tls_ms = connect_latency(plain.connect), connect_latency(tls.connect)
        print(f"connect latency alone (one client, median): TCP {tcp_ms:.3f} ms, "
              f"TCP+TLS handshake {tls_ms:.3f} ms (x{tls_ms / tcp_ms:.1f})")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


if __name__ == "__main__":
    main()
