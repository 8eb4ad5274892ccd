"""The server side of an ICAP/1.0 connection (RFC 3507), sans I/O.

Bytes in (``receive_data``), events out (``next_event``), bytes back
(``send_*``), in the manner of h11's ``Connection``: no sockets, no Twisted,
no YARA.  The caller owns the transport and the policy; this class owns the
framing and the rules of the exchange:

* two state machines, the client's (what we read) and ours (what we write);
  a cycle ends when both are done, then the next (pipelined) request is read;
* a Preview ends in ``PreviewEnd`` unless ``ieof``; the server then calls
  ``send_continue()`` or answers at once (``can_send_204`` tells whether a
  204 is allowed: only with ``Allow: 204`` or in answer to a preview);
* an answer sent before the client finished its body (an early 403) makes the
  rest of that body be read and dropped, so the connection stays in frame;
* every violation raises ``ProtocolError`` carrying the status to answer with;
  after it the connection only lets ``send_error`` be called, then closes.
"""

from __future__ import annotations

import string
from collections import deque
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Final

from gateway.icap import limits
from gateway.icap.errors import LocalProtocolError, ProtocolError
from gateway.icap.events import (
    NEED_DATA,
    PAUSED,
    BodyData,
    BodyKind,
    ConnectionClosed,
    EndOfMessage,
    Event,
    PreviewEnd,
    Request,
    _Sentinel,
)
from gateway.icap.headers import (
    _TOKEN_TABLE,
    CONTROL_BYTES,
    Headers,
    has_control,
    has_control_between_lines,
    is_token,
    parse_header_block,
)

METHODS: Final = frozenset({"OPTIONS", "REQMOD", "RESPMOD"})

REASONS: Final[dict[int, str]] = {
    100: "Continue",
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "ICAP Service Not Found",
    405: "Method Not Allowed For Service",
    408: "Request Timeout",
    500: "Server Error",
    501: "Method Not Implemented",
    503: "Service Overloaded",
    505: "ICAP Version Not Supported",
}

# Which encapsulated sections each method may carry, in the order they must
# appear (RFC 3507 section 4.4.1).
_ALLOWED_SECTIONS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "REQMOD": (("req-hdr",), ("req-body", "null-body")),
    "RESPMOD": (("req-hdr", "res-hdr"), ("res-body", "null-body")),
    "OPTIONS": ((), ("opt-body", "null-body")),
}
_HEXDIGITS: Final = frozenset(string.hexdigits.encode())

# Client states
IDLE: Final = "IDLE"  # waiting for a request head
CHUNK_SIZE: Final = "CHUNK_SIZE"
CHUNK_DATA: Final = "CHUNK_DATA"
CHUNK_CRLF: Final = "CHUNK_CRLF"
TRAILER: Final = "TRAILER"
PREVIEW_WAIT: Final = "PREVIEW_WAIT"  # preview over, waiting for our 100 or answer
DONE: Final = "DONE"
CLOSED: Final = "CLOSED"
ERROR: Final = "ERROR"
# Our states
SEND_RESPONSE: Final = "SEND_RESPONSE"  # a request arrived; we may answer
SEND_BODY: Final = "SEND_BODY"
MUST_CLOSE: Final = "MUST_CLOSE"


_ASCII_DIGITS: Final = frozenset("0123456789")


def is_decimal(value: str, max_digits: int) -> bool:
    """1 to ``max_digits`` ASCII digits.  Not ``str.isdigit``: it accepts
    "\xb2" (superscript two), on which ``int()`` then raises ValueError."""
    return 0 < len(value) <= max_digits and _ASCII_DIGITS.issuperset(value)


def parse_encapsulated(value: str | None, method: str) -> list[tuple[str, int]]:
    """Parse and check an ``Encapsulated`` header for ``method``."""
    if value is None:
        if method == "OPTIONS":
            return [("null-body", 0)]
        raise ProtocolError(400, "missing Encapsulated header")
    heads, bodies = _ALLOWED_SECTIONS[method]
    entries: list[tuple[str, int]] = []
    for item in value.split(","):
        name, sep, offset = item.partition("=")
        offset = offset.strip()
        # isascii() first: str.isdigit() alone accepts "\xb2" (see is_decimal).
        if not sep or not 0 < len(offset) <= 12 or not offset.isascii() or not offset.isdigit():
            raise ProtocolError(400, f"malformed Encapsulated entry {item.strip()[:40]!r}")
        entries.append((name.strip().lower(), int(offset)))
    body_name, body_offset = entries[-1]
    if body_name not in bodies:
        raise ProtocolError(400, f"Encapsulated must end with one of {', '.join(bodies)} for {method}")
    last = -1  # the head sections must be allowed ones, each once, in their order
    for name, _ in entries[:-1]:
        index = heads.index(name) if name in heads else -1
        if index <= last:
            raise ProtocolError(400, f"Encapsulated sections not allowed or out of order for {method}")
        last = index
    if entries[0][1] != 0:
        raise ProtocolError(400, "Encapsulated offsets must start at 0")
    previous = -1
    for _, offset_value in entries:
        if offset_value <= previous:
            raise ProtocolError(400, "Encapsulated offsets must increase")
        previous = offset_value
    if body_offset > limits.MAX_ENCAPSULATED_HEAD_SIZE:
        raise ProtocolError(
            400, f"encapsulated HTTP headers larger than {limits.MAX_ENCAPSULATED_HEAD_SIZE} bytes"
        )
    return entries


class _Memo:
    """Results of a pure parse of a short value a proxy repeats on every
    request (its request line, the same per service): a dict of at
    most ``MEMO_ENTRIES`` keys of at most ``MEMO_KEY_MAX`` characters,
    emptied when full, so a peer varying them costs a parse each, as without
    it, and holds at most entries * key size.  Only successes are kept: a
    value in error is parsed (and refused) every time."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[object, Any] = {}

    def get(self, key: object) -> Any:
        return self._values.get(key)

    def put(self, key: object, value: Any) -> None:
        values = self._values
        if len(values) >= limits.MEMO_ENTRIES:
            values.clear()
        values[key] = value


_request_lines = _Memo()  # request line -> (method, uri, service)


def service_of(uri: str) -> str:
    """``icap://host:1344/respmod?x=1`` -> ``respmod``; ``icaps://...`` and ``/respmod`` too."""
    rest = uri
    if "://" in rest:
        rest = rest.split("://", 1)[1]
        slash = rest.find("/")
        rest = rest[slash:] if slash >= 0 else "/"
    return rest.split("?", 1)[0].strip("/")


def _safe_fields(headers: list[tuple[str, str]]) -> bytes:
    """``Name: value`` lines for a response head.  The last guard against
    response-header injection: whatever built a value, it cannot start a
    header of its own (a CRLF is allowed only as a fold, which
    X-Violations-Found uses), and a name is a token.

    All the fields are checked together: with every name a token (so no
    field starts with a blank and no fold can span two fields), unfolded
    they hold exactly one CRLF each and no other control byte.  Otherwise
    they are checked one by one, which names the unsafe one."""
    fields = "".join([f"{name}: {value}\r\n" for name, value in headers]).encode("latin-1")
    names = "".join([name for name, _ in headers]).encode("latin-1")
    unfolded = fields.replace(b"\r\n\t", b"\t").replace(b"\r\n ", b" ")
    if (all(name for name, _ in headers) and not names.translate(None, _TOKEN_TABLE)
            and len(unfolded) - len(unfolded.translate(None, CONTROL_BYTES)) == 2 * len(headers)):
        return fields
    for name, value in headers:
        field = f"{name}: {value}\r\n".encode("latin-1")
        line = field[:-2].replace(b"\r\n\t", b"\t").replace(b"\r\n ", b" ")
        if has_control(line) or not is_token(name.encode("latin-1")):
            raise LocalProtocolError(f"unsafe response header {name[:40]!r}")
    raise LocalProtocolError("unsafe response headers")  # pragma: no cover - the loop names one


@dataclass(slots=True)
class _PendingHead:
    """An ICAP request head parsed, its encapsulated blocks not yet all in."""

    method: str
    uri: str
    service: str
    headers: Headers
    entries: tuple[tuple[str, int], ...]
    head_len: int  # request line, headers and the empty line


class ServerConnection:
    """One ICAP connection seen from the server."""

    def __init__(self) -> None:
        self._buf = bytearray()
        # The last bytes object received, held as it came while ``_buf`` is
        # empty, and how much of it was consumed: body data is handed on as
        # that object (or one slice of it), not copied into ``_buf`` and out
        # again.  Invariant: while ``_raw`` is set, ``_buf`` is empty (any
        # other state than CHUNK_DATA first moves it into ``_buf``).
        self._raw: bytes | None = None
        self._raw_pos = 0
        self._eof = False
        self._events: deque[Event] = deque()
        self.their_state: str = IDLE
        self.our_state: str = IDLE
        self.request: Request | None = None
        self._chunk_left = 0
        self._in_preview = False
        self._preview_left = 0
        self._ieof = False
        self._ended_in_preview = False
        self._trailer_size = 0
        self._options_body = 0  # opt-body bytes announced so far (limits.MAX_OPTIONS_BODY)
        self._close_after = False
        # Where the next search for a line end starts: bytes before it were
        # already searched, so feeding a head byte by byte costs O(n) in
        # all, not O(n**2).  Reset whenever the front of _buf is consumed.
        self._scanned = 0
        # A request head already parsed while its encapsulated HTTP header
        # blocks are still arriving, so it is parsed once, not per read.
        self._pending: _PendingHead | None = None
        self.requests_seen = 0  # completed cycles, for tests and logs

    # --- input -------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; ``b""`` means the peer closed."""
        if data:
            if self._eof:
                raise LocalProtocolError("data received after end of file")
            if self._raw is not None:
                self._absorb_raw()
            if not self._buf and type(data) is bytes:  # immutable: safe to hold
                self._raw = data
                self._raw_pos = 0
            else:
                self._buf += data
        else:
            self._eof = True

    def _absorb_raw(self) -> None:
        """Move the held bytes object's unconsumed rest into ``_buf``."""
        raw, pos = self._raw, self._raw_pos
        assert raw is not None
        self._raw = None
        self._buf += memoryview(raw)[pos:] if pos else raw

    @property
    def has_buffered_input(self) -> bool:
        return bool(self._buf) or self._raw is not None

    @property
    def buffered_bytes(self) -> int:
        """Input received but not yet turned into events (pipelined requests)."""
        raw = self._raw
        return len(self._buf) + (len(raw) - self._raw_pos if raw is not None else 0)

    @property
    def mid_request(self) -> bool:
        """A request has started arriving but is not complete: a read stall
        now is a timeout (408), not an idle keep-alive connection."""
        if self.their_state == IDLE:
            if self._raw is not None:
                self._absorb_raw()
            return not self._idle_input_is_blank()
        return self.their_state in (CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER)

    def next_event(self) -> Event | _Sentinel:
        """The next event, ``NEED_DATA`` or ``PAUSED``.  Raises ProtocolError."""
        if self.their_state == ERROR:
            raise LocalProtocolError("next_event after a protocol error")
        try:
            while True:
                if self._events:
                    return self._events.popleft()
                state = self.their_state
                if self._raw is not None and state != CHUNK_DATA:
                    self._absorb_raw()
                if state == IDLE:
                    if not self._read_head():
                        return self._need_data()
                elif state in (DONE, PREVIEW_WAIT, CLOSED):
                    return PAUSED
                elif state == CHUNK_DATA:
                    if not self._read_chunk_data():
                        return self._need_data()
                elif state == CHUNK_SIZE:
                    if self._read_whole_chunks():
                        continue
                    if not self._read_chunk_size():
                        return self._need_data()
                elif state == CHUNK_CRLF:
                    if len(self._buf) < 2:
                        return self._need_data()
                    if self._buf[:2] != b"\r\n":
                        raise ProtocolError(400, "chunk data not followed by CRLF")
                    self._consume(2)
                    self.their_state = CHUNK_SIZE
                elif state == TRAILER:
                    if not self._read_trailer():
                        return self._need_data()
                else:  # pragma: no cover - all states handled above
                    raise LocalProtocolError(f"unknown state {state}")
        except ProtocolError:
            self.their_state = ERROR
            raise

    def _need_data(self) -> _Sentinel:
        if not self._eof:
            return NEED_DATA
        if self.their_state == IDLE and self._idle_input_is_blank():
            self.their_state = CLOSED
            self._consume(len(self._buf))
            return ConnectionClosed()  # type: ignore[return-value]
        raise ProtocolError(400, "connection closed in the middle of a request")

    def _idle_input_is_blank(self) -> bool:
        """Only blank-line bytes wait in IDLE.  ``_read_head`` drops the
        blank lines before a request line, so blank input left over is at
        most a lone CR or LF: checking two bytes replaces copying the
        buffer (``strip``) on every read."""
        buf = self._buf
        return len(buf) <= 2 and not buf.strip(b"\r\n")

    def _find_line_end(self, terminator: bytes, limit: int) -> int:
        """The offset of ``terminator`` in the buffer, or -1.  The search
        resumes where the last one stopped and looks at most ``limit`` bytes
        plus the terminator, so each byte is searched a bounded number of
        times however the input is split."""
        start = max(0, self._scanned - len(terminator) + 1)
        end = self._buf.find(terminator, start, limit + len(terminator))
        self._scanned = len(self._buf) if end < 0 else 0
        return end

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._scanned = 0

    def _read_head(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        pending = self._pending
        if pending is None:
            # RFC 9112 section 2.2: ignore empty lines before a request line.
            while buf[:2] == b"\r\n":
                self._consume(2)
            end = self._find_line_end(b"\r\n\r\n", limits.MAX_ICAP_HEAD_SIZE)
            if end < 0:
                if len(buf) > limits.MAX_ICAP_HEAD_SIZE:
                    raise ProtocolError(400, f"ICAP head larger than {limits.MAX_ICAP_HEAD_SIZE} bytes")
                return False
            head = bytes(memoryview(buf)[:end])
            # One pass over the head for control bytes; a head with one is
            # parsed line by line, which finds and names it.
            clean = not has_control_between_lines(head)
            request_line, sep, header_block = head.partition(b"\r\n")
            parsed = _request_lines.get(request_line) if clean else None
            if parsed is None:
                method, uri = self._parse_request_line(request_line, clean=clean)
                parsed = (method, uri, service_of(uri))
                if clean and len(request_line) <= limits.MEMO_KEY_MAX:
                    _request_lines.put(request_line, parsed)
            method, uri, service = parsed
            headers = (parse_header_block(header_block, limits.MAX_ICAP_HEADERS, "ICAP", clean=clean)
                       if sep else Headers())
            # Not remembered like the request line: its offsets follow the
            # sizes of each message's HTTP heads, which vary.
            entries = tuple(parse_encapsulated(headers.get("Encapsulated"), method))
            pending = self._pending = _PendingHead(method, uri, service, headers, entries, end + 4)
        method, uri, service, headers, entries, head_len = (
            pending.method, pending.uri, pending.service, pending.headers, pending.entries, pending.head_len)
        body_name, body_offset = entries[-1]
        if len(buf) < head_len + body_offset:
            return False  # wait for the encapsulated header blocks
        self._pending = None
        sections: dict[str, bytes] = {}
        with memoryview(buf) as view:  # released even on an error: the buffer must stay resizable
            for (name, start), (_, stop) in pairwise(entries):
                block = bytes(view[head_len + start : head_len + stop])
                if not block.endswith(b"\r\n\r\n"):
                    raise ProtocolError(400, f"encapsulated {name} does not end with an empty line")
                sections[name] = block
        self._consume(head_len + body_offset)

        preview: int | None = None
        preview_value = headers.get("Preview")
        if preview_value is not None:
            preview_value = preview_value.strip()
            if not is_decimal(preview_value, 12):
                raise ProtocolError(400, "Preview must be a number of bytes")
            preview = int(preview_value)
        body: BodyKind = body_name  # type: ignore[assignment]
        keep_alive = "close" not in headers.tokens("Connection")
        self.request = Request(
            method=method,
            uri=uri,
            service=service,
            headers=headers,
            req_hdr=sections.get("req-hdr"),
            res_hdr=sections.get("res-hdr"),
            body=body,
            preview=preview if body != "null-body" else None,
            allow_204="204" in headers.tokens("Allow"),
            keep_alive=keep_alive,
        )
        self._close_after = not keep_alive
        self.our_state = SEND_RESPONSE
        self._ended_in_preview = False
        self._events.append(self.request)
        if body == "null-body":
            self.their_state = DONE
            self._events.append(EndOfMessage())
        else:
            self._in_preview = preview is not None
            self._preview_left = preview or 0
            self._options_body = 0
            self.their_state = CHUNK_SIZE
        return True

    @staticmethod
    def _parse_request_line(line: bytes, *, clean: bool = False) -> tuple[str, str]:
        """``clean``: the caller found no control byte in it already."""
        if not clean and has_control(line):
            raise ProtocolError(400, "control character (NUL, CR, LF...) in the ICAP request line")
        parts = line.split(b" ")
        if len(parts) != 3 or not all(parts):
            raise ProtocolError(400, "malformed ICAP request line")
        try:
            method, uri, version = line.decode("ascii").split(" ")
        except UnicodeDecodeError:
            raise ProtocolError(400, "non-ASCII ICAP request line") from None
        if version != "ICAP/1.0":
            if version.startswith("ICAP/"):
                raise ProtocolError(505, f"unsupported version {version[:16]}")
            raise ProtocolError(400, "not an ICAP request")
        if method not in METHODS:
            if not method.isalpha() or not method.isupper():
                raise ProtocolError(400, "malformed ICAP method")
            raise ProtocolError(501, f"method {method[:16]} not implemented")
        # Squid writes icaps:// for a service it reaches over TLS.
        if not (uri.startswith("icap://") or uri.startswith("icaps://") or uri.startswith("/")):
            raise ProtocolError(400, "ICAP URI must be icap://host/service or icaps://host/service")
        return method, uri

    def _read_whole_chunks(self) -> bool:
        """CHUNK_SIZE, the usual case, in one step: a chunk whose size line
        is bare hex and whose data and CRLF are all buffered, or the body's
        end when its last chunk is a bare "0" with no trailer.  Whatever
        else comes (an extension, blanks, a chunk still arriving, a trailer,
        a malformed line) is left to the step-per-state path, which handles
        it and names its error: the same events and errors in fewer steps.
        One chunk per call, as that path: the caller may answer after any
        BodyData, and then what follows of the body is dropped (and past
        events are not queued ahead of input the pipelining bound counts).
        Not in a preview, an OPTIONS body or a body being dropped (their own
        rules).  False: nothing was taken."""
        request = self.request
        if self._in_preview or self._discarding or request is None or request.method == "OPTIONS":
            return False
        buf = self._buf
        # At most 16 hex digits (the slow path's limit), then CRLF.
        line_end = buf.find(b"\r\n", 0, 18)
        if line_end <= 0:
            return False
        digits = buf[:line_end]
        if not _HEXDIGITS.issuperset(digits):
            return False
        size = int(digits, 16)
        if size == 0:
            if buf[line_end : line_end + 4] != b"\r\n\r\n":
                return False
            self._consume(line_end + 4)
            self._ieof = False
            self._trailer_size = 0
            self._end_of_body()
            return True
        start = line_end + 2
        stop = start + size
        if stop + 2 > len(buf) or buf[stop : stop + 2] != b"\r\n":
            return False
        with memoryview(buf) as view:  # released before the buffer is consumed (resized)
            data = view[start:stop].tobytes()
        self._consume(stop + 2)
        self._events.append(BodyData(data))
        return True

    def _read_chunk_size(self) -> bool:
        buf = self._buf
        end = self._find_line_end(b"\r\n", limits.MAX_CHUNK_SIZE_LINE)
        if end < 0:
            if len(buf) > limits.MAX_CHUNK_SIZE_LINE:
                raise ProtocolError(400, f"chunk-size line longer than {limits.MAX_CHUNK_SIZE_LINE} bytes")
            return False
        line = bytes(buf[:end])
        self._consume(end + 2)
        size_part, _, extensions = line.partition(b";")
        size_part = size_part.strip(b" \t")
        if not size_part or len(size_part) > 16 or not _HEXDIGITS.issuperset(size_part):
            raise ProtocolError(400, "malformed chunk size")
        size = int(size_part, 16)
        if size > limits.MAX_CHUNK_SIZE:
            raise ProtocolError(400, "chunk size too large")
        if size == 0:
            self._ieof = any(ext.strip(b" \t").lower() == b"ieof" for ext in extensions.split(b";"))
            self._trailer_size = 0
            self.their_state = TRAILER
            return True
        if self._in_preview:
            if size > self._preview_left:
                raise ProtocolError(400, "preview body longer than the Preview header says")
            self._preview_left -= size
        if self.request is not None and self.request.method == "OPTIONS":
            self._options_body += size
            if self._options_body > limits.MAX_OPTIONS_BODY:
                raise ProtocolError(400, f"OPTIONS body larger than {limits.MAX_OPTIONS_BODY} bytes")
        self._chunk_left = size
        self.their_state = CHUNK_DATA
        return True

    def _read_chunk_data(self) -> bool:
        raw = self._raw
        discarding = self._discarding
        if raw is not None:
            # The common case, a read inside a large chunk: the bytes object
            # Twisted read is the event's data, uncopied.
            pos = self._raw_pos
            n = min(self._chunk_left, len(raw) - pos)
            if discarding:
                data = b""
            elif pos == 0 and n == len(raw):
                data = raw
            else:
                data = raw[pos : pos + n]
            pos += n
            if pos == len(raw):
                self._raw = None
            else:
                self._raw_pos = pos
        else:
            buf = self._buf
            if not buf:
                return False
            n = min(self._chunk_left, len(buf))
            if discarding:
                data = b""
            elif n < len(buf):
                with memoryview(buf) as view:  # one copy, not a bytearray slice and then bytes
                    data = view[:n].tobytes()
            else:
                data = bytes(buf)
            self._consume(n)
        self._chunk_left -= n
        if self._chunk_left == 0:
            self.their_state = CHUNK_CRLF
        if not discarding:
            self._events.append(BodyData(data))
        return True

    def _read_trailer(self) -> bool:
        buf = self._buf
        while True:
            end = self._find_line_end(b"\r\n", limits.MAX_TRAILER_SIZE)
            if end < 0:
                if self._trailer_size + len(buf) > limits.MAX_TRAILER_SIZE:
                    raise ProtocolError(400, "chunked trailer too large")
                return False
            self._consume(end + 2)
            if end == 0:
                break
            self._trailer_size += end + 2
            if self._trailer_size > limits.MAX_TRAILER_SIZE:
                raise ProtocolError(400, "chunked trailer too large")
        self._end_of_body()
        return True

    def _end_of_body(self) -> None:
        if self._in_preview and not self._ieof and self.our_state not in (DONE, MUST_CLOSE):
            self._in_preview = False
            self.their_state = PREVIEW_WAIT
            self._events.append(PreviewEnd())
            return
        ieof = self._in_preview and self._ieof
        self._ended_in_preview = ieof
        self._in_preview = False
        self.their_state = DONE
        if not self._discarding:
            self._events.append(EndOfMessage(ieof=ieof))
        self._maybe_next_cycle()

    @property
    def _discarding(self) -> bool:
        # We already answered: what the client still sends of this request is
        # read only to stay in frame.
        return self.our_state in (DONE, MUST_CLOSE)

    @property
    def in_preview(self) -> bool:
        """The preview is arriving or awaits our 100 Continue: an answer may
        not start yet unless it is final (a 100 must be possible)."""
        return self._in_preview or self.their_state == PREVIEW_WAIT

    @property
    def draining_body(self) -> bool:
        """We answered before the request's body ended: what still arrives of
        it is read and dropped (the caller bounds how long that may take)."""
        return self._discarding and self.their_state in (CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILER)

    # --- output ------------------------------------------------------------

    @property
    def can_send_204(self) -> bool:
        """RFC 3507 section 4.6: 204 only with ``Allow: 204`` or in answer to a
        preview (before 100 Continue, or after a preview ending in ieof)."""
        req = self.request
        if req is None:
            return False
        return req.allow_204 or self.their_state == PREVIEW_WAIT or self._ended_in_preview

    @property
    def keep_alive(self) -> bool:
        return not self._close_after

    def close_after_response(self) -> None:
        """The response under way (or about to start) is the connection's last:
        it carries ``Connection: close`` if its head is not out yet, and the
        connection closes once both sides are done (graceful shutdown)."""
        self._close_after = True

    def send_continue(self) -> bytes:
        if self.their_state != PREVIEW_WAIT or self.our_state != SEND_RESPONSE:
            raise LocalProtocolError("100 Continue only after a preview, before the answer")
        self.their_state = CHUNK_SIZE
        return b"ICAP/1.0 100 Continue\r\n\r\n"

    def send_response(
        self,
        status: int,
        headers: list[tuple[str, str]],
        *,
        req_hdr: bytes | None = None,
        res_hdr: bytes | None = None,
        body: bool = False,
        close: bool = False,
    ) -> bytes:
        """The response head, with the Encapsulated header computed from the
        HTTP heads given.  With ``body=True`` follow with ``send_data`` and
        ``send_end``."""
        if self.our_state != SEND_RESPONSE:
            raise LocalProtocolError(f"cannot send a response in state {self.our_state}")
        if status == 204 and not self.can_send_204:
            raise LocalProtocolError("204 not allowed: no Allow: 204 and not in a preview")
        if body and req_hdr is None and res_hdr is None:
            raise LocalProtocolError("a body needs an encapsulated HTTP head")
        if close:
            self._close_after = True
        out = [f"ICAP/1.0 {status} {REASONS.get(status, 'Unknown')}\r\n".encode()]
        if headers:
            out.append(_safe_fields(headers))
        if self._close_after:
            out.append(b"Connection: close\r\n")
        entries = []
        offset = 0
        for name, block in (("req-hdr", req_hdr), ("res-hdr", res_hdr)):
            if block is not None:
                entries.append(f"{name}={offset}")
                offset += len(block)
        if body:
            entries.append(f"{'res-body' if res_hdr is not None else 'req-body'}={offset}")
        else:
            entries.append(f"null-body={offset}")
        out.append(f"Encapsulated: {', '.join(entries)}\r\n\r\n".encode())
        if req_hdr is not None:
            out.append(req_hdr)
        if res_hdr is not None:
            out.append(res_hdr)
        if body:
            self.our_state = SEND_BODY
        else:
            self._our_done()
        return b"".join(out)

    def send_data(self, data: bytes) -> bytes:
        """One chunk of the response body (empty data gives nothing)."""
        if self.our_state != SEND_BODY:
            raise LocalProtocolError("send_data without a response body under way")
        if not data:
            return b""
        return b"%x\r\n%s\r\n" % (len(data), data)

    def send_end(self) -> bytes:
        if self.our_state != SEND_BODY:
            raise LocalProtocolError("send_end without a response body under way")
        self._our_done()
        return b"0\r\n\r\n"

    def send_error(self, status: int, headers: list[tuple[str, str]] = ()) -> bytes:  # type: ignore[assignment]
        """Answer a ProtocolError: the status, ``Connection: close``, no body.
        Returns b"" when a response is already under way (just close then)."""
        if self.our_state not in (IDLE, SEND_RESPONSE):
            self.our_state = MUST_CLOSE
            return b""
        self.our_state = SEND_RESPONSE
        self._close_after = True
        out = self.send_response(status, list(headers), close=True)
        self.their_state = ERROR
        self.our_state = MUST_CLOSE
        return out

    def _our_done(self) -> None:
        self.our_state = DONE
        if self.their_state == PREVIEW_WAIT:
            # We answered the preview: the client sends nothing more.
            self.their_state = DONE
        self._maybe_next_cycle()

    def _maybe_next_cycle(self) -> None:
        if self.our_state != DONE or self.their_state != DONE:
            return
        self.requests_seen += 1
        if self._close_after:
            self.our_state = MUST_CLOSE
            self.their_state = CLOSED
            return
        self.our_state = IDLE
        self.their_state = IDLE
        self.request = None
        self._in_preview = False
        self._ieof = False
        self._ended_in_preview = False
