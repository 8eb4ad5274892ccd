"""Who the end user is: the username and client IP Squid passes over ICAP.

Pure functions the protocol calls per request.  They read only the configured
user and client-IP headers; Authorization, Proxy-Authorization and keys are
never looked at here, so they cannot reach the register.

Both values are stored in the register, so both are the peer's text made
safe or refused, never stored raw:

- A client IP is parsed with ``ipaddress`` and stored in its canonical form
  (``2001:db8::1``; an IPv4-mapped ``::ffff:192.0.2.1`` as ``192.0.2.1``; an
  IPv6 zone such as ``%eth0`` dropped: it names an interface of the proxy's
  host, meaningless in the register).  Anything else (too long, a control
  character, not an address) is refused: the peer's address is used and the
  header is named in ``Identity.bad_headers``.
- A username that is too long, holds a control character or does not decode
  is refused the same way: no user is recorded for the request (repairing it
  would attribute the request to a user who does not exist).
"""

from __future__ import annotations

import binascii
import functools
import ipaddress
import re
from base64 import b64decode
from collections.abc import Mapping

from gateway.interfaces import BAD_CLIENT_IP, BAD_USER, Identity
from gateway.sanitise import has_control
from register.limits import USERNAME_MAX
from register.settings import AuthSettings

# The longest client-IP header value looked at: the longest textual IPv6
# address (45, with an embedded IPv4 part) plus "%" and a zone of at most 15
# characters (Linux IFNAMSIZ - 1) is 61.  Longer is refused unparsed.
CLIENT_IP_HEADER_MAX = 64
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")

# The longest X-Authenticated-User value decoded: base64 of USERNAME_MAX
# characters of up to 4 UTF-8 bytes each.  Longer is refused undecoded.
USER_HEADER_MAX = 4 * -(-USERNAME_MAX * 4 // 3)


def _clean_username(name: str) -> str | None:
    name = name.strip()
    if not name or len(name) > USERNAME_MAX:
        return None
    # Control characters mean a broken or hostile header, not a username.
    if has_control(name):
        return None
    return name


def decode_username(value: str | None, encoding: str) -> str | None:
    if value is None or len(value) > USER_HEADER_MAX:
        return None
    if encoding == "plain":
        return _clean_username(value)
    try:
        raw = b64decode(value.strip(), validate=True)
        return _clean_username(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def canonical_ip(value: str) -> str | None:
    """``value`` as a canonical IP address, or None if it is not one."""
    if len(value) <= _CANONICAL_CACHE_KEY_MAX:
        return _canonical_ip_cached(value)
    return _canonical_ip(value)


def _canonical_ip(value: str) -> str | None:
    value = value.strip()
    if len(value) > CLIENT_IP_HEADER_MAX or has_control(value):
        return None
    address, sep, zone = value.partition("%")
    if sep and not _ZONE.fullmatch(zone):
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


# Every request parses the proxy's address (twice: identity and credentials)
# and usually an X-Client-IP of one of its users: ipaddress takes microseconds
# for what is a handful of strings.  A pure function, so a bounded LRU; only
# values short enough to be an address (with some padding) are kept, so the
# cache holds at most _CANONICAL_CACHE_SIZE * _CANONICAL_CACHE_KEY_MAX characters.
_CANONICAL_CACHE_SIZE = 4096
_CANONICAL_CACHE_KEY_MAX = 2 * CLIENT_IP_HEADER_MAX
_canonical_ip_cached = functools.lru_cache(maxsize=_CANONICAL_CACHE_SIZE)(_canonical_ip)


def client_ip(value: str | None, peer_ip: str) -> str:
    """The client IP a header names, canonical; else the peer's address."""
    return (canonical_ip(value) if value else None) or peer_ip


def identify(headers: Mapping[str, str], peer_ip: str, settings: AuthSettings) -> Identity:
    """Username (or None) and client IP from lower-cased ICAP header names,
    and which of the two headers held a value that was refused."""
    bad: list[str] = []
    raw_user = headers.get(settings.user_header.lower())
    username = decode_username(raw_user, settings.user_encoding)
    if username is None and raw_user is not None and raw_user.strip():
        bad.append(BAD_USER)
    raw_ip = headers.get(settings.client_ip_header.lower())
    ip = canonical_ip(raw_ip) if raw_ip is not None and raw_ip.strip() else None
    if ip is None and raw_ip is not None and raw_ip.strip():
        bad.append(BAD_CLIENT_IP)
    # The peer too is stored canonical (a dual-stack listener sees ::ffff:a.b.c.d).
    return Identity(username, ip or canonical_ip(peer_ip) or peer_ip, tuple(bad))
