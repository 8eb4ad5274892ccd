"""The load generator's ICAP wire format: request framing and a response parser.

Sans-IO and deliberately small: the generator must cost far less CPU than the
server it measures, so requests are framed once as lists of buffers (the body
itself is never copied: a unique token travels as its own chunk) and the parser
only does the work needed to find where a response ends and to validate it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
IEOF_CHUNK = b"0; ieof\r\n\r\n"


class ProtocolError(ValueError):
    """The server sent something that is not a well-formed ICAP response."""


def token(client: int, seq: int) -> bytes:
    """A fixed-width suffix that makes every body unique (no cache can answer)."""
    return b"\n#bench c%03d r%017d\n" % (client % 1000, seq % 10**17)


TOKEN_LEN = len(token(0, 0))  # fixed width: Content-Length is the same for every request


def chunk(data: bytes | memoryview) -> list[bytes | memoryview]:
    """One HTTP chunk as buffers, without copying ``data``."""
    return [b"%x\r\n" % len(data), data, CRLF] if len(data) else []


class BodyLike(Protocol):
    @property
    def length(self) -> int: ...
    @property
    def encoding(self) -> str | None: ...
    def segments(self, tok: bytes) -> list[memoryview]: ...


@dataclass(frozen=True)
class RequestTemplate:
    """What stays the same for every request of a scenario.

    The body's wire bytes are ``body.segments(token)``: a shared prefix and a
    small per-request tail, so every request scans different bytes.
    ``RESPMOD`` encapsulates a GET and the 200 response carrying the body (a
    download); ``REQMOD`` a POST carrying it (an upload).
    """

    host: str
    port: int
    service: str
    body: BodyLike
    preview: int | None = None  # None: no Preview header
    method: str = "RESPMOD"
    authorization: str | None = None  # the ICAP Authorization header's value, e.g. "Bearer KEY"

    @property
    def body_length(self) -> int:
        return self.body.length

    def _entity_lines(self) -> list[bytes]:
        lines = [
            b"Content-Type: " + getattr(self.body, "content_type", "application/octet-stream").encode(),
            b"Content-Length: %d" % self.body_length,
        ]
        if self.body.encoding:
            lines.append(b"Content-Encoding: " + self.body.encoding.encode())
        return lines

    @cached_property
    def _head_parts(self) -> tuple[bytes, bytes]:
        # the sequence number is fixed-width so the Encapsulated offsets are
        # constant: a request's head is then two slices and a number
        if self.method == "REQMOD":
            req_hdr = CRLF.join([b"POST /bench/%s HTTP/1.1" % (b"0" * 12), b"Host: bench.invalid",
                                 *self._entity_lines()]) + CRLF + CRLF
            encapsulated = b"req-hdr=0, req-body=%d" % len(req_hdr)
            http = req_hdr
        else:
            req_hdr = b"GET /bench/%s HTTP/1.1\r\nHost: bench.invalid\r\n\r\n" % (b"0" * 12)
            res_hdr = CRLF.join([b"HTTP/1.1 200 OK", *self._entity_lines()]) + CRLF + CRLF
            encapsulated = b"req-hdr=0, res-hdr=%d, res-body=%d" % (
                len(req_hdr), len(req_hdr) + len(res_hdr))
            http = req_hdr + res_hdr
        icap = [
            b"%s icap://%s:%d/%s ICAP/1.0" % (
                self.method.encode(), self.host.encode(), self.port, self.service.encode()),
            b"Host: %s:%d" % (self.host.encode(), self.port),
            b"Allow: 204",
        ]
        if self.authorization is not None:
            icap.append(b"Authorization: " + self.authorization.encode())
        if self.preview is not None:
            icap.append(b"Preview: %d" % self.preview)
        icap.append(b"Encapsulated: " + encapsulated)
        head = CRLF.join(icap) + CRLF + CRLF + http
        marker = b" /bench/"
        cut = head.index(marker) + len(marker)
        return head[:cut], head[cut + 12 :]

    def head(self, seq: int) -> bytes:
        """ICAP head plus the encapsulated HTTP request and response heads."""
        before, after = self._head_parts
        return before + b"%012d" % (seq % 10**12) + after

    def build(self, seq: int, tok: bytes) -> tuple[list[bytes | memoryview], list[bytes | memoryview]]:
        """Buffers to send first, and buffers to send after ``100 Continue``.

        Without preview everything is in the first list and the second is
        empty; with preview the first list ends with the preview's last chunk
        (``0; ieof`` when the whole body fit into it).
        """
        first: list[bytes | memoryview] = [self.head(seq)]
        segs = self.body.segments(tok)
        if self.preview is None:
            for s in segs:
                first += chunk(s)
            first.append(LAST_CHUNK)
            return first, []
        pre, rest = split_segments(segs, self.preview)
        for s in pre:
            first += chunk(s)
        if not rest:
            first.append(IEOF_CHUNK)
            return first, []
        first.append(LAST_CHUNK)
        after: list[bytes | memoryview] = []
        for s in rest:
            after += chunk(s)
        after.append(LAST_CHUNK)
        return first, after


def split_segments(
    segs: Sequence[memoryview], n: int
) -> tuple[list[memoryview], list[memoryview]]:
    """Split buffers after ``n`` bytes, without copying."""
    pre: list[memoryview] = []
    rest: list[memoryview] = []
    left = n
    for s in segs:
        if left >= len(s):
            pre.append(s)
            left -= len(s)
        elif left > 0:
            pre.append(s[:left])
            rest.append(s[left:])
            left = 0
        else:
            rest.append(s)
    return [p for p in pre if len(p)], [r for r in rest if len(r)]


def options_request(host: str, port: int, service: str) -> bytes:
    return (b"OPTIONS icap://%s:%d/%s ICAP/1.0\r\nHost: %s:%d\r\nEncapsulated: null-body=0\r\n\r\n"
            % (host.encode(), port, service.encode(), host.encode(), port))


class Response:
    """A parsed ICAP response head; headers are parsed only when asked for."""

    __slots__ = ("_headers", "body_bytes", "head", "http_status", "status")

    def __init__(self, status: int, head: bytes = b"", body_bytes: int = 0) -> None:
        self.status = status
        self.head = head
        self.body_bytes = body_bytes  # encapsulated body bytes received (echo/200 responses)
        # the status of an encapsulated HTTP response (403: a block page), else None
        self.http_status: int | None = None
        self._headers: dict[bytes, bytes] | None = None

    @property
    def headers(self) -> dict[bytes, bytes]:
        """Header names lower-cased; the last of repeated headers wins."""
        if self._headers is None:
            headers: dict[bytes, bytes] = {}
            for line in self.head.split(b"\r\n")[1:]:
                name, sep, value = line.partition(b":")
                if not sep:
                    raise ProtocolError(f"bad header line {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
            self._headers = headers
        return self._headers

    def __repr__(self) -> str:
        return f"Response(status={self.status}, body_bytes={self.body_bytes})"


class ResponseParser:
    """Incremental ICAP response parser: feed bytes, collect complete responses.

    Only the parts needed to delimit a response are parsed: the ICAP head,
    ``Encapsulated`` offsets, the encapsulated HTTP head (skipped by length)
    and the chunked body (sizes parsed, data counted, not kept).
    """

    __slots__ = ("_buf", "_cur", "_has_body", "_need", "_state")

    HEAD, ENC_HEAD, CHUNK_SIZE, CHUNK_DATA, TRAILER = range(5)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._cur: Response | None = None
        self._state = self.HEAD
        self._need = 0
        self._has_body = False

    def feed(self, data: bytes) -> Iterator[Response] | list[Response]:
        """Responses completed by ``data``, in order."""
        if self._state == self.HEAD and not self._buf:
            # the usual case: one recv() holds exactly one whole response
            resp = _whole_response(data)
            if resp is not None:
                return [resp]
        return self._feed(data)

    def _feed(self, data: bytes) -> Iterator[Response]:
        buf = self._buf
        buf += data
        while True:
            st = self._state
            if st == self.HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > 65536:
                        raise ProtocolError("ICAP head longer than 64 KiB")
                    return
                resp, skip, has_body = _parse_head(bytes(buf[:end]))
                del buf[: end + 4]
                if not has_body and not skip:
                    yield resp
                    continue
                self._cur = resp
                self._need = skip
                self._has_body = has_body
                self._state = self.ENC_HEAD
            elif st == self.ENC_HEAD:
                if len(buf) < self._need:
                    return
                assert self._cur is not None
                self._cur.http_status = http_status(bytes(buf[: min(self._need, 16)]))
                del buf[: self._need]
                if self._has_body:
                    self._state = self.CHUNK_SIZE
                else:  # encapsulated head(s) and null-body: complete now
                    assert self._cur is not None
                    resp, self._cur = self._cur, None
                    self._state = self.HEAD
                    yield resp
            elif st == self.CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise ProtocolError("chunk size line too long")
                    return
                line = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {line!r}") from None
                if size == 0:
                    self._state = self.TRAILER
                else:
                    self._need = size + 2
                    self._state = self.CHUNK_DATA
            elif st == self.CHUNK_DATA:
                take = min(self._need, len(buf))
                if take == 0:
                    return
                # count body bytes without keeping them; the CRLF after the data is not body
                assert self._cur is not None
                self._cur.body_bytes += max(0, min(take, self._need - 2))
                self._need -= take
                del buf[:take]
                if self._need == 0:
                    self._state = self.CHUNK_SIZE
            else:  # TRAILER: optional trailer lines end with an empty line
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    assert self._cur is not None
                    resp, self._cur = self._cur, None
                    self._state = self.HEAD
                    yield resp

    @property
    def idle(self) -> bool:
        """True between responses (nothing partial buffered)."""
        return self._state == self.HEAD and not self._buf


def _whole_response(data: bytes) -> Response | None:
    """``data`` parsed as exactly one complete response, else None (then the
    incremental parser takes over from the start: nothing is consumed here)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    try:
        resp, skip, has_body = _parse_head(data[:end])
    except ProtocolError:
        return None  # let the incremental parser raise it
    pos = end + 4 + skip
    if skip:
        resp.http_status = http_status(data[end + 4 : end + 4 + min(skip, 16)])
    if not has_body:
        return resp if pos == len(data) else None
    n = len(data)
    body = 0
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(data[pos:eol].split(b";", 1)[0], 16)
        except ValueError:
            return None
        pos = eol + 2
        if size == 0:
            break
        pos += size + 2
        if pos > n or data[pos - 2 : pos] != b"\r\n":
            return None
        body += size
    if data[pos:] != b"\r\n":  # no trailers, nothing after
        return None
    resp.body_bytes = body
    return resp


def http_status(enc_head: bytes) -> int | None:
    """The status code of an encapsulated HTTP response head's first bytes
    (``HTTP/1.1 403 ...``); None for a request head or anything else."""
    if not enc_head.startswith(b"HTTP/1.") or len(enc_head) < 12 or not enc_head[9:12].isdigit():
        return None
    return int(enc_head[9:12])


_ENCAPSULATED = re.compile(rb"\r\nencapsulated[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)


def _parse_head(head: bytes) -> tuple[Response, int, bool]:
    """The response, how many encapsulated-head bytes follow, whether a body follows.

    Only the status line and Encapsulated are read here: that is all it takes
    to find the end of the response, and it keeps the generator cheap.
    """
    eol = head.find(b"\r\n")
    first = head if eol < 0 else head[:eol]
    parts = first.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"ICAP/1."):
        raise ProtocolError(f"bad status line {first[:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise ProtocolError(f"bad status code {first[:80]!r}") from None
    resp = Response(status, head)
    m = _ENCAPSULATED.search(head)
    if status == 100 or m is None:
        return resp, 0, False
    enc = m.group(1)
    # the last entry of Encapsulated is the body (or null-body); its offset is
    # the length of the encapsulated HTTP heads before it
    name, _, off = enc.split(b",")[-1].strip().partition(b"=")
    try:
        offset = int(off)
    except ValueError:
        raise ProtocolError(f"bad Encapsulated header {enc!r}") from None
    name = name.strip().lower()
    if name in (b"req-body", b"res-body", b"opt-body"):
        return resp, offset, True
    if name == b"null-body":
        return resp, offset, False
    raise ProtocolError(f"Encapsulated does not end with a body entry: {enc!r}")
