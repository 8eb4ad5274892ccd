"""The encapsulated HTTP layer over the ICAP core: parse and build HTTP heads.

The ICAP connection hands over raw header blocks (``Request.req_hdr`` and
``res_hdr``); this module turns them into request and response heads and
back.  Like the core it does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from gateway.icap import limits
from gateway.icap.errors import ProtocolError
from gateway.icap.headers import (
    Headers,
    has_control,
    has_control_between_lines,
    is_token,
    parse_header_block,
)


@dataclass(slots=True)
class HTTPRequestHead:
    method: str
    target: str  # as sent: absolute URL (proxy form) or origin-form path
    version: str
    headers: Headers
    # The URL's host and raw path, as urlsplit gives them, once _check_url
    # split it: message_facts then needs no second split.
    split: tuple[str, str] | None = field(default=None, compare=False, repr=False)

    @property
    def url(self) -> str:
        """The absolute URL, rebuilt from Host when the target is a path
        (origin-form).  Decided on the leading "/", not on "://" anywhere:
        ``/x?u=http://a`` is a path whose host is in Host, and taking it for
        an absolute URL left the host empty (host rules evaded)."""
        if self.method == "CONNECT" or not self.target.startswith("/"):
            return self.target
        host = self.headers.get("Host", "")
        return f"http://{host}{self.target}" if host else self.target


@dataclass(slots=True)
class HTTPResponseHead:
    version: str
    status: int
    reason: str
    headers: Headers


def _split_head(raw: bytes, what: str) -> tuple[bytes, bytes | None, bool]:
    """The start line, the header lines joined by CRLF (None: no header
    line), and whether the head is free of control bytes within its lines
    (one pass over it)."""
    if not raw.endswith(b"\r\n\r\n"):
        raise ProtocolError(400, f"encapsulated HTTP {what} head does not end with an empty line")
    head = raw[:-4]
    start, sep, header_block = head.partition(b"\r\n")
    return start, header_block if sep else None, not has_control_between_lines(head)


def _headers(header_block: bytes | None, clean: bool) -> Headers:
    if header_block is None:
        return Headers()
    return parse_header_block(header_block, limits.MAX_HTTP_HEADERS, "HTTP", clean=clean)


def parse_request_head(raw: bytes) -> HTTPRequestHead:
    """Parse an encapsulated request head.  Raises ProtocolError(400) for a
    malformed line or header, and for a URL that cannot be split into a host
    and port or is longer than ``limits.MAX_URL_LENGTH``."""
    start, header_block, clean = _split_head(raw, "request")
    if not clean and has_control(start):
        raise ProtocolError(400, "control character (NUL, CR, LF...) in the encapsulated HTTP request line")
    parts = start.split(b" ")
    if len(parts) != 3 or not is_token(parts[0]) or not parts[1] or not parts[2].startswith(b"HTTP/"):
        raise ProtocolError(400, "malformed encapsulated HTTP request line")
    headers = _headers(header_block, clean)
    if len(headers.get_all("Host")) > 1:
        # RFC 9112 section 3.2: more than one Host is answered 400; which
        # one a rule saw and which one the origin uses must not differ.
        raise ProtocolError(400, "more than one Host header in the encapsulated HTTP request")
    head = HTTPRequestHead(
        method=parts[0].decode("latin-1"),
        target=parts[1].decode("latin-1"),
        version=parts[2].decode("latin-1"),
        headers=headers,
    )
    _check_url(head)
    return head


def _check_url(head: HTTPRequestHead) -> None:
    """Refuse a URL the scanner's context cannot be built from: what
    ``urlsplit`` or its ``hostname``/``port`` would raise on later (``[::1``,
    a port of 99999) is a 400 now, not a dropped connection mid-scan."""
    url = head.url
    if len(url) > limits.MAX_URL_LENGTH:
        raise ProtocolError(400, f"encapsulated HTTP URL longer than {limits.MAX_URL_LENGTH} bytes")
    as_sent = url
    if head.method == "CONNECT" or "://" not in url:
        # authority-form ("host:443"), asterisk-form ("*") or a bare path
        # without Host: split it as a network location.
        url = url if url.startswith("/") or url == "*" else "//" + url
    try:
        parts = urlsplit(url)
        hostname = parts.hostname  # evaluated for the ValueError it raises
        parts.port  # noqa: B018
    except ValueError:
        raise ProtocolError(400, "malformed encapsulated HTTP URL") from None
    if url is as_sent:  # the split message_facts would make
        head.split = (hostname or "", parts.path)


def parse_response_head(raw: bytes) -> HTTPResponseHead:
    start, header_block, clean = _split_head(raw, "response")
    if not clean and has_control(start):
        raise ProtocolError(400, "control character (NUL, CR, LF...) in the encapsulated HTTP status line")
    version, _, rest = start.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/") or len(code) != 3 or not code.isdigit():
        raise ProtocolError(400, "malformed encapsulated HTTP status line")
    headers = _headers(header_block, clean)
    return HTTPResponseHead(
        version=version.decode("latin-1"),
        status=int(code),
        reason=reason.decode("latin-1"),
        headers=headers,
    )


def build_response_head(
    status: int, reason: str, headers: list[tuple[str, str]], version: str = "HTTP/1.1"
) -> bytes:
    lines = [f"{version} {status} {reason}\r\n"]
    lines.extend(f"{n}: {v}\r\n" for n, v in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


# RFC 8187 section 3.2.1: recipients must support these two charsets in an
# extended value; any other name falls back to UTF-8 (never a codec lookup
# of a peer's string: "rot13" or "hex" name codecs that are not charsets).
_EXT_CHARSETS = {"utf-8": "utf-8", "iso-8859-1": "latin-1"}


def content_disposition_filename(value: str | None) -> str | None:
    """The filename a Content-Disposition names (RFC 6266), ``filename*`` first.

    A single left-to-right pass over the parameters (no regex: a search
    for ``filename*=`` with no quote after it was quadratic)."""
    if not value:
        return None
    plain: str | None = None
    for name, param in _disposition_params(value):
        if name == "filename*":
            charset, quote1, rest = param.partition("'")
            _, quote2, encoded = rest.partition("'")
            if quote1 and quote2 and encoded.strip():
                encoding = _EXT_CHARSETS.get(charset.strip().lower(), "utf-8")
                return unquote(encoded.strip(), encoding=encoding, errors="replace")
        elif name == "filename" and plain is None:
            plain = param
    return plain


def _disposition_params(value: str) -> list[tuple[str, str]]:
    """``(lower-cased name, value)`` of each ``name=value`` parameter after
    the disposition type; quoted values unescaped.  Linear: every ``find``
    is bounded by the parameter it is in, or moves past what it scanned."""
    params: list[tuple[str, str]] = []
    n = len(value)
    pos = value.find(";")
    while 0 <= pos < n:
        pos += 1
        semi = value.find(";", pos)
        stop = n if semi < 0 else semi
        eq = value.find("=", pos, stop)
        if eq < 0:
            pos = semi
            continue
        name = value[pos:eq].strip(" \t").lower()
        start = eq + 1
        while start < n and value[start] in " \t":
            start += 1
        if start < n and value[start] == '"':
            param, pos = _quoted_string(value, start + 1)
            params.append((name, param))
            pos = value.find(";", pos)
        else:
            params.append((name, value[start:stop].strip(" \t")))
            pos = semi
    return params


def _quoted_string(value: str, start: int) -> tuple[str, int]:
    """The unescaped quoted-string starting after its opening quote, and
    the offset after its closing quote (the end for an unclosed one).  The
    closing quote is searched for again only after an escape passed it, so
    the whole is linear in the string however many backslashes it holds."""
    out: list[str] = []
    n = len(value)
    quote = value.find('"', start)
    pos = start
    while True:
        if quote < 0:
            quote = n
        slash = value.find("\\", pos, quote)
        if slash < 0:
            out.append(value[pos:quote])
            return "".join(out), min(quote + 1, n)
        out.append(value[pos:slash])
        out.append(value[slash + 1 : slash + 2])
        pos = slash + 2
        if pos > quote:
            quote = value.find('"', pos)


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What the scanner's externals want to know about an HTTP message."""

    url: str
    host: str
    path: str
    filename: str
    extension: str
    mime_type: str
    content_encoding: str


def message_facts(
    request: HTTPRequestHead | None, response: HTTPResponseHead | None
) -> MessageFacts:
    """URL, host, path and filename of the message whose body is scanned (the
    response's when there is one, else the request's)."""
    url = request.url if request else ""
    host = path = ""
    if request is not None and request.split is not None:
        host, path = request.split
        path = unquote(path)
    else:
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""
            path = unquote(parts.path)
        except ValueError:
            # parse_request_head refuses such URLs; a head built another way
            # still gets facts (an empty host) rather than an exception.
            pass
    body_headers = response.headers if response else (request.headers if request else Headers())
    filename = content_disposition_filename(body_headers.get("Content-Disposition"))
    if not filename:
        filename = path.rsplit("/", 1)[-1]
    base = filename.rsplit("/", 1)[-1]
    extension = base.rsplit(".", 1)[-1].lower() if "." in base else ""
    mime = (body_headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
    encoding = (body_headers.get("Content-Encoding") or "").strip().lower()
    return MessageFacts(
        url=url, host=host, path=path, filename=filename, extension=extension,
        mime_type=mime, content_encoding=encoding,
    )
