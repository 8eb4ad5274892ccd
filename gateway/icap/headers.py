"""Header fields as they arrived: ordered, case-insensitive lookup."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

from gateway.icap.errors import ProtocolError


class Headers:
    """An ordered list of (name, value) with case-insensitive access.

    Names and values are ``str`` decoded as Latin-1, so every byte survives a
    round trip unchanged (RFC 9110 treats field values as opaque octets).
    """

    __slots__ = ("_fields", "_index")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[tuple[str, str]] = list(fields)
        self._index: dict[str, list[str]] | None = None

    def _lookup(self) -> dict[str, list[str]]:
        if self._index is None:
            index: dict[str, list[str]] = {}
            for name, value in self._fields:
                index.setdefault(name.lower(), []).append(value)
            self._index = index
        return self._index

    def get(self, name: str, default: str | None = None) -> str | None:
        """The field's value; several fields of one name join with ", "."""
        values = self._lookup().get(name.lower())
        if not values:
            return default
        return values[0] if len(values) == 1 else ", ".join(values)

    def get_all(self, name: str) -> list[str]:
        return list(self._lookup().get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._fields == other._fields

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"

    def lowered(self) -> dict[str, str]:
        """A plain dict of lower-cased names to (joined) values."""
        return {name: ", ".join(values) for name, values in self._lookup().items()}

    def tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of a field, lower-cased (e.g. ``Allow: 204, trailers``)."""
        out: set[str] = set()
        for value in self._lookup().get(name.lower(), ()):  # most fields are absent: no list copy
            for token in value.split(","):
                token = token.strip()
                if token:
                    out.add(token.lower())
        return out

    def to_bytes(self) -> bytes:
        return b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in self._fields)


# RFC 9110 section 5.6.2: a field name is a token.  A strict name stops
# header injection and smuggling through odd names ("Transfer-Encoding :").
TOKEN_BYTES: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TOKEN_TABLE: Final = bytes(TOKEN_BYTES)

# RFC 9110 section 5.5: a field value is VCHAR, SP, HTAB and obs-text
# (0x80-0xFF).  NUL, bare CR and bare LF MUST be rejected (a downstream
# reader that splits on them would see a header we never saw); the other
# controls (0x01-0x1F but HTAB, and DEL) have no honest use either and are
# rejected with them.  Request and status lines obey the same rule.
CONTROL_BYTES: Final = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])

# Blanks around a value (OWS) that are not part of it.
_OWS: Final = b" \t"


def is_token(raw: bytes) -> bool:
    """True for a non-empty RFC 9110 token.  Linear: one translate pass."""
    return bool(raw) and not raw.translate(None, _TOKEN_TABLE)


def has_control(raw: bytes) -> bool:
    """True when ``raw`` holds a byte RFC 9110 forbids in a field value or a
    start line (see CONTROL_BYTES).  Linear: one translate pass."""
    return len(raw.translate(None, CONTROL_BYTES)) != len(raw)


def parse_header_block(block: bytes, max_count: int, what: str, *, clean: bool = False) -> Headers:
    """Parse header lines joined by CRLF (no final CRLF; at least one line:
    ``b""`` is one empty line, an error).  ``clean``: the caller already
    knows no line holds a control byte.

    The same fields and the same errors as ``parse_header_lines`` on
    ``block.split(b"\r\n")``, in fewer passes: one count of the control
    bytes of the whole block (a clean block has exactly the CRLFs that
    separate its lines), one decode, and one token check of all the names
    together.  Anything that check finds wrong is parsed again line by line
    for the precise error."""
    separators = block.count(b"\r\n")
    if separators >= max_count:
        raise ProtocolError(400, f"too many {what} header fields (limit {max_count})")
    if clean or len(block) - len(block.translate(None, CONTROL_BYTES)) == 2 * separators:
        fields: list[tuple[str, str]] = []
        names: list[str] = []
        for line in block.decode("latin-1").split("\r\n"):
            name, sep, value = line.partition(":")
            if not sep or not name:
                break
            names.append(name)
            fields.append((name, value.strip(" \t")))
        else:
            if not "".join(names).encode("latin-1").translate(None, _TOKEN_TABLE):
                return Headers(fields)
    return parse_header_lines(block.split(b"\r\n"), max_count, what)


def has_control_between_lines(block: bytes) -> bool:
    """True when a control byte (see CONTROL_BYTES) is in ``block`` other
    than the CRLFs that separate its lines.  One pass."""
    return len(block) - len(block.translate(None, CONTROL_BYTES)) != 2 * block.count(b"\r\n")


def parse_header_lines(lines: list[bytes], max_count: int, what: str) -> Headers:
    """Parse ``Name: value`` lines (no line endings).  Raises ProtocolError(400).

    No regular expression: a backtracking pattern on a value made of a long
    run of blanks took quadratic time.  Each line is partitioned on its first
    colon and stripped, so the cost is linear in the line."""
    if len(lines) > max_count:
        raise ProtocolError(400, f"too many {what} header fields (limit {max_count})")
    fields: list[tuple[str, str]] = []
    for raw in lines:
        name, sep, value = raw.partition(b":")
        if not sep or not is_token(name):
            raise ProtocolError(400, _field_error(raw, what))
        if has_control(value):
            raise ProtocolError(400, f"control character (NUL, CR, LF...) in {what} header {_shown(name)}")
        fields.append((name.decode("ascii"), value.strip(_OWS).decode("latin-1")))
    return Headers(fields)


def _shown(name: bytes) -> str:
    """A field name made safe to put in a log line or a reason."""
    return repr(name[:40].translate(None, CONTROL_BYTES).decode("latin-1"))


def _field_error(raw: bytes, what: str) -> str:
    if raw[:1] in (b" ", b"\t"):
        # obs-fold was deprecated by RFC 7230; accepting it invites
        # disagreement with the proxy about where a field ends.
        return f"folded {what} header line"
    name, sep, _ = raw.partition(b":")
    if not sep:
        return f"{what} header line without a colon"
    return f"invalid {what} header name {_shown(name)}"
