"""The straightforward parsers the fast ones replaced, kept as oracles for
differential tests (tests/icap/test_equivalence.py): a line at a time, one
check per call.  The fast versions must accept the same inputs, give the
same result and raise the same error for everything else."""

from __future__ import annotations

from itertools import pairwise

from gateway.icap import limits
from gateway.icap.connection import _ALLOWED_SECTIONS, METHODS, is_decimal
from gateway.icap.errors import LocalProtocolError, ProtocolError
from gateway.icap.headers import Headers, has_control, is_token, parse_header_lines
from gateway.icap.http import HTTPRequestHead, HTTPResponseHead, _check_url


def parse_encapsulated(value: str | None, method: str) -> list[tuple[str, int]]:
    if value is None:
        if method == "OPTIONS":
            return [("null-body", 0)]
        raise ProtocolError(400, "missing Encapsulated header")
    heads, bodies = _ALLOWED_SECTIONS[method]
    entries: list[tuple[str, int]] = []
    for item in value.split(","):
        name, sep, offset = item.strip().partition("=")
        name = name.strip().lower()
        offset = offset.strip()
        if not sep or not is_decimal(offset, 12):
            raise ProtocolError(400, f"malformed Encapsulated entry {item.strip()[:40]!r}")
        entries.append((name, int(offset)))
    *head_entries, (body_name, body_offset) = entries
    if body_name not in bodies:
        raise ProtocolError(400, f"Encapsulated must end with one of {', '.join(bodies)} for {method}")
    order = [heads.index(n) if n in heads else -1 for n, _ in head_entries]
    if -1 in order or order != sorted(set(order)):
        raise ProtocolError(400, f"Encapsulated sections not allowed or out of order for {method}")
    offsets = [o for _, o in entries]
    if offsets[0] != 0:
        raise ProtocolError(400, "Encapsulated offsets must start at 0")
    if any(b <= a for a, b in pairwise(offsets)):
        raise ProtocolError(400, "Encapsulated offsets must increase")
    if body_offset > limits.MAX_ENCAPSULATED_HEAD_SIZE:
        raise ProtocolError(
            400, f"encapsulated HTTP headers larger than {limits.MAX_ENCAPSULATED_HEAD_SIZE} bytes"
        )
    return entries


def parse_icap_head(head: bytes) -> tuple[str, str, Headers]:
    """An ICAP head (request line and header lines, no final empty line)."""
    lines = head.split(b"\r\n")
    line = lines[0]
    if has_control(line):
        raise ProtocolError(400, "control character (NUL, CR, LF...) in the ICAP request line")
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise ProtocolError(400, "malformed ICAP request line")
    try:
        method, uri, version = (p.decode("ascii") for p in parts)
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
    if not (uri.startswith("icap://") or uri.startswith("icaps://") or uri.startswith("/")):
        raise ProtocolError(400, "ICAP URI must be icap://host/service or icaps://host/service")
    return method, uri, parse_header_lines(lines[1:], limits.MAX_ICAP_HEADERS, "ICAP")


def _split_head(raw: bytes, what: str) -> tuple[bytes, list[bytes]]:
    if not raw.endswith(b"\r\n\r\n"):
        raise ProtocolError(400, f"encapsulated HTTP {what} head does not end with an empty line")
    lines = raw[:-4].split(b"\r\n")
    return lines[0], lines[1:]


def parse_request_head(raw: bytes) -> HTTPRequestHead:
    start, lines = _split_head(raw, "request")
    if has_control(start):
        raise ProtocolError(400, "control character (NUL, CR, LF...) in the encapsulated HTTP request line")
    parts = start.split(b" ")
    if len(parts) != 3 or not is_token(parts[0]) or not parts[1] or not parts[2].startswith(b"HTTP/"):
        raise ProtocolError(400, "malformed encapsulated HTTP request line")
    headers = parse_header_lines(lines, limits.MAX_HTTP_HEADERS, "HTTP")
    if len(headers.get_all("Host")) > 1:
        raise ProtocolError(400, "more than one Host header in the encapsulated HTTP request")
    head = HTTPRequestHead(
        method=parts[0].decode("latin-1"),
        target=parts[1].decode("latin-1"),
        version=parts[2].decode("latin-1"),
        headers=headers,
    )
    _check_url(head)
    return head


def parse_response_head(raw: bytes) -> HTTPResponseHead:
    start, lines = _split_head(raw, "response")
    if has_control(start):
        raise ProtocolError(400, "control character (NUL, CR, LF...) in the encapsulated HTTP status line")
    version, _, rest = start.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(400, "malformed encapsulated HTTP status line")
    headers = parse_header_lines(lines, limits.MAX_HTTP_HEADERS, "HTTP")
    return HTTPResponseHead(
        version=version.decode("latin-1"),
        status=int(code),
        reason=reason.decode("latin-1"),
        headers=headers,
    )


def response_fields(headers: list[tuple[str, str]]) -> bytes:
    """The response head's header lines, checked one field at a time."""
    out = []
    for name, value in headers:
        field = f"{name}: {value}\r\n".encode("latin-1")
        line = field[:-2].replace(b"\r\n\t", b"\t").replace(b"\r\n ", b" ")
        if has_control(line) or not is_token(name.encode("latin-1")):
            raise LocalProtocolError(f"unsafe response header {name[:40]!r}")
        out.append(field)
    return b"".join(out)
