"""Who the end user is: the username and client IP Squid passes over ICAP.

Pure functions the protocol calls per request.  They read only the configured
user and client-IP headers; Authorization, Proxy-Authorization and keys are
never looked at here, so they cannot reach the register.
"""

from __future__ import annotations

import binascii
import ipaddress
from base64 import b64decode
from collections.abc import Mapping

from register.models import USERNAME_MAX
from register.settings import AuthSettings


def _clean_username(name: str) -> str | None:
    name = name.strip()
    if not name or len(name) > USERNAME_MAX:
        return None
    # Control characters mean a broken or hostile header, not a username.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return None
    return name


def decode_username(value: str | None, encoding: str) -> str | None:
    if value is None:
        return None
    if encoding == "plain":
        return _clean_username(value)
    try:
        raw = b64decode(value.strip(), validate=True)
        return _clean_username(raw.decode("utf-8"))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None


def client_ip(value: str | None, peer_ip: str) -> str:
    if value:
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            pass
    return peer_ip


def identify(
    headers: Mapping[str, str], peer_ip: str, settings: AuthSettings
) -> tuple[str | None, str]:
    """(username or None, client IP) from lower-cased ICAP header names."""
    username = decode_username(headers.get(settings.user_header.lower()), settings.user_encoding)
    return username, client_ip(headers.get(settings.client_ip_header.lower()), peer_ip)
