"""One ICAP transaction, from its request head to its access-log record:
the body's spool, the first bytes kept for sniffing and trickling, the
early commit for Squid bug 5352, and the record it produces.  Sans-IO: it
returns the bytes to send and never touches a transport (as Twisted's
``_newclient`` keeps a request's state out of the protocol).

Its lifecycle is one state and one transition table::

    RECEIVING ──────────────► SCANNING ──────────► ANSWERED
        │  (early commit)                              ▲
        ▼                                              │
    TRICKLING ──────────────► SCANNING_COMMITTED ──────┘

Any state may go to ANSWERED (a refusal, a timeout, an internal error): the
record goes out exactly once, on that transition.  The spool is released
separately (``release``): an echo still reads it after the answer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from gateway.icap.connection import ServerConnection
from gateway.icap.events import Request
from gateway.icap.http import HTTPRequestHead, HTTPResponseHead, message_facts
from gateway.interfaces import (
    UNSCANNABLE_REASONS,
    Direction,
    Outcome,
    ScanContext,
    Tenant,
    TransactionRecord,
    Verdict,
)
from gateway.scanning.filetypes import SNIFF_BYTES, sniff
from gateway.scanning.filetypes import matches as type_matches

# At most this many body bytes trickle out before the verdict (see
# Transaction.spool_body): a few bytes of a blocked file, never a usable part of it.
TRICKLE_PREFIX = 4096


class Spool(Protocol):
    """Where a body waits while it is scanned (gateway.scanning.spool.BodySpool)."""

    size: int

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def scan_target(self) -> bytes | str: ...

    def iter_chunks(self, block: int = ..., start: int = ...) -> Iterator[bytes]: ...

    def close(self) -> None: ...


class State(enum.Enum):
    RECEIVING = "receiving"  # the body (if any) is arriving; nothing of ours is out
    TRICKLING = "trickling"  # our 200 head went out before the verdict; the body still arrives
    SCANNING = "scanning"  # the body is complete, the verdict awaited
    SCANNING_COMMITTED = "scanning-committed"  # the same, with our head out
    ANSWERED = "answered"  # the answer is decided and its record went out

    # Members are singletons compared by identity: hash them so too (Enum's
    # __hash__ hashes the name in Python, and the table is asked per step).
    __hash__ = object.__hash__


TRANSITIONS: dict[State, frozenset[State]] = {
    State.RECEIVING: frozenset({State.TRICKLING, State.SCANNING, State.ANSWERED}),
    State.TRICKLING: frozenset({State.SCANNING_COMMITTED, State.ANSWERED}),
    State.SCANNING: frozenset({State.ANSWERED}),
    State.SCANNING_COMMITTED: frozenset({State.ANSWERED}),
    State.ANSWERED: frozenset(),
}


class TransitionError(RuntimeError):
    """A transition the table does not allow: a bug, answered 500."""


@dataclass(slots=True)
class Transaction:
    request: Request
    started: float  # the reactor clock's seconds
    direction: Direction
    peer: str
    client_ip: str
    tenant: Tenant | None = None
    user: str | None = None
    http_request: HTTPRequestHead | None = None
    http_response: HTTPResponseHead | None = None
    spool: Spool | None = None
    body_bytes: int = 0
    prefix: bytearray = field(default_factory=bytearray)  # the body's first bytes
    trickled: int = 0  # body bytes sent before the verdict
    bad_headers: tuple[str, ...] = ()  # identity headers refused (see register.users)
    max_scan_size: int = 0  # the tenant's ([tenants.NAME], gateway.policy); 0: the scanner's
    state: State = State.RECEIVING
    # Our 200 head (the original HTTP head) went out before the verdict: the
    # state is TRICKLING or SCANNING_COMMITTED.  Kept by _to, as it is asked
    # several times per body piece.
    committed: bool = field(default=False, init=False)
    _url: str | None = field(default=None, init=False, repr=False)  # see url

    # --- state ------------------------------------------------------------

    def _to(self, new: State) -> None:
        if new not in TRANSITIONS[self.state]:
            raise TransitionError(f"transaction cannot go from {self.state.value} to {new.value}")
        self.state = new
        self.committed = new is State.TRICKLING or new is State.SCANNING_COMMITTED

    @property
    def answered(self) -> bool:
        return self.state is State.ANSWERED

    # --- the body -----------------------------------------------------------

    def take(self, data: bytes) -> None:
        """Count a piece of the body and keep the first TRICKLE_PREFIX bytes."""
        if len(self.prefix) < TRICKLE_PREFIX:
            self.prefix += data[: TRICKLE_PREFIX - len(self.prefix)]
        self.body_bytes += len(data)

    def spool_body(self, data: bytes, conn: ServerConnection, early_response_after: int,
                   headers: Callable[[], list[tuple[str, str]]]) -> bytes:
        """Spool a piece (already ``take``n) and return what goes out now:
        our 200 head once the body passes ``early_response_after`` (see
        ``_may_commit``), and then one byte of the body's start per piece
        received, which keeps Squid's store moving and so wakes its stalled
        origin read (bug 5352).  ``headers`` gives the answer's common headers."""
        assert self.spool is not None
        self.spool.write(data)
        out = b""
        if not self.committed and self.body_bytes >= early_response_after > 0 and self._may_commit(conn):
            self._to(State.TRICKLING)
            out = conn.send_response(200, headers(), res_hdr=self.request.res_hdr, body=True)
        if self.committed and self.trickled < len(self.prefix):
            out += conn.send_data(bytes(self.prefix[self.trickled : self.trickled + 1]))
            self.trickled += 1
        return out

    def _may_commit(self, conn: ServerConnection) -> bool:
        """Squid before 6.10 (bug 5352) stops reading the origin once its
        64 KiB virgin buffer fills and waits for the adapted response to
        start: without an early head, any response larger than that buffer
        would hang until our read timeout.  Only RESPMOD without Allow: 204
        (Squid buffers those bodies whole; REQMOD bodies flow), and never
        while the preview lasts (a client may announce one longer than
        early_response_after: a head sent inside it would leave no room for
        the 100 Continue).  A block after this point can only abort the
        response."""
        req = self.request
        if req.method != "RESPMOD" or req.res_hdr is None or req.allow_204:
            return False
        return not conn.in_preview

    def body_complete(self) -> None:
        """The body ended: the scan starts."""
        self._to(State.SCANNING_COMMITTED if self.committed else State.SCANNING)

    def skipped_type(self, skip_types: list[str]) -> str | None:
        """The body's type by magic bytes, when ``skip_types`` exempts it."""
        if not skip_types or not self.prefix:
            return None
        facts = message_facts(self.http_request, self.http_response)
        if facts.content_encoding not in ("", "identity"):
            return None  # the first bytes are compressed: their type says nothing
        kind = sniff(bytes(self.prefix[:SNIFF_BYTES]))
        return kind if type_matches(kind, skip_types) else None

    def scan_context(self) -> ScanContext:
        facts = message_facts(self.http_request, self.http_response)
        return ScanContext(
            direction=self.direction,
            url=facts.url,
            host=facts.host,
            filepath=facts.path,
            filename=facts.filename,
            extension=facts.extension,
            filetype=facts.mime_type,
            tenant=self.tenant.name if self.tenant else "",
            content_encoding=facts.content_encoding,
            max_scan_size=self.max_scan_size,
        )

    @property
    def url(self) -> str:
        # Asked by the late-block memory, the record, a block page: an
        # origin-form target rebuilds the URL from Host each time it is asked.
        url = self._url
        if url is None:
            if self.http_request is None:  # not parsed (yet): not kept
                return ""
            url = self._url = self.http_request.url
        return url

    def release(self) -> None:
        """Close the spool (idempotent): its file, if any, is deleted."""
        spool, self.spool = self.spool, None
        if spool is not None:
            spool.close()

    # --- the record -----------------------------------------------------------

    def answer(
        self, *, now: float, wall_time: float, icap_status: int, outcome: Outcome | None, detail: str,
        verdict: Verdict | None = None, http_status: int | None = None, reference: str = "",
    ) -> TransactionRecord | None:
        """Move to ANSWERED and return the transaction's record; None when it
        was answered already (the record goes out once)."""
        if self.state is State.ANSWERED:
            return None
        self._to(State.ANSWERED)
        if http_status is None and self.http_response is not None:
            http_status = self.http_response.status
        duration = now - self.started
        req = self.request
        return TransactionRecord(
            started=wall_time - duration,
            duration=duration,
            method=req.method,
            service=req.service,
            icap_status=icap_status,
            client_ip=self.client_ip,
            peer=self.peer,
            tenant=self.tenant.name if self.tenant else "",
            user=self.user or "",
            url=self.url,
            http_status=http_status,
            outcome=outcome,
            rules=tuple(verdict.rules) if verdict else (),
            direction=self.direction if req.method != "OPTIONS" else None,
            body_bytes=self.body_bytes,
            scan_duration=verdict.duration if verdict else None,
            detail=(reference and f"ref={reference} {detail}".strip()) or detail,
            bad_headers=self.bad_headers,
            unscannable=(verdict.reason if verdict else "") or (
                detail if outcome in ("unscanned", "monitored") and detail in UNSCANNABLE_REASONS else ""),
        )
