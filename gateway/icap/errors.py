"""Protocol errors carry the ICAP status to answer with."""

from __future__ import annotations


class ProtocolError(Exception):
    """The peer broke ICAP/1.0 (or a limit).  ``status`` is the ICAP status
    code the server answers with before closing; ``reason`` is safe to log."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class LocalProtocolError(Exception):
    """Our own code used the connection wrongly (a bug, never the peer's fault)."""
