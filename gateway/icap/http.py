"""The encapsulated HTTP layer over the ICAP core: parse and build HTTP heads.

The ICAP connection hands over raw header blocks (``Request.req_hdr`` and
``res_hdr``); this module turns them into request and response heads and
back.  Like the core it does no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from gateway.icap import limits
from gateway.icap.errors import ProtocolError
from gateway.icap.headers import Headers, parse_header_lines


@dataclass(slots=True)
class HTTPRequestHead:
    method: str
    target: str  # as sent: absolute URL (proxy form) or origin-form path
    version: str
    headers: Headers

    @property
    def url(self) -> str:
        """The absolute URL, rebuilt from Host when the target is a path."""
        if "://" in self.target:
            return self.target
        host = self.headers.get("Host", "")
        if self.method == "CONNECT":
            return self.target
        return f"http://{host}{self.target}" if host else self.target


@dataclass(slots=True)
class HTTPResponseHead:
    version: str
    status: int
    reason: str
    headers: Headers


def _split_head(raw: bytes, what: str) -> tuple[bytes, list[bytes]]:
    if not raw.endswith(b"\r\n\r\n"):
        raise ProtocolError(400, f"encapsulated HTTP {what} head does not end with an empty line")
    lines = raw[:-4].split(b"\r\n")
    return lines[0], lines[1:]


def parse_request_head(raw: bytes) -> HTTPRequestHead:
    start, lines = _split_head(raw, "request")
    parts = start.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        raise ProtocolError(400, "malformed encapsulated HTTP request line")
    headers = parse_header_lines(lines, limits.MAX_HTTP_HEADERS, "HTTP")
    return HTTPRequestHead(
        method=parts[0].decode("latin-1"),
        target=parts[1].decode("latin-1"),
        version=parts[2].decode("latin-1"),
        headers=headers,
    )


def parse_response_head(raw: bytes) -> HTTPResponseHead:
    start, lines = _split_head(raw, "response")
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


def build_response_head(
    status: int, reason: str, headers: list[tuple[str, str]], version: str = "HTTP/1.1"
) -> bytes:
    lines = [f"{version} {status} {reason}\r\n"]
    lines.extend(f"{n}: {v}\r\n" for n, v in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


_FILENAME_STAR = re.compile(r"filename\*\s*=\s*([^']*)'[^']*'([^;]+)", re.IGNORECASE)
_FILENAME = re.compile(r'filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))', re.IGNORECASE)


def content_disposition_filename(value: str | None) -> str | None:
    """The filename a Content-Disposition names (RFC 6266), ``filename*`` first."""
    if not value:
        return None
    m = _FILENAME_STAR.search(value)
    if m:
        try:
            return unquote(m.group(2).strip(), encoding=m.group(1) or "utf-8", errors="replace")
        except LookupError:
            return unquote(m.group(2).strip())
    m = _FILENAME.search(value)
    if m:
        return (m.group(1) or m.group(2) or "").replace('\\"', '"')
    return None


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
    parts = urlsplit(url) if url else None
    host = (parts.hostname or "") if parts else ""
    path = unquote(parts.path) if parts else ""
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
