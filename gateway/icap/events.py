"""Events the sans-IO ICAP connection produces from the bytes it is fed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.icap.headers import Headers

BodyKind = Literal["req-body", "res-body", "opt-body", "null-body"]


@dataclass(slots=True)
class Request:
    """An ICAP request head with its encapsulated HTTP header blocks.

    ``req_hdr`` and ``res_hdr`` are the raw encapsulated HTTP heads (each ends
    with an empty line) or None; ``gateway.icap.http`` parses them.
    ``body`` says what follows: ``null-body`` means no body at all.
    """

    method: str
    uri: str
    service: str  # the URI's path without the leading "/" ("respmod")
    headers: Headers
    req_hdr: bytes | None
    res_hdr: bytes | None
    body: BodyKind
    preview: int | None  # the Preview header's size, None without preview
    allow_204: bool  # "Allow: 204" was sent
    keep_alive: bool  # False when the client sent "Connection: close"

    @property
    def has_body(self) -> bool:
        return self.body != "null-body"


@dataclass(slots=True)
class BodyData:
    """A piece of the encapsulated body, de-chunked.  Chunk boundaries are
    not preserved: a large chunk arrives as several pieces."""

    data: bytes


@dataclass(slots=True)
class PreviewEnd:
    """The preview ended without ``ieof``: more body exists.  The server now
    either calls ``send_continue()`` to get it or answers at once."""


@dataclass(slots=True)
class EndOfMessage:
    """The request is complete.  ``ieof`` is True when it ended inside the
    preview (the whole body fitted in it)."""

    ieof: bool = False


@dataclass(slots=True)
class ConnectionClosed:
    """The peer closed the connection cleanly between requests."""


Event = Request | BodyData | PreviewEnd | EndOfMessage | ConnectionClosed


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
"""More bytes are needed before the next event."""

PAUSED = _Sentinel("PAUSED")
"""The request is complete (or waits for 100 Continue) and the server must
answer before further bytes (a pipelined request) are parsed."""
