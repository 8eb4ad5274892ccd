"""The access log: one JSON line per ICAP transaction, through twisted.logger.

A :class:`AccessLog` turns a :class:`~gateway.interfaces.TransactionRecord`
into a flat dict and emits it as a twisted.logger event on its own publisher,
so access lines never mix with the diagnostic log (and vice versa).  The
destination observer (:class:`AccessLogFile`) writes each event as one JSON
line to a file or stdout; :meth:`AccessLogFile.reopen` (wired to SIGUSR1 by
:func:`install_sigusr1`) lets logrotate move the file away.

What is never written: Authorization, Proxy-Authorization, tenant keys (the
record does not carry them) and URL userinfo (``user:password@``), which
:func:`redact_url` strips whatever the redaction mode.  Every string field is
bounded and free of control characters (the URL percent-encoded outside
visible ASCII): see :func:`access_fields`.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from zope.interface import implementer

from gateway import sanitise
from gateway.interfaces import TransactionRecord
from monitoring.settings import UrlRedaction

log = Logger()

ACCESS_NAMESPACE = "icap_gateway.access"

# Created 0640: the log holds client IPs (and usernames when enabled).
FILE_MODE = 0o640


# scheme://host/path up to a "?" or "#", for an ASCII scheme starting with a letter.
_SCHEME_HOST_PATH = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*(?:/[^?#]*)?")


def redact_url(url: str, mode: UrlRedaction) -> str:
    """``url`` reduced per ``mode``; userinfo is removed in every mode.

    full: everything but userinfo; no-query: drops ?query and #fragment;
    host-only: scheme://host[:port]; none: "".  Handles absolute-form
    (``http://h/p``), authority-form (``h:443``, as CONNECT) and origin-form
    (``/p?q``).
    """
    if mode == "no-query" and "@" not in url:
        # The usual absolute-form URL, no userinfo: what _redact keeps of it
        # is this match (a test compares the two on odd URLs).
        simple = _SCHEME_HOST_PATH.match(url)
        if simple is not None:
            return simple.group()
    return _redact(url, mode)


def _redact(url: str, mode: UrlRedaction) -> str:
    """redact_url, every form of URL."""
    if mode == "none" or not url:
        return ""
    sep = url.find("://")
    if sep > 0 and url[:sep].replace("+", "").replace("-", "").replace(".", "").isalnum():
        prefix, rest = url[: sep + 3], url[sep + 3 :]
    elif url.startswith("/"):
        # origin-form: no authority, nothing of a host to keep
        if mode == "host-only":
            return ""
        return url if mode == "full" else _cut_query(url)
    else:
        prefix, rest = "", url  # authority-form
    # The authority ends at the first "/".  Userinfo is cut through the last
    # "@" before it, so a password holding "?", "#" or "@" cannot leak.
    slash = rest.find("/")
    head, tail = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    at = head.rfind("@")
    if at >= 0:
        head = head[at + 1 :]
    cut = _query_start(head)
    if cut >= 0:  # "http://host?q": a query with no path
        head, tail = head[:cut], head[cut:] + tail
    if mode == "host-only":
        return prefix + head
    if mode == "no-query":
        tail = _cut_query(tail)
    return prefix + head + tail


def _query_start(s: str) -> int:
    q, f = s.find("?"), s.find("#")
    if q < 0:
        return f
    if f < 0:
        return q
    return min(q, f)


def _cut_query(s: str) -> str:
    cut = _query_start(s)
    return s if cut < 0 else s[:cut]


# (second, its formatted prefix): most lines share a second.  One tuple,
# swapped whole, so a reader never pairs one second with another's text.
_last_second: tuple[int, str] = (-1, "")


# ".000Z" to ".999Z": a lookup is cheaper than formatting the number.
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def format_time(t: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-26T07:16:00.123Z."""
    global _last_second
    secs = int(t)
    ms = int((t - secs) * 1000)
    cached = _last_second
    if cached[0] != secs:
        cached = _last_second = (secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)))
    if 0 <= ms < 1000:
        return cached[1] + _MILLIS[ms]
    return f"{cached[1]}.{ms:03d}Z"  # before 1970: as it always was


# Caps on what one access line carries.  Every string field is the peer's
# text (or derived from it) and is also freed of control characters, lone
# surrogates (a line that cannot be encoded as UTF-8 would be lost) and
# U+2028/U+2029 (gateway.sanitise).
URL_MAX = 4096  # most servers refuse longer request lines (8 KiB); the start identifies the resource
FIELD_MAX = 256  # tenant, IPs, method, service, user (the register's username column: 255)
DETAIL_MAX = 512  # an error's text: enough for the reason, not for a dump
RULE_MAX = 384  # "namespace.rule": a file name (255) and a YARA identifier (128)
RULES_MAX = 64  # rules named per line; a last entry "+N more" says how many were left out


def _rules(rules: Any) -> list[str]:
    named = [sanitise.text(rule, RULE_MAX) for rule in list(rules)[:RULES_MAX]]
    if len(rules) > RULES_MAX:
        named.append(f"+{len(rules) - RULES_MAX} more")
    return named


def access_fields(record: TransactionRecord, *, users: bool, redaction: UrlRedaction) -> dict[str, Any]:
    """The JSON object of one access line.  Keys are stable: log parsers rely on them."""
    fields: dict[str, Any] = {
        "time": format_time(record.started),
        "tenant": sanitise.text(record.tenant, FIELD_MAX),
        "client_ip": sanitise.text(record.client_ip, FIELD_MAX),
        "peer": sanitise.text(record.peer, FIELD_MAX),
        "method": sanitise.text(record.method, FIELD_MAX),
        "service": sanitise.text(record.service, FIELD_MAX),
        "url": sanitise.url(redact_url(record.url, redaction), URL_MAX),
        "icap_status": record.icap_status,
        "http_status": record.http_status,
        "outcome": record.outcome,
        "rules": _rules(record.rules),
        "direction": record.direction,
        "bytes": record.body_bytes,
        "duration": round(record.duration, 6),
        "scan_duration": None if record.scan_duration is None else round(record.scan_duration, 6),
        "detail": sanitise.text(record.detail, DETAIL_MAX),
        "bad_headers": list(record.bad_headers),
        # Why the body was not scanned whole (gateway.interfaces.UNSCANNABLE_REASONS), or "".
        "unscannable": record.unscannable,
    }
    if users:
        fields["user"] = sanitise.text(record.user, FIELD_MAX)
    return fields


# --- the line, built from cached pieces --------------------------------------
#
# access_line() writes what _encode(access_fields(...)) writes, byte for byte
# (a test compares the two on hostile values), at a fraction of the cost: the
# values that repeat from line to line (tenant, IPs, method, service, user,
# outcome...) are sanitised and JSON-encoded once and kept in bounded dicts,
# numbers are formatted as the encoder would, and one f-string joins it all.

# Cached encodings of text values (sanitise.text at FIELD_MAX, then JSON).
# Only values up to FIELD_MAX are cached, so a key costs at most that much;
# the dict is emptied when full: a flood of distinct values (one user name
# per request) costs what it cost before, never unbounded memory.
TEXT_CACHE_SIZE = 4096
_text_json: dict[str, str] = {}
# Cached encodings of raw values written unsanitised (outcome, direction,
# unscannable: fixed sets in practice), and of details (sanitised at DETAIL_MAX).
_raw_json: dict[str | None, str] = {}
_detail_json: dict[str, str] = {"": '""'}
# What JSON would escape in a string (ensure_ascii=False): quote, backslash, C0.
_JSON_ESCAPED = re.compile(r'["\\\x00-\x1f]')


def _text_json_miss(value: str) -> str:
    encoded = _encode(sanitise.text(value, FIELD_MAX))
    if len(value) <= FIELD_MAX:
        if len(_text_json) >= TEXT_CACHE_SIZE:
            _text_json.clear()
        _text_json[value] = encoded
    return encoded


def _raw_json_miss(value: str | None) -> str:
    encoded = _encode(value)
    if value is None or len(value) <= FIELD_MAX:
        if len(_raw_json) >= TEXT_CACHE_SIZE:
            _raw_json.clear()
        _raw_json[value] = encoded
    return encoded


def _detail_json_miss(value: str) -> str:
    encoded = _encode(sanitise.text(value, DETAIL_MAX))
    if len(value) <= DETAIL_MAX:
        if len(_detail_json) >= TEXT_CACHE_SIZE:
            _detail_json.clear()
            _detail_json[""] = '""'
        _detail_json[value] = encoded
    return encoded


def _number_json(value: Any) -> str:
    """A number as the encoder writes it: repr for ints and finite floats."""
    kind = type(value)
    if kind is int or (kind is float and value - value == 0):  # not inf, not NaN
        return repr(value)
    return _encode(value)  # None, bool, inf, NaN, a subclass: the encoder's own spelling


def _seconds_json(value: float) -> str:
    """``round(value, 6)`` as the encoder writes it (repr of the float)."""
    if type(value) is float and 1e-4 <= value < 6e7:
        # round(v, 6) is float(f"{v:.6f}") (both correctly rounded), and in
        # this range that float's repr is the same digits, trailing zeros
        # dropped: floats there are far closer together than 1e-6 and repr
        # is positional from 1e-4 to 1e16.  A test compares the two.
        text = f"{value:.6f}".rstrip("0")
        return text + "0" if text[-1] == "." else text
    if type(value) is float and value - value == 0:  # not inf, not NaN
        return repr(round(value, 6))
    return _number_json(round(value, 6))


# In no-query mode, a URL with no "@" that this matches up to its end, a "?"
# or a "#" is its own redacted form (see redact_url), already what
# sanitise.url keeps (visible ASCII) and holds nothing JSON escapes.
_URL_PLAIN_CHARS = "".join(re.escape(chr(c)) for c in range(0x21, 0x7F) if chr(c) not in '"#/?@\\')
_PLAIN_URL = re.compile(f"[A-Za-z][A-Za-z0-9+.\\-]*://[{_URL_PLAIN_CHARS}]*(?:/[{_URL_PLAIN_CHARS}/]*)?")


def _url_json(url: str, redaction: UrlRedaction) -> str:
    if redaction == "no-query" and "@" not in url:
        plain = _PLAIN_URL.match(url)
        if plain is not None:
            end = plain.end()
            if end <= URL_MAX and (end == len(url) or url[end] in "?#"):
                return f'"{plain.group()}"'
    safe = sanitise.url(redact_url(url, redaction), URL_MAX)
    if _JSON_ESCAPED.search(safe) is None:
        return f'"{safe}"'
    return _encode(safe)


def access_line(record: TransactionRecord, *, users: bool, redaction: UrlRedaction) -> str:
    """The JSON text of one access line (no newline): the same text as
    ``_encode(access_fields(record, ...))``, built from cached pieces."""
    text = _text_json
    raw = _raw_json
    tenant = text.get(record.tenant) or _text_json_miss(record.tenant)
    client_ip = text.get(record.client_ip) or _text_json_miss(record.client_ip)
    peer = text.get(record.peer) or _text_json_miss(record.peer)
    method = text.get(record.method) or _text_json_miss(record.method)
    service = text.get(record.service) or _text_json_miss(record.service)
    outcome = raw.get(record.outcome) or _raw_json_miss(record.outcome)
    direction = raw.get(record.direction) or _raw_json_miss(record.direction)
    unscannable = raw.get(record.unscannable) or _raw_json_miss(record.unscannable)
    detail = _detail_json.get(record.detail) or _detail_json_miss(record.detail)
    rules = _encode(_rules(record.rules)) if record.rules else "[]"
    bad_headers = _encode(list(record.bad_headers)) if record.bad_headers else "[]"
    http_status = "null" if record.http_status is None else _number_json(record.http_status)
    scan = record.scan_duration
    scan_duration = "null" if scan is None else _seconds_json(scan)
    # format_time's text is digits, "-", ":", "T", "." and "Z": nothing to escape.
    line = (
        f'{{"time":"{format_time(record.started)}","tenant":{tenant},"client_ip":{client_ip},'
        f'"peer":{peer},"method":{method},"service":{service},"url":{_url_json(record.url, redaction)},'
        f'"icap_status":{_number_json(record.icap_status)},"http_status":{http_status},'
        f'"outcome":{outcome},"rules":{rules},"direction":{direction},'
        f'"bytes":{_number_json(record.body_bytes)},"duration":{_seconds_json(record.duration)},'
        f'"scan_duration":{scan_duration},"detail":{detail},"bad_headers":{bad_headers},'
        f'"unscannable":{unscannable}'
    )
    if users:
        user = text.get(record.user) or _text_json_miss(record.user)
        return f'{line},"user":{user}}}'
    return line + "}"


# The access log is written in batches: at most FLUSH_INTERVAL seconds or
# FLUSH_BYTES of lines wait in memory, whichever comes first, so a busy
# gateway makes one write() per batch instead of one per transaction.  A
# crash (SIGKILL, OOM) loses at most the lines of that interval; a clean
# stop, a reopen (SIGUSR1) and the service's stop flush them first.  Each
# write() holds whole lines only, so workers appending to one file with
# O_APPEND never interleave inside a line.
FLUSH_INTERVAL = 0.2
FLUSH_BYTES = 64 * 1024

# One encoder, built once: json.dumps with options builds a new one per call.
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


@implementer(ILogObserver)
class AccessLogFile:
    """Writes each access event as one JSON line.

    ``destination`` is "stdout" or a file path (appended to, created 0640).
    :meth:`reopen` closes the file and opens the path again: after logrotate
    renamed it, lines go to a fresh file.  With a ``clock`` (the reactor),
    lines are batched (FLUSH_INTERVAL, FLUSH_BYTES); without one each line
    is written at once.
    """

    def __init__(self, destination: str, *, stdout: IO[str] | None = None, clock: IReactorTime | None = None,
                 flush_interval: float = FLUSH_INTERVAL, flush_bytes: int = FLUSH_BYTES) -> None:
        self.destination = destination
        self._stdout = stdout
        self._file: IO[bytes] | IO[str] | None = None
        self._errors = 0
        self._clock = clock
        self._flush_interval = flush_interval
        self._flush_bytes = flush_bytes
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_call: IDelayedCall | None = None
        self.open()

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def open(self) -> None:
        """Open the destination; raises OSError when a file cannot be opened."""
        if self._file is not None:
            return
        if self.destination == "stdout":
            self._file = self._stdout or sys.stdout
        else:
            self._file = _open_append(self.destination)

    def reopen(self) -> None:
        """Open the path anew (after rotation).  On failure keep writing to
        the old file and say why: losing lines is worse than a big file."""
        if self.destination == "stdout":
            return
        try:
            new = _open_append(self.destination)
        except OSError as e:
            log.error("access log {path}: cannot reopen: {error}", path=self.destination, error=str(e))
            return
        self.flush()  # the lines so far belong to the old file
        old, self._file = self._file, new
        if old is not None:
            old.close()

    def close(self) -> None:
        self.flush()
        f, self._file = self._file, None
        if f is not None and self.destination != "stdout":
            f.close()

    def __call__(self, event: dict[str, Any]) -> None:
        fields = event.get("access")
        if fields is None or self._file is None:
            return
        try:
            text = _encode(fields)
        except (ValueError, TypeError) as e:
            self._failed(e)
            return
        self.write_line(text)

    def write_line(self, text: str) -> None:
        """Append one JSON line (``text``, without its newline) to the batch."""
        if self._file is None:
            return
        try:
            line = (text + "\n").encode("utf-8")
        except ValueError as e:  # a lone surrogate in a raw field: the line cannot be written
            self._failed(e)
            return
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._clock is None or self._pending_bytes >= self._flush_bytes:
            self.flush()
        elif self._flush_call is None:
            self._flush_call = self._clock.callLater(self._flush_interval, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_call = None
        self.flush()

    def flush(self) -> None:
        """Write the lines waiting in memory (one write)."""
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        f = self._file
        if f is None:
            return
        try:
            if isinstance(f, io.TextIOBase):
                f.write(data.decode("utf-8"))
                f.flush()
            else:
                view = memoryview(data)
                while view:  # a regular file takes it whole; a pipe may not
                    written = f.write(view)  # type: ignore[arg-type]
                    view = view[written or 0 :]
        except (OSError, ValueError) as e:
            self._failed(e)

    def _failed(self, e: Exception) -> None:
        # Disk full and the like: say so now and then, never break a request.
        self._errors += 1
        if self._errors == 1 or self._errors % 1000 == 0:
            log.error("access log {path}: write failed ({n} so far): {error}",
                      path=self.destination, n=self._errors, error=str(e))


def _open_append(path: str) -> IO[bytes]:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    # Unbuffered: AccessLogFile batches whole lines itself, one write() each batch.
    return os.fdopen(fd, "ab", buffering=0)


class AccessLog:
    """Turns transaction records into access events on a private publisher."""

    def __init__(
        self, observer: ILogObserver, *, users: bool = False, redaction: UrlRedaction = "no-query"
    ) -> None:
        self.publisher = LogPublisher(observer)
        self._log = Logger(namespace=ACCESS_NAMESPACE, observer=self.publisher)
        self.users = users
        self.redaction = redaction
        # The usual destination, an AccessLogFile alone, is handed the line
        # itself: the event dict, the publisher's loop and the field dict
        # cost more than the line.  Any other observer gets the event.
        self._write_line = observer.write_line if isinstance(observer, AccessLogFile) else None

    def write(self, record: TransactionRecord) -> None:
        write_line = self._write_line
        if write_line is not None:
            write_line(access_line(record, users=self.users, redaction=self.redaction))
            return
        # The event Logger.info("access", access=...) would emit, built
        # directly: Logger.emit's generality costs a third of a line.
        self.publisher({
            "log_logger": self._log, "log_level": LogLevel.info, "log_namespace": ACCESS_NAMESPACE,
            "log_source": None, "log_format": "access", "log_time": time.time(),
            "access": access_fields(record, users=self.users, redaction=self.redaction),
        })


def install_sigusr1(reactor: Any, reopen: Callable[[], None]) -> Callable[[], None]:
    """Reopen the access log on SIGUSR1 (logrotate's ``postrotate``).

    The signal handler only schedules the reopen on the reactor thread, so
    it never interrupts a half-written line.  Returns a function that
    restores the previous handler.
    """
    def handler(signum: int, frame: object) -> None:
        reactor.callFromThread(reopen)

    previous = signal.signal(signal.SIGUSR1, handler)

    def restore() -> None:
        signal.signal(signal.SIGUSR1, previous)

    return restore


__all__ = [
    "AccessLog",
    "AccessLogFile",
    "access_fields",
    "access_line",
    "format_time",
    "install_sigusr1",
    "redact_url",
]
