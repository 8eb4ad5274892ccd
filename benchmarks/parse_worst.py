"""Worst-case parse times of the ICAP core and the HTTP layer, at fractions of
each limit, to show that time grows linearly with the input.

``python -m benchmarks.parse_worst`` prints, for every case, the time at
1/4, 1/2 and 1x of the limit it attacks, and the ratio between consecutive
sizes: about 2 when the size doubles means linear, about 4 quadratic.  Cases
that feed byte by byte use the same sizes (each byte one ``receive_data``
and ``next_event``, as a peer sending one byte per segment forces).

``--fractions 0.0625,0.125,0.25`` shrinks the sizes (to time a slow parser
within minutes); ``--only NAME`` runs some cases.  Not a test: it asserts
nothing and prints figures for a human (see docs/fuzzing.md).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from itertools import pairwise

from gateway.icap import limits
from gateway.icap.connection import ServerConnection, parse_encapsulated
from gateway.icap.errors import ProtocolError
from gateway.icap.events import NEED_DATA, PAUSED
from gateway.icap.http import content_disposition_filename, parse_request_head

Case = Callable[[int], Callable[[], object]]  # size in bytes -> the work to time


def _drive(data: bytes, *, bytewise: bool) -> None:
    conn = ServerConnection()
    pieces = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    try:
        for piece in pieces:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is NEED_DATA or event is PAUSED:
                    break
            conn.mid_request  # noqa: B018 - the protocol asks this after every read
    except ProtocolError:
        pass


def _space_run_head(size: int) -> bytes:
    """issue 8: a value that is a long run of blanks between two letters."""
    start = b"OPTIONS icap://h/respmod ICAP/1.0\r\nX: a"
    return start + b" " * (size - len(start) - 5) + b"a\r\n\r\n"


def _many_headers_head(size: int, count: int) -> bytes:
    start = b"OPTIONS icap://h/respmod ICAP/1.0\r\n"
    each = max(8, (size - len(start) - 2) // count)
    return start + b"".join(b"X-%03d: %s\r\n" % (i, b"v" * (each - 9)) for i in range(count)) + b"\r\n"


def _reqmod(req_hdr: bytes) -> bytes:
    head = (f"REQMOD icap://h/reqmod ICAP/1.0\r\nHost: h\r\nAllow: 204\r\n"
            f"Encapsulated: req-hdr=0, null-body={len(req_hdr)}\r\n\r\n").encode()
    return head + req_hdr


def _http_space_run(size: int) -> bytes:
    start = b"GET http://o.test/ HTTP/1.1\r\nHost: o.test\r\nX: a"
    return start + b" " * (size - len(start) - 5) + b"a\r\n\r\n"


def _chunk_lines(size: int) -> bytes:
    """A body of 1-byte chunks, each behind a chunk-size line at its limit."""
    line = b"1;" + b"e" * (limits.MAX_CHUNK_SIZE_LINE - 2) + b"\r\nx\r\n"
    req = b"GET http://o.test/ HTTP/1.1\r\nHost: o.test\r\n\r\n"
    head = (f"REQMOD icap://h/reqmod ICAP/1.0\r\nHost: h\r\nAllow: 204\r\n"
            f"Encapsulated: req-hdr=0, req-body={len(req)}\r\n\r\n").encode()
    return head + req + line * max(1, size // len(line)) + b"0\r\n\r\n"


def _with_trailer(size: int) -> bytes:
    """One small chunk, then a trailer line of ``size`` bytes."""
    return _chunk_lines(64)[:-2] + b"X: " + b"t" * (size - 8) + b"\r\n\r\n"


def _icap_header_count(size: int) -> bytes:
    count = max(1, limits.MAX_ICAP_HEADERS * size // limits.MAX_ICAP_HEAD_SIZE)
    return _many_headers_head(size, count)


CASES: dict[str, tuple[int, Case]] = {
    # name: (the limit the size is a fraction of, case)
    "icap-head-space-run": (
        limits.MAX_ICAP_HEAD_SIZE, lambda n: lambda: _drive(_space_run_head(n), bytewise=False)),
    "icap-head-space-run-bytewise": (
        limits.MAX_ICAP_HEAD_SIZE, lambda n: lambda: _drive(_space_run_head(n), bytewise=True)),
    "icap-head-max-headers-bytewise": (
        limits.MAX_ICAP_HEAD_SIZE,
        lambda n: lambda: _drive(_many_headers_head(n, limits.MAX_ICAP_HEADERS), bytewise=True)),
    "icap-header-count": (
        limits.MAX_ICAP_HEAD_SIZE,
        lambda n: lambda: _drive(_icap_header_count(n), bytewise=False)),
    "http-head-space-run": (
        limits.MAX_ENCAPSULATED_HEAD_SIZE, lambda n: lambda: parse_request_head(_http_space_run(n))),
    "encapsulated-heads-bytewise": (
        limits.MAX_ENCAPSULATED_HEAD_SIZE, lambda n: lambda: _drive(_reqmod(_http_space_run(n)), bytewise=True)),
    "http-header-count": (
        limits.MAX_ENCAPSULATED_HEAD_SIZE,
        lambda n: lambda: parse_request_head(
            b"GET / HTTP/1.1\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b" " * (n // limits.MAX_HTTP_HEADERS)) for i in range(
                limits.MAX_HTTP_HEADERS)) + b"\r\n")),
    "chunk-size-lines": (
        limits.MAX_ENCAPSULATED_HEAD_SIZE, lambda n: lambda: _drive(_chunk_lines(n), bytewise=False)),
    "chunk-size-lines-bytewise": (
        limits.MAX_ENCAPSULATED_HEAD_SIZE // 4, lambda n: lambda: _drive(_chunk_lines(n), bytewise=True)),
    "trailer-bytewise": (
        limits.MAX_TRAILER_SIZE, lambda n: lambda: _drive(_with_trailer(n), bytewise=True)),
    "content-disposition-filename-star": (
        limits.MAX_ENCAPSULATED_HEAD_SIZE,
        lambda n: lambda: content_disposition_filename("attachment" + "; filename*=" * (n // 12))),
    "content-disposition-quote-run": (
        limits.MAX_ENCAPSULATED_HEAD_SIZE,
        lambda n: lambda: content_disposition_filename('attachment; filename="' + "\\x" * (n // 2))),
    "content-disposition-semicolons": (
        limits.MAX_ENCAPSULATED_HEAD_SIZE, lambda n: lambda: content_disposition_filename("a" + ";" * n)),
    "encapsulated-value": (
        limits.MAX_ICAP_HEAD_SIZE,
        lambda n: lambda: _catch(lambda: parse_encapsulated(" req-hdr = 0 ," * (n // 14) + "null-body=1",
                                                            "REQMOD"))),
}


def _catch(work: Callable[[], object]) -> None:
    try:
        work()
    except ProtocolError:
        pass


def best_of(work: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.parse_worst", description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", default="0.25,0.5,1", help="sizes as fractions of each limit (default 0.25,0.5,1)")
    p.add_argument("--only", default="", help=f"comma-separated cases, from {','.join(CASES)}")
    p.add_argument("--repeat", type=int, default=3, help="runs per size; the best is printed (default 3)")
    args = p.parse_args(argv)
    fractions = [float(f) for f in args.fractions.split(",")]
    names = [n for n in args.only.split(",") if n] or list(CASES)
    print(f"{'case':36} " + " ".join(f"{'x' + format(f, 'g'):>18}" for f in fractions) + "   ratios")
    for name in names:
        limit, case = CASES[name]
        times: list[float] = []
        cells: list[str] = []
        for fraction in fractions:
            size = max(64, int(limit * fraction))
            t = best_of(case(size), args.repeat)
            times.append(t)
            cells.append(f"{size // 1024:>5} KiB {t * 1000:>8.1f} ms")
        ratios = " ".join(f"{b / a:4.1f}" if a > 0 else "  - " for a, b in pairwise(times))
        print(f"{name:36} " + " ".join(cells) + f"   {ratios}", flush=True)


if __name__ == "__main__":
    main()
