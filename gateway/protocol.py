"""The Twisted side of ICAP: shuttle bytes between the transport and the
sans-IO core, and hand each transaction to the policy objects.

The protocol decides nothing itself: who may use the gateway is the
``Authenticator``'s call, what a body holds the ``Scanner``'s, what is kept
the ``Recorder``'s, what is shown the ``Observer``'s.  They are handed in at
construction through ``GatewayContext``, as Twisted's SMTP asks for an
``IMessageDelivery``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import interfaces
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway import sanitise
from gateway.blockpage import BlockPage, new_reference
from gateway.connections import ConnectionCount, LocalConnectionCount
from gateway.filetypes import SNIFF_BYTES, sniff
from gateway.filetypes import matches as type_matches
from gateway.icap.connection import ServerConnection
from gateway.icap.errors import ProtocolError
from gateway.icap.events import (
    NEED_DATA,
    PAUSED,
    BodyData,
    ConnectionClosed,
    EndOfMessage,
    PreviewEnd,
    Request,
)
from gateway.icap.http import (
    HTTPRequestHead,
    HTTPResponseHead,
    message_facts,
    parse_request_head,
    parse_response_head,
)
from gateway.interfaces import (
    UNSCANNABLE_REASONS,
    Authenticated,
    Authenticator,
    Credentials,
    Direction,
    Identity,
    Observer,
    Recorder,
    Refused,
    ScanContext,
    Scanner,
    Tenant,
    TransactionRecord,
    UserSeen,
    Verdict,
)
from gateway.tls import client_certificate_sha256

log = Logger()

# The two services and the method each one adapts.
SERVICES: dict[str, str] = {"reqmod": "REQMOD", "respmod": "RESPMOD"}

# Echoed bodies are read back from the spool in blocks of this size: large
# enough to keep syscalls few, small enough that memory stays flat.
ECHO_BLOCK_SIZE = 64 * 1024

# At most this many body bytes trickle out before the verdict (see
# _maybe_commit): a few bytes of a blocked file, never a usable part of it.
TRICKLE_PREFIX = 4096

# What the connection's read/idle timer guards (see _arm_timer).
PHASE_IDLE = "idle"  # between requests: idle_timeout, then a quiet close
PHASE_HEAD = "head"  # a request head is arriving: one head_timeout deadline
PHASE_BODY = "body"  # a body is arriving: min_body_rate checked every read_timeout


class Spool(TypingProtocol):
    """Where a body waits while it is scanned (gateway.scanner.BodySpool)."""

    size: int

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def scan_target(self) -> bytes | str: ...

    def iter_chunks(self, block: int = ..., start: int = ...) -> Iterator[bytes]: ...

    def close(self) -> None: ...


@dataclass
class GatewayContext:
    """Everything a connection needs, built once by ``makeService``."""

    scanner: Scanner
    authenticator: Authenticator
    recorder: Recorder
    observer: Observer
    new_spool: Callable[[], Spool]
    block_page: BlockPage
    clock: interfaces.IReactorTime
    # (lower-cased ICAP headers, peer ip) -> username or None, canonical client ip, refused headers
    identify: Callable[[Mapping[str, str], str], Identity]
    # (lower-cased ICAP headers, peer ip) -> what the authenticator checks
    credentials: Callable[[Mapping[str, str], str], Credentials] = field(
        default_factory=lambda: bearer_credentials)
    service_id: str = "yara"
    max_connections: int = 1000
    options_ttl: int = 3600
    preview_size: int = 4096
    head_timeout: float = 30.0
    read_timeout: float = 30.0
    min_body_rate: int = 256
    idle_timeout: float = 300.0
    write_timeout: float = 30.0
    max_pipelined_bytes: int = 256 * 1024
    error_policy: str = "fail-closed"  # or "fail-open"
    oversize_policy: str = "pass"  # or "block"
    max_scan_size: int = 256 * 1024**2
    early_response_after: int = 60 * 1024
    skip_types: list[str] = field(default_factory=list)  # see gateway.filetypes
    wall_time: Callable[[], float] = time.time
    connections: int = field(default=0)  # this process's open connections
    # The whole gateway's count (all workers): gateway.connections
    connection_count: ConnectionCount = field(default_factory=LocalConnectionCount)
    # Keep-alive connections waiting for a request, longest idle first: the
    # ones closed to make room at max_connections (see _make_room).
    idle_connections: dict[ICAPServerProtocol, None] = field(default_factory=dict)

    def istag(self) -> str:
        # RFC 3507 4.7: at most 32 characters, quoted; it changes with the rules
        # so Squid's cached OPTIONS and adapted responses are invalidated.
        version = self.scanner.version or "none"
        return f'"{(self.service_id + "-" + version)[:30]}"'


def _first_ip(peer: Any) -> str:
    return getattr(peer, "host", "") or "unix"


@dataclass
class _Transaction:
    request: Request
    started: float
    service: str
    direction: Direction
    peer: str
    client_ip: str
    tenant: Tenant | None = None
    user: str | None = None
    http_request: HTTPRequestHead | None = None
    http_response: HTTPResponseHead | None = None
    spool: Spool | None = None
    body_bytes: int = 0
    answered: bool = False
    committed: bool = False  # our 200 head went out before the verdict (see _maybe_commit)
    prefix: bytearray = field(default_factory=bytearray)  # the body's first bytes, for trickling
    released: int = 0  # body bytes sent before the verdict
    finished: bool = False  # its TransactionRecord went out
    bad_headers: tuple[str, ...] = ()  # identity headers refused (see register.users)


# IHalfCloseableProtocol: a client may send its request and shut down its
# sending side (``nc -N``, some health checkers); without it Twisted treats
# that end of input as a full close and the answer is never written.
@implementer(interfaces.IPushProducer, interfaces.IHalfCloseableProtocol)
class ICAPServerProtocol(Protocol):
    """One ICAP connection.  It is registered with its transport as a
    streaming producer of everything it writes: when the peer stops reading
    and our unsent output passes the transport's high-water mark, the
    transport pauses us; we then stop reading and processing requests, stop
    an echo, and give the peer ``write_timeout`` to drain before aborting."""

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.conn = ServerConnection()
        self.tx: _Transaction | None = None
        self._busy = False  # a scan or an echo is under way: events wait
        self._timer: DelayedCall | None = None
        self._timer_phase: tuple[str, int] = ("", 0)  # what the running timer guards: (PHASE_*, request)
        self._bytes_in = 0  # bytes read from the peer, ever
        self._window_start = 0  # _bytes_in when the current body window began
        self._paused = False  # we stopped reading the transport (see dataReceived)
        self._write_blocked = False  # the transport paused us: the peer is not reading
        self._write_timer: DelayedCall | None = None
        self._echo: Iterator[bytes] | None = None  # a spooled body being written back
        self._counted = False  # this connection is in ctx.connections
        self._peer = ""
        self._over_limit = False
        self._draining = False  # shutting down: finish what was sent, then close (finish_and_close)
        self._client_cert: str | None = None  # TLS client certificate's SHA-256, read at a request

    # --- connection lifecycle ---------------------------------------------

    def connectionMade(self) -> None:
        ctx = self.ctx
        ctx.connections += 1
        self._counted = True
        ctx.connection_count.publish(ctx.connections)
        self._peer = _first_ip(self.transport.getPeer())
        ctx.observer.connection_opened()
        self._over_limit = not self._make_room()
        self.transport.registerProducer(self, True)
        self._arm_timer()
        if isinstance(self.factory, ICAPFactory):
            self.factory.protocol_started(self)

    def _make_room(self) -> bool:
        """At max_connections (the whole gateway's), close this worker's
        longest-idle keep-alive connections rather than refuse the new one:
        an idle connection costs a socket, a refused proxy costs its users.
        False when there is still no room (this connection then gets 503)."""
        ctx = self.ctx
        total = ctx.connection_count.total(ctx.connections)
        while total > ctx.max_connections and ctx.idle_connections:
            victim = next(iter(ctx.idle_connections))
            victim._evict()
            total -= 1
        return total <= ctx.max_connections

    def _evict(self) -> None:
        """Closed, while idle, to make room for a new connection."""
        self.ctx.idle_connections.pop(self, None)
        self._release()
        self._cancel_timer()
        self.ctx.observer.connection_dropped("evicted-idle")
        self.transport.loseConnection()

    def _release(self) -> None:
        """Leave the connection count (once: eviction counts us out early)."""
        if self._counted:
            self._counted = False
            self.ctx.connections -= 1
            self.ctx.connection_count.publish(self.ctx.connections)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if isinstance(self.factory, ICAPFactory):
            self.factory.protocol_ended(self)
        self._release()
        self.ctx.idle_connections.pop(self, None)
        self.ctx.observer.connection_closed()
        self._cancel_timer()
        self._cancel_write_timer()
        self._stop_echo()
        if self.tx and self.tx.spool:
            self.tx.spool.close()
            self.tx.spool = None

    def dataReceived(self, data: bytes) -> None:
        self._bytes_in += len(data)
        self.conn.receive_data(data)
        if self._busy or self._write_blocked:
            # Bytes while we scan or echo (a pipelining client), or while the
            # peer does not read our answers: keep them, but read no more
            # until we answered, so they cannot pile up.  Paused lazily, as
            # Squid sends nothing before our answer: no epoll change per
            # request.  A transport that goes on delivering is cut off.
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            if self.conn.buffered_bytes > self.ctx.max_pipelined_bytes:
                log.info("ICAP peer {peer} sent over {limit} bytes ahead of our answers: closing",
                         peer=self._peer, limit=self.ctx.max_pipelined_bytes)
                self._drop("pipelined-overflow")
            return
        self._process()

    def _resume_reading(self) -> None:
        if self._paused and not self._write_blocked and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    def _drop(self, reason: str) -> None:
        """Abort a connection that broke a limit where no answer fits."""
        self.ctx.observer.connection_dropped(reason)
        self._cancel_timer()
        self._cancel_write_timer()
        self._stop_echo()
        self._close_spool()
        self._busy = True  # nothing more is processed on this connection
        self.transport.abortConnection()

    # --- output back-pressure (IPushProducer, registered in connectionMade) --

    def pauseProducing(self) -> None:
        """Our unsent output passed the transport's high-water mark."""
        if self._write_blocked:
            return
        self._write_blocked = True
        if not self._paused and self.transport is not None and not self.transport.disconnecting:
            self._paused = True
            self.transport.pauseProducing()
        self._cancel_timer()  # the write timer governs now
        self._write_timer = self.ctx.clock.callLater(self.ctx.write_timeout, self._write_timed_out)

    def resumeProducing(self) -> None:
        """The transport sent everything we wrote."""
        self._write_blocked = False
        self._cancel_write_timer()
        transport = self.transport
        if transport is None:
            return
        if getattr(transport, "disconnecting", False):
            # A transport with a producer does not close until it is
            # unregistered (loseConnection's contract).
            transport.unregisterProducer()
            return
        if self._echo is not None:
            self._pump_echo()
            return
        if not self._busy:
            self._resume_reading()
            self._process()

    def stopProducing(self) -> None:
        """The connection is gone."""
        self._stop_echo()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None and self._write_timer.active():
            self._write_timer.cancel()
        self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        log.info("ICAP peer {peer} read nothing of our answer for {seconds}s: aborting",
                 peer=self._peer, seconds=self.ctx.write_timeout)
        self._drop("write-timeout")

    def _stop_echo(self) -> None:
        echo, self._echo = self._echo, None
        close = getattr(echo, "close", None)
        if close:
            close()

    def readConnectionLost(self) -> None:  # half-close: treat as end of input
        self.conn.receive_data(b"")
        if not self._busy:  # else the answer under way resumes processing
            self._process()

    def writeConnectionLost(self) -> None:
        """The peer no longer reads: nothing we write can arrive."""
        if self.transport is not None:
            self.transport.abortConnection()

    # --- timers -------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm_timer(self) -> None:
        """While we read, a slow peer is the peer's problem: a request head
        must be complete ``head_timeout`` after its first byte, a body must
        bring ``min_body_rate`` bytes a second, checked every
        ``read_timeout`` (408 and close); an idle keep-alive connection
        closes quietly after ``idle_timeout``.  Progress never extends a
        deadline: a timer runs on while its phase lasts, so one byte a second
        holds a connection no longer than the others.  While we scan no read
        timer runs; while the peer does not read, the write timer does."""
        ctx = self.ctx
        if self._busy or self._write_blocked or self.transport is None:
            self._set_phase("")
            return
        conn = self.conn
        if not conn.mid_request:
            phase = PHASE_IDLE
        elif conn.their_state == "IDLE":
            phase = PHASE_HEAD
        else:
            phase = PHASE_BODY
        timer = self._timer
        # Per request: a pipelined request's head gets its own deadline.
        if timer is not None and timer.active() and self._timer_phase == (phase, conn.requests_seen):
            return
        self._set_phase(phase)
        if phase == PHASE_IDLE:
            ctx.idle_connections[self] = None
            self._timer = ctx.clock.callLater(ctx.idle_timeout, self._idle_timed_out)
        elif phase == PHASE_HEAD:
            self._timer = ctx.clock.callLater(ctx.head_timeout, self._read_timed_out, "head-timeout")
        else:
            self._window_start = self._bytes_in
            self._timer = ctx.clock.callLater(ctx.read_timeout, self._body_progress_check)

    def _set_phase(self, phase: str) -> None:
        self._cancel_timer()
        if self._timer_phase[0] == PHASE_IDLE:
            self.ctx.idle_connections.pop(self, None)
        self._timer_phase = (phase, self.conn.requests_seen)

    def _body_progress_check(self) -> None:
        """Every read_timeout while a body arrives: enough bytes since the last check?"""
        self._timer = None
        ctx = self.ctx
        needed = max(1, int(ctx.min_body_rate * ctx.read_timeout))
        if self._bytes_in - self._window_start < needed:
            self._read_timed_out("read-timeout")
            return
        self._window_start = self._bytes_in
        self._timer = ctx.clock.callLater(ctx.read_timeout, self._body_progress_check)

    def _read_timed_out(self, detail: str) -> None:
        self._timer = None
        self._timer_phase = ("", 0)
        log.info("ICAP {detail} from {peer}: answering 408", detail=detail, peer=self._peer)
        self.ctx.observer.connection_dropped(detail)
        self._finish_tx(icap_status=408, outcome="error", detail=detail)
        self.transport.write(self.conn.send_error(408, self._common_headers()))
        self.transport.loseConnection()

    def _idle_timed_out(self) -> None:
        self._timer = None
        self._set_phase("")
        self.transport.loseConnection()

    # --- event loop ---------------------------------------------------------

    def _process(self) -> None:
        while not self._busy and not self._write_blocked and self.transport is not None:
            try:
                event = self.conn.next_event()
            except ProtocolError as e:
                self._protocol_error(e)
                return
            if event is NEED_DATA or event is PAUSED:
                break
            if isinstance(event, ConnectionClosed):
                self.transport.loseConnection()
                return
            try:
                self._dispatch(event)
            except Exception:
                self._internal_error(Failure())
                return
        if self.conn.our_state == "MUST_CLOSE" and not self._busy:
            self.transport.loseConnection()
            return
        if self._draining and self._idle_keep_alive():
            self.transport.loseConnection()  # shutting down and nothing more was sent
            return
        self._arm_timer()

    def _dispatch(self, event: object) -> None:
        if isinstance(event, Request):
            self._on_request(event)
        elif isinstance(event, BodyData):
            self._on_body(event.data)
        elif isinstance(event, PreviewEnd):
            self._on_preview_end()
        elif isinstance(event, EndOfMessage):
            self._on_end()

    def _internal_error(self, failure: Failure) -> None:
        """The safety net of per-transaction code: an exception we did not
        foresee answers ICAP 500 if nothing of an answer went out yet, else
        aborts the connection (a half-sent answer cannot be repaired), so a
        peer never waits on a connection nobody serves.  Logged once, with
        the traceback and a reference the access-log line also carries."""
        reference = new_reference()
        log.failure("internal error serving {peer} (ref {ref})", failure, peer=self._peer, ref=reference)
        tx = self.tx
        answered = tx is not None and tx.answered
        self._busy = True  # this connection processes nothing more
        self._cancel_timer()
        for step in (lambda: self.ctx.observer.internal_error(),
                     lambda: self._finish_tx(icap_status=500, outcome="error", detail="internal-error",
                                             reference=reference),
                     self._close_spool):
            try:
                step()
            except Exception:
                log.failure("internal error: cleaning up failed too (ref {ref})", ref=reference)
        if self.transport is None:
            return
        answer = b""
        if not answered:
            try:
                answer = self.conn.send_error(500, self._common_headers())
            except Exception:
                answer = b""
        if answer:
            self.transport.write(answer)
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def _verdict_guarded(self, verdict: Verdict, tx: _Transaction) -> None:
        """``_on_verdict`` behind the safety net: an exception there would
        otherwise vanish into the Deferred and leave the connection busy."""
        try:
            self._on_verdict(verdict, tx)
        except Exception:
            if self.transport is not None and self.tx is tx:
                self._internal_error(Failure())
            else:
                log.failure("internal error after the connection moved on")

    # --- graceful shutdown ----------------------------------------------------

    def finish_and_close(self) -> None:
        """Shutdown: answer the transaction under way and every request the
        peer already sent (buffered here or still in the socket), with
        ``Connection: close`` on the last answer, then close.  An idle
        connection closes at once."""
        self._draining = True
        if not self._busy and self.transport is not None:
            self._process()

    def _idle_keep_alive(self) -> bool:
        """Answered at least one request and nothing more was sent.  A fresh
        connection is not idle: its peer connected to send a request, maybe
        still on its way (the drain deadline bounds the wait)."""
        return (self.tx is not None and not self._busy and self.conn.our_state == "IDLE"
                and not self._input_pending())

    def _input_pending(self) -> bool:
        """Request bytes beyond what an answer sent now would cover: the rest
        of the current request, a pipelined request, or bytes in the socket."""
        conn = self.conn
        return conn.mid_request or conn.has_buffered_input or self._socket_has_input()

    def _socket_has_input(self) -> bool:
        if self._paused:
            return True  # we stopped reading while busy: assume the peer sent more
        handle = getattr(self.transport, "getHandle", lambda: None)()
        if not isinstance(handle, socket.socket):
            return False
        try:
            return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # nothing to read (EAGAIN) or the socket is gone
            return False

    def _protocol_error(self, e: ProtocolError) -> None:
        log.info("ICAP protocol error from {peer}: {status} {reason}", peer=self._peer,
                 status=e.status, reason=e.reason)
        self._finish_tx(icap_status=e.status, outcome="error", detail=e.reason)
        self.transport.write(self.conn.send_error(e.status, self._common_headers()))
        self.transport.loseConnection()

    def _common_headers(self) -> list[tuple[str, str]]:
        # Called right before every answer: while shutting down, the answer
        # after which the peer has sent nothing more is the connection's last.
        if self._draining and not self._input_pending():
            self.conn.close_after_response()
        return [("ISTag", self.ctx.istag()), ("Server", "icap-gateway")]

    # --- transaction steps --------------------------------------------------

    def _on_request(self, req: Request) -> None:
        ctx = self.ctx
        direction: Direction = "request" if req.method == "REQMOD" else "response"
        self.tx = tx = _Transaction(
            request=req, started=ctx.clock.seconds(), service=req.service,
            direction=direction, peer=self._peer, client_ip=self._peer,
        )
        if self._over_limit:
            self._answer_now(503, outcome="error", detail="too-many-connections", close=True)
            return
        if req.method == "OPTIONS":
            return  # answered at EndOfMessage
        expected = SERVICES.get(req.service)
        if expected is None:
            self._answer_now(404, outcome="error", detail="unknown-service")
            return
        if expected != req.method:
            self._answer_now(405, outcome="error", detail="method-not-allowed-for-service")
            return
        headers = req.headers.lowered()
        username, tx.client_ip, tx.bad_headers = ctx.identify(headers, self._peer)
        # The authenticator records its own refusals: only it knows which
        # tenant a key claimed and how it rate-limits a source.
        self._client_cert = self._client_cert or client_certificate_sha256(self.transport)  # handshake done
        decision = ctx.authenticator.authenticate(
            replace(ctx.credentials(headers, self._peer), client_cert_sha256=self._client_cert))
        if isinstance(decision, Refused):
            ctx.observer.auth_failed(decision.reason)
            self._answer_now(decision.status, outcome="unauthenticated", detail=decision.reason)
            return
        assert isinstance(decision, Authenticated)
        tx.tenant = decision.tenant
        tx.user = username
        if username:
            ctx.recorder.record(UserSeen(
                tenant_id=decision.tenant.id, username=username, client_ip=tx.client_ip, at=ctx.wall_time()))
        try:
            if req.req_hdr is not None:
                tx.http_request = parse_request_head(req.req_hdr)
            if req.res_hdr is not None:
                tx.http_response = parse_response_head(req.res_hdr)
        except ProtocolError as e:
            self._answer_now(400, outcome="error", detail=e.reason)
            return
        if req.has_body:
            tx.spool = ctx.new_spool()

    def _on_body(self, data: bytes) -> None:
        tx = self.tx
        if tx is None or tx.answered or tx.spool is None:
            return
        if len(tx.prefix) < TRICKLE_PREFIX:
            tx.prefix += data[: TRICKLE_PREFIX - len(tx.prefix)]
        tx.body_bytes += len(data)
        if (tx.body_bytes > self.ctx.max_scan_size and self.ctx.oversize_policy == "pass"
                and not tx.committed and self.conn.can_send_204):
            # It will not be scanned and may pass as it is: say so now, and
            # the rest is read and dropped instead of spooled to disk.
            self._answer_clean(None, outcome="unscanned", detail="too-large")
            return
        tx.spool.write(data)
        if not tx.committed and tx.body_bytes >= self.ctx.early_response_after > 0:
            self._maybe_commit(tx)
        if tx.committed and tx.released < len(tx.prefix):
            # One byte per batch received keeps Squid's store moving, which is
            # what wakes its stalled origin read (bug 5352); see _maybe_commit.
            self.transport.write(self.conn.send_data(bytes(tx.prefix[tx.released : tx.released + 1])))
            tx.released += 1

    def _maybe_commit(self, tx: _Transaction) -> None:
        """Send our 200 head (the original HTTP response head, no body yet)
        before the verdict.  Squid before 6.10 (bug 5352) stops reading the
        origin once its 64 KiB virgin buffer fills and waits for the adapted
        response to start: without this, any response larger than that buffer
        would hang until our read timeout.  Before the verdict only single
        bytes of the body's start follow (one per piece received, at most
        TRICKLE_PREFIX): enough to keep Squid's store reading, never a usable
        part of a file.  A block after this point can only abort the response."""
        req = tx.request
        if req.method != "RESPMOD" or req.res_hdr is None or req.allow_204:
            return  # Squid buffers Allow: 204 bodies whole; REQMOD bodies flow
        if self.conn.their_state == "PREVIEW_WAIT":
            return
        tx.committed = True
        self.transport.write(self.conn.send_response(200, self._common_headers(), res_hdr=req.res_hdr, body=True))

    def _on_preview_end(self) -> None:
        tx = self.tx
        if tx is None or tx.answered:
            return
        kind = self._skipped_type(tx)
        if kind:  # decided on the preview alone: the rest never crosses the wire
            self._answer_clean(None, outcome="unscanned", detail=f"type:{kind}")
            return
        # The whole body is needed for a verdict: ask for the rest.
        self.transport.write(self.conn.send_continue())

    def _skipped_type(self, tx: _Transaction) -> str | None:
        """The body's type by magic bytes, when ``skip_types`` exempts it."""
        if not self.ctx.skip_types or not tx.prefix:
            return None
        facts = message_facts(tx.http_request, tx.http_response)
        if facts.content_encoding not in ("", "identity"):
            return None  # the first bytes are compressed: their type says nothing
        kind = sniff(bytes(tx.prefix[:SNIFF_BYTES]))
        return kind if type_matches(kind, self.ctx.skip_types) else None

    def _on_end(self) -> None:
        tx = self.tx
        if tx is None or tx.answered:
            return
        req = tx.request
        if req.method == "OPTIONS":
            self._answer_options(req)
            return
        if tx.spool is None:
            # Nothing to scan (a GET, a HEAD, a 304): pass it as it is.
            self._answer_clean(None, outcome="clean", detail="no-body")
            return
        tx.spool.finish()
        kind = None if tx.committed else self._skipped_type(tx)
        if kind:
            self._answer_clean(None, outcome="unscanned", detail=f"type:{kind}")
            return
        facts = message_facts(tx.http_request, tx.http_response)
        context = ScanContext(
            direction=tx.direction,
            url=facts.url,
            host=facts.host,
            filepath=facts.path,
            filename=facts.filename,
            extension=facts.extension,
            filetype=facts.mime_type,
            tenant=tx.tenant.name if tx.tenant else "",
            content_encoding=facts.content_encoding,
        )
        self._busy = True
        self._cancel_timer()
        d = self.ctx.scanner.scan(tx.spool.scan_target(), context)
        d.addErrback(self._on_scan_failure)
        d.addCallback(self._verdict_guarded, tx)

    def _on_scan_failure(self, failure: Failure) -> Verdict:
        log.failure("scanner failed", failure)
        return Verdict(outcome="error", detail="internal scanner error")

    def _on_verdict(self, verdict: Verdict, tx: _Transaction) -> None:
        if self.transport is None or self.tx is not tx or not self.connected:
            return
        outcome = verdict.outcome
        if outcome in ("error", "unscanned") and not verdict.reason:
            # The older spellings (_on_scan_failure's "error"): the scanner's
            # policy did not see them, the transaction's settings decide.
            reason = "too-large" if outcome == "unscanned" else "engine-error"
            fail_open = self.ctx.oversize_policy == "pass" if outcome == "unscanned" else (
                self.ctx.error_policy == "fail-open")
            verdict = replace(verdict, outcome="unscannable", reason=reason,
                              action="pass" if fail_open else "block")
            outcome = "unscannable"
        self.ctx.observer.scan_finished(verdict, tx.direction)
        self._busy = False
        if outcome == "blocked":
            self._answer_block(verdict.rules, verdict, explanation="")
        elif outcome == "unscannable":
            # Scan failures stay "error" in metrics and the access log (the
            # error-ratio alert watches them); the reason has its own field.
            recorded = "error" if verdict.reason in ("scan-timeout", "engine-error") else "unscanned"
            if verdict.action == "pass":
                self._answer_clean(verdict, outcome=recorded, detail=verdict.detail)
            else:
                why = UNSCANNABLE_REASONS.get(verdict.reason, "The content could not be scanned.")
                self._answer_block((), verdict, explanation=f"{why} The policy blocks content that "
                                   "cannot be scanned.", outcome=recorded)
        else:
            self._answer_clean(verdict, outcome="clean")
        if not self._busy:  # an echo still being written resumes reading when done
            self._resume_reading()
            self._process()

    # --- answers ------------------------------------------------------------

    def _answer_now(self, status: int, *, outcome: str, detail: str, close: bool = False) -> None:
        """An answer without body, before the request body (if any) was read."""
        tx = self.tx
        assert tx is not None
        tx.answered = True
        if tx.spool:
            tx.spool.close()
            tx.spool = None
        self.transport.write(self.conn.send_response(status, self._common_headers(), close=close))
        self._finish_tx(icap_status=status, outcome=outcome, detail=detail)

    def _answer_options(self, req: Request) -> None:
        method = SERVICES.get(req.service)
        if method is None:
            self._answer_now(404, outcome="error", detail="unknown-service")
            return
        ctx = self.ctx
        headers = [
            ("Methods", method),
            ("Service", "icap-gateway YARA scanner"),
            *self._common_headers(),
            ("Service-ID", ctx.service_id),
            ("Max-Connections", str(ctx.max_connections)),
            ("Options-TTL", str(ctx.options_ttl)),
            ("Allow", "204"),
            ("Transfer-Preview", "*"),
            ("Date", formatdate(ctx.wall_time(), usegmt=True)),
        ]
        if ctx.preview_size > 0:
            headers.append(("Preview", str(ctx.preview_size)))
        self.tx.answered = True  # type: ignore[union-attr]
        self.transport.write(self.conn.send_response(200, headers))
        self._finish_tx(icap_status=200, outcome=None, detail="")

    def _answer_clean(self, verdict: Verdict | None, *, outcome: str, detail: str = "") -> None:
        tx = self.tx
        assert tx is not None
        tx.answered = True
        headers = self._common_headers()
        reason = verdict.reason if verdict is not None and verdict.outcome == "unscannable" else ""
        if reason or outcome == "unscanned":
            status = f"unscanned; reason={reason or detail or 'unknown'}"
            headers.append(("X-Scan-Status", sanitise.header_value(status, 128)))
        req = tx.request
        if tx.committed:
            self._finish_tx(icap_status=200, outcome=outcome, detail=detail, verdict=verdict)
            self._start_echo(tx)
            return
        if self.conn.can_send_204:
            self.transport.write(self.conn.send_response(204, headers))
            self._finish_tx(icap_status=204, outcome=outcome, detail=detail, verdict=verdict)
            self._close_spool()
            return
        # No 204 allowed: send the whole original message back unchanged.
        if req.method == "REQMOD":
            head_kw = {"req_hdr": req.req_hdr}
        else:
            head_kw = {"res_hdr": req.res_hdr} if req.res_hdr is not None else {"req_hdr": req.req_hdr}
        spool = tx.spool
        self._finish_tx(icap_status=200, outcome=outcome, detail=detail, verdict=verdict)
        if spool is None:
            self.transport.write(self.conn.send_response(200, headers, **head_kw))
            return
        self.transport.write(self.conn.send_response(200, headers, body=True, **head_kw))
        self._start_echo(tx)

    def _start_echo(self, tx: _Transaction) -> None:
        assert tx.spool is not None
        self._busy = True
        self._echo = tx.spool.iter_chunks(ECHO_BLOCK_SIZE, start=tx.released)
        self._pump_echo()

    def _pump_echo(self) -> None:
        """Write the spooled body back as ICAP chunks until the transport
        pauses us (the peer reads slower than we write) or it is all out."""
        while self._echo is not None and not self._write_blocked and self.transport is not None:
            try:
                data = next(self._echo)
            except StopIteration:
                self._echo = None
                self.transport.write(self.conn.send_end())
                self._response_sent()
                return
            self.transport.write(self.conn.send_data(data))

    def _answer_block(self, rules: Any, verdict: Verdict, *, explanation: str, outcome: str = "blocked") -> None:
        tx = self.tx
        assert tx is not None
        tx.answered = True
        reference = new_reference()
        if tx.committed:
            # The original head is out: no block page can replace it now.
            # Closing mid-body makes the proxy abort the response, so not one
            # byte of the matched content reaches the client.
            log.warn("blocked after the response head was sent: aborting (ref {ref})", ref=reference)
            self._finish_tx(icap_status=200, outcome=outcome, detail=f"aborted {verdict.detail}".strip(),
                            verdict=verdict, reference=reference)
            self._close_spool()
            self._busy = True
            self.transport.abortConnection()
            return
        facts_url = tx.http_request.url if tx.http_request else ""
        head, body = self.ctx.block_page.render(
            url=facts_url, rules=list(rules), reference=reference, explanation=explanation)
        headers = self._common_headers()
        if rules:
            headers += _threat_headers(rules, facts_url)
        self.transport.write(self.conn.send_response(200, headers, res_hdr=head, body=True))
        self.transport.write(self.conn.send_data(body))
        self.transport.write(self.conn.send_end())
        self._finish_tx(icap_status=200, outcome=outcome, detail=verdict.detail,
                        verdict=verdict, http_status=403, reference=reference)
        self._close_spool()

    def _response_sent(self) -> None:
        """The echo wrote the last chunk."""
        self._busy = False
        self._close_spool()
        self._resume_reading()
        self._process()

    def _close_spool(self) -> None:
        tx = self.tx
        if tx and tx.spool:
            tx.spool.close()
            tx.spool = None

    def _finish_tx(
        self, *, icap_status: int, outcome: str | None, detail: str, verdict: Verdict | None = None,
        http_status: int | None = None, reference: str = "",
    ) -> None:
        tx = self.tx
        if tx is None or tx.finished:
            return
        tx.finished = True
        ctx = self.ctx
        if http_status is None and tx.http_response is not None:
            http_status = tx.http_response.status
        record = TransactionRecord(
            started=ctx.wall_time() - (ctx.clock.seconds() - tx.started),
            duration=ctx.clock.seconds() - tx.started,
            method=tx.request.method,
            service=tx.service,
            icap_status=icap_status,
            client_ip=tx.client_ip,
            peer=tx.peer,
            tenant=tx.tenant.name if tx.tenant else "",
            user=tx.user or "",
            url=tx.http_request.url if tx.http_request else "",
            http_status=http_status,
            outcome=outcome,  # type: ignore[arg-type]
            rules=tuple(verdict.rules) if verdict else (),
            direction=tx.direction if tx.request.method != "OPTIONS" else None,
            body_bytes=tx.body_bytes,
            scan_duration=verdict.duration if verdict else None,
            detail=(reference and f"ref={reference} {detail}".strip()) or detail,
            bad_headers=tx.bad_headers,
            unscannable=(verdict.reason if verdict else "") or (
                detail if outcome == "unscanned" and detail in UNSCANNABLE_REASONS else ""),
        )
        ctx.observer.transaction_finished(record)


def bearer_credentials(headers: Mapping[str, str], peer: str) -> Credentials:
    """Credentials from ``Authorization: Bearer <key>`` (names lower-cased)."""
    value = headers.get("authorization") or ""
    scheme, _, token = value.strip().partition(" ")
    key = token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return Credentials(key=key, source_ip=peer)


def _threat_headers(rules: Sequence[str], url: str) -> list[tuple[str, str]]:
    """X-Infection-Found and X-Violations-Found of a block.  The URL and the
    rule names are the peer's and the rule files' text: sanitised here, at
    the one place they become ICAP response headers (no CR, LF or NUL can
    start a header of the attacker's choosing), and bounded in length."""
    named = [sanitise.header_value(rule, sanitise.HEADER_RULE_MAX) for rule in list(rules)[: sanitise.HEADER_RULES_MAX]]
    threat = ", ".join(named)
    return [("X-Infection-Found", f"Type=0; Resolution=2; Threat={threat};"),
            ("X-Violations-Found", _violations(named, sanitise.url(url, sanitise.HEADER_URL_MAX)))]


def _violations(rules: Sequence[str], url: str) -> str:
    # RFC 3507 draft "ICAP extensions" X-Violations-Found: a count line, then
    # four lines per violation (filename, id, name, disposition), folded onto
    # continuation lines.  The values must already be sanitised.
    lines = [str(len(rules))]
    for rule in rules:
        lines += [url or "-", rule, rule, "2"]
    return "\r\n\t".join(lines)


class ICAPFactory(Factory):
    """Builds the connections and, for a graceful shutdown, knows them all."""

    protocol = ICAPServerProtocol  # type: ignore[assignment]

    def __init__(self, ctx: GatewayContext) -> None:
        self.ctx = ctx
        self.protocols: set[ICAPServerProtocol] = set()
        self.draining = False
        self._drained: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> ICAPServerProtocol:
        p = ICAPServerProtocol(self.ctx)
        p.factory = self
        return p

    def protocol_started(self, proto: ICAPServerProtocol) -> None:
        self.protocols.add(proto)
        if self.draining:  # accepted from the backlog after the shutdown began
            proto.finish_and_close()

    def protocol_ended(self, proto: ICAPServerProtocol) -> None:
        self.protocols.discard(proto)
        if self.draining and not self.protocols:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def drain(self, timeout: float) -> Deferred[int]:
        """Every connection finishes what its peer sent, then closes (see
        ``ICAPServerProtocol.finish_and_close``).  Fires with the number of
        connections still open after ``timeout`` seconds, which are aborted
        then (0 when all finished in time).  Stop accepting first."""
        self.draining = True
        for proto in list(self.protocols):
            proto.finish_and_close()
        if not self.protocols:
            return succeed(0)
        done: Deferred[None] = Deferred()
        self._drained.append(done)
        result: Deferred[int] = Deferred()

        def timed_out() -> None:
            left = list(self.protocols)
            log.warn("shutdown: {count} connections still busy after {timeout}s: aborting them",
                     count=len(left), timeout=timeout)
            for proto in left:
                if proto.transport is not None:
                    proto.transport.abortConnection()
            if not result.called:
                result.callback(len(left))

        timer = self.ctx.clock.callLater(timeout, timed_out)

        def finished(_: None) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback(0)

        done.addCallback(finished)
        return result
