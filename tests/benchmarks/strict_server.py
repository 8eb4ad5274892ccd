"""A tiny, strict ICAP server for checking the load generator's requests.

It parses every request completely (head, Encapsulated offsets, chunked
body, preview and ieof), checks that the body length matches the
encapsulated Content-Length, records a digest of every (decoded) body so a
test can check that no two were alike, and answers as told: 204, a 200 echo
of the body, a block page (an HTTP 403 in an ICAP 200), or an error status.
"""

from __future__ import annotations

import hashlib
import socketserver
import threading
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO


class Malformed(Exception):
    pass


@dataclass
class Seen:
    requests: int = 0
    options: int = 0
    digests: list[bytes] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    previews: int = 0
    continues: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def read_head(f: BinaryIO) -> list[bytes] | None:
    lines: list[bytes] = []
    while True:
        line = f.readline(65536)
        if not line:
            if lines:
                raise Malformed("connection closed inside a head")
            return None
        if not line.endswith(b"\r\n"):
            raise Malformed(f"line without CRLF: {line[:60]!r}")
        if line == b"\r\n":
            return lines
        lines.append(line[:-2])


def read_chunks(f: BinaryIO) -> tuple[bytes, bool]:
    """Chunks up to the last one; returns the data and whether it said ieof."""
    out = bytearray()
    while True:
        size_line = f.readline(4096)
        if not size_line.endswith(b"\r\n"):
            raise Malformed(f"bad chunk size line {size_line!r}")
        size_text, _, ext = size_line[:-2].partition(b";")
        size = int(size_text, 16)
        if size == 0:
            if f.read(2) != b"\r\n":
                raise Malformed("no CRLF after the last chunk")
            return bytes(out), ext.strip() == b"ieof"
        data = f.read(size)
        if len(data) != size or f.read(2) != b"\r\n":
            raise Malformed("short chunk")
        out += data


def parse_request(f: BinaryIO, send_continue) -> tuple[dict[bytes, bytes], bytes, bytes] | None:
    """(ICAP headers, encapsulated HTTP heads, body) of one request, or None at EOF."""
    lines = read_head(f)
    if lines is None:
        return None
    method, _uri, version = lines[0].split(b" ")
    if version != b"ICAP/1.0":
        raise Malformed(f"bad version {version!r}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
    headers[b":method"] = method
    if method == b"OPTIONS":
        return headers, b"", b""
    enc = [e.strip().split(b"=") for e in headers[b"encapsulated"].split(b",")]
    body_name, body_at = enc[-1][0], int(enc[-1][1])
    http_heads = f.read(body_at)
    if len(http_heads) != body_at or not http_heads.endswith(b"\r\n\r\n"):
        raise Malformed("encapsulated heads do not match the Encapsulated offsets")
    if body_name == b"null-body":
        return headers, http_heads, b""
    body, ieof = read_chunks(f)
    if b"preview" in headers:
        if len(body) > int(headers[b"preview"]):
            raise Malformed("more preview data than the Preview header says")
        if not ieof:
            rest_wanted = send_continue()
            if not rest_wanted:
                return headers, http_heads, body
            more, ieof2 = read_chunks(f)
            if ieof2:
                raise Malformed("ieof after 100 Continue")
            body += more
    elif ieof:
        raise Malformed("ieof without preview")
    return headers, http_heads, body


class Handler(socketserver.StreamRequestHandler):
    server: StrictServer

    def handle(self) -> None:
        srv = self.server
        answered_early: list[bool] = []

        def send_continue() -> bool:
            with srv.seen.lock:
                srv.seen.previews += 1
            if srv.mode == "204-after-preview":
                answered_early.append(True)
                return False
            with srv.seen.lock:
                srv.seen.continues += 1
            self.wfile.write(b"ICAP/1.0 100 Continue\r\n\r\n")
            self.wfile.flush()
            return True

        while True:
            answered_early.clear()
            try:
                parsed = parse_request(self.rfile, send_continue)
            except (Malformed, ValueError, KeyError, IndexError) as e:
                with srv.seen.lock:
                    srv.seen.problems.append(str(e))
                return
            if parsed is None:
                return
            headers, http_heads, body = parsed
            if headers[b":method"] == b"OPTIONS":
                with srv.seen.lock:
                    srv.seen.options += 1
                self.wfile.write(b"ICAP/1.0 200 OK\r\nMethods: RESPMOD\r\nPreview: 1024\r\n"
                                 b"Allow: 204\r\nEncapsulated: null-body=0\r\n\r\n")
                self.wfile.flush()
                continue
            with srv.seen.lock:
                srv.methods.append(headers[b":method"])
                if b"authorization" in headers:
                    srv.authorizations.add(headers[b"authorization"])
            self.check(http_heads, body, complete=not answered_early)
            if srv.mode in ("204", "204-after-preview"):
                self.wfile.write(b"ICAP/1.0 204 No Content\r\nEncapsulated: null-body=0\r\n\r\n")
            elif srv.mode == "block":  # a block page: an HTTP 403 in an ICAP 200
                page = b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n\r\n"
                self.wfile.write(b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=%d\r\n\r\n"
                                 % len(page) + page + b"7\r\nblocked\r\n0\r\n\r\n")
            elif srv.mode == "echo":
                res_hdr = http_heads.split(b"\r\n\r\n", 1)[1] if http_heads.count(b"\r\n\r\n") > 1 \
                    else http_heads
                self.wfile.write(b"ICAP/1.0 200 OK\r\nEncapsulated: res-hdr=0, res-body=%d\r\n\r\n"
                                 % len(res_hdr) + res_hdr + b"%x\r\n" % len(body) + body
                                 + b"\r\n0\r\n\r\n")
            else:
                self.wfile.write(b"ICAP/1.0 %s Error\r\nEncapsulated: null-body=0\r\n\r\n"
                                 % srv.mode.encode())
            self.wfile.flush()

    def check(self, http_heads: bytes, body: bytes, complete: bool) -> None:
        seen = self.server.seen
        problems: list[str] = []
        length = None
        gz = False
        for line in http_heads.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
            if name.lower() == b"content-encoding" and value.strip() == b"gzip":
                gz = True
        if complete:
            if length is not None and length != len(body):
                problems.append(f"Content-Length {length} but body {len(body)}")
            if gz:
                try:
                    body = zlib.decompress(body, 31)
                except zlib.error as e:
                    problems.append(f"bad gzip: {e}")
        with seen.lock:
            seen.requests += 1
            if complete:
                seen.digests.append(hashlib.sha256(body).digest())
            seen.problems.extend(problems)


class StrictServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, mode: str = "204") -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode = mode
        self.seen = Seen()
        self.methods: list[bytes] = []  # the method of every request (OPTIONS aside)
        self.authorizations: set[bytes] = set()  # every Authorization header value seen
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def __enter__(self) -> StrictServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()
