"""Column widths of the register, without SQLAlchemy.

``register.models`` sizes its columns with these; code that only checks a
value against them (``register.users``, imported by the gateway's
configuration and PROXY-header code) must not import the ORM for that: it
would load SQLAlchemy into the worker supervisor, which never opens the
register (about 20 MiB of its memory).
"""

from __future__ import annotations

TENANT_NAME_MAX = 63
USERNAME_MAX = 255
IP_MAX = 45  # the longest textual IPv6 address (with an embedded IPv4 part)
REASON_MAX = 32  # auth-failure reasons are short fixed words ("unknown-key")
SHA256_HEX = 64  # a certificate fingerprint: lower-case hex of the SHA-256 of its DER bytes
