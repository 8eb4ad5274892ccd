"""Values from a peer made safe where they leave the gateway.

Every string a peer sent (a URL, a username, a header value) is hostile: it
may hold CR, LF or NUL (a header of the attacker's choosing when written into
an ICAP response), C1 controls or lone surrogates (a log line that cannot be
encoded is lost), or be megabytes long.  Where such a value leaves (ICAP
response headers, the access log, metric labels, the register) it goes
through one of these functions, so the rule is the same everywhere:

- URLs keep their meaning: every byte outside visible ASCII is
  percent-encoded (``%0D%0A``), which is what a URL may hold anyway.
- Other text: each control character (C0, DEL, C1), lone surrogate and
  Unicode line/paragraph separator becomes U+FFFD, the replacement
  character, so a reader sees that something was there.
- Everything is cut to a stated length; a cut value ends in ``...`` so no
  one mistakes it for the whole.

Each function is one pass of a character-class regex or ``str.translate``:
linear in its input.  Where a value must be refused rather than repaired
(client IPs and usernames in the register), see ``register.users``.
"""

from __future__ import annotations

import re

TRUNCATED = "..."  # what ends a value cut to its limit

# A URL contributes at most this many characters to an ICAP response header
# (X-Violations-Found).  Squid keeps ICAP reply headers in a 64 KiB buffer
# and the header repeats the URL once per rule named: 1 KiB keeps the host
# and the start of the path, all an admin needs to find the access-log line.
HEADER_URL_MAX = 1024

# At most this many rules are named in X-Infection-Found / X-Violations-Found:
# signature-base can match hundreds of rules on one file, and every one would
# add a URL to the header.  The access log and the block page name them all.
HEADER_RULES_MAX = 16

# A rule name ("namespace.rule") in a header: YARA identifiers are at most
# 128 characters, the namespace is a file name (255 at most on Linux).
HEADER_RULE_MAX = 384

# What may not appear in text that leaves: C0 controls, DEL, C1 controls,
# lone surrogates (cannot be encoded as UTF-8), U+2028/U+2029 (line breaks to
# many log viewers and to JavaScript).
_TEXT_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")
# Header values: visible ASCII and space only (latin-1 encodable, no CR/LF/NUL).
_HEADER_UNSAFE = re.compile(r"[^\x20-\x7e]")
REPLACEMENT = "\ufffd"


# URLs reach us decoded as Latin-1 (every byte one character): those
# characters are percent-encoded by one str.translate (C speed: a hostile
# URL of LFs costs no Python call per character).  Anything beyond Latin-1
# (a caller's own str) is encoded as UTF-8 first, by _percent.
_URL_ESCAPES = {c: f"%{c:02X}" for c in (*range(0x21), *range(0x7F, 0x100))}
_BEYOND_LATIN1 = re.compile(r"[^\x00-\xff]")
_URL_UNSAFE = re.compile(r"[^\x21-\x7e]")  # the usual URL has none: then nothing to do


def _percent(match: re.Match[str]) -> str:
    # surrogatepass: a lone surrogate (no wire URL has one, a caller's str
    # may) is escaped like any other code point instead of raising.
    return "".join(f"%{b:02X}" for b in match.group().encode("utf-8", "surrogatepass"))


def cut(value: str, limit: int) -> str:
    """``value`` cut to at most ``limit`` characters, marked when cut."""
    if len(value) <= limit:
        return value
    keep = max(0, limit - len(TRUNCATED))
    return value[:keep] + TRUNCATED[: limit - keep]


def url(value: str, limit: int) -> str:
    """A URL fit for a header or a log line: percent-encoded outside visible
    ASCII, at most ``limit`` characters (never ending inside a ``%XX``)."""
    # Only the first `limit` input characters can survive: encoding only
    # makes the text longer, so a megabyte URL costs `limit` work.
    head = value[: limit + 1]
    safe = head if _URL_UNSAFE.search(head) is None else _BEYOND_LATIN1.sub(_percent, head).translate(_URL_ESCAPES)
    if len(safe) <= limit and len(value) <= limit:
        return safe
    keep = max(0, limit - len(TRUNCATED))
    head = safe[:keep]
    pct = head.rfind("%", max(0, len(head) - 2))
    if pct >= 0:  # do not leave half an escape before the marker
        head = head[:pct]
    return head + TRUNCATED[: limit - keep]


def text(value: str, limit: int) -> str:
    """Text fit for a log line: control characters and lone surrogates
    replaced by U+FFFD, at most ``limit`` characters."""
    return cut(_TEXT_UNSAFE.sub(REPLACEMENT, value[: limit + 1]), limit)


def header_value(value: str, limit: int) -> str:
    """A value fit for an ICAP response header: visible ASCII and space only
    (anything else, CR, LF and NUL first, becomes ``?``), at most ``limit``
    characters.  For URLs use :func:`url` first, which keeps their meaning."""
    return cut(_HEADER_UNSAFE.sub("?", value[: limit + 1]), limit)


# What may not remain in a header value once its folds are taken out:
# anything but visible ASCII, space, tab and Latin-1 text.
_HEADER_UNSAFE_CHAR = re.compile(r"[^\t\x20-\x7e\xa0-\xff]")


def header_safe(value: str) -> bool:
    """Whether ``value`` can be written as an ICAP header value without
    starting a header of its own: the final check where headers are
    serialised (``ServerConnection.send_response``).  CRLF may only appear
    as a fold (followed by SP or HTAB, as X-Violations-Found uses)."""
    unfolded = value.replace("\r\n\t", "\t").replace("\r\n ", " ")
    return _HEADER_UNSAFE_CHAR.search(unfolded) is None


def has_control(value: str) -> bool:
    """Whether ``value`` holds a character :func:`text` would replace."""
    return _TEXT_UNSAFE.search(value) is not None


__all__ = [
    "HEADER_RULES_MAX",
    "HEADER_RULE_MAX",
    "HEADER_URL_MAX",
    "REPLACEMENT",
    "TRUNCATED",
    "cut",
    "has_control",
    "header_safe",
    "header_value",
    "text",
    "url",
]
